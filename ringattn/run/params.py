"""A run's parameters: their abstract tree on a mesh, and those of the newest readable checkpoint
restored straight into its shardings (Orbax reshards to any mesh and casts to the dtype asked
for; nothing else of the checkpoint is read, so a checkpoint of parameters only restores too).

A checkpoint stores the layers as its run's config says: stacked on a leading axis (scan_layers)
or one by one, with or without sink logits. `restore_model_params` reads them so and converts
them to the structure of the ModelConfig asked for: scan_layers is speed-only, and sinks asked
for over a run without them start at 0, as a fresh model's.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ringattn.nn.config import ModelConfig
from ringattn.nn.model import Transformer
from ringattn.run.checkpoint import Checkpointer


def init_boxed(cfg: ModelConfig, rng, batch=1, seq_len=8):
    """A fresh model's parameters in logical-axis boxes, initialised through dense attention on
    one device: they do not depend on the attention implementation, and init then needs no
    mesh-shaped example batch."""
    dense = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, impl="dense"))
    tokens = jnp.zeros((batch, seq_len), jnp.int32)
    return Transformer(dense).init(rng, tokens, tokens, tokens + 1)["params"]


def shardings_of(boxed, mesh, rules):
    """The NamedShardings of a tree of logical-axis boxes (replicated where a leaf has none)."""
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, P()) if s is None else s,
        shardings,
        is_leaf=lambda s: s is None,
    )


def abstract_params(cfg: ModelConfig, mesh):
    """ShapeDtypeStructs with shardings of `cfg`'s parameters on `mesh`; allocates nothing."""
    boxed = jax.eval_shape(lambda r: init_boxed(cfg, r), jax.random.key(0))
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.unbox(boxed),
        shardings_of(boxed, mesh, cfg.rules),
    )


def restore_params(workdir, abstract):
    """(step, params) of the newest checkpoint in `workdir` whose parameters read into
    `abstract` (any tree of ShapeDtypeStructs with shardings)."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"restore_params: {workdir} has no checkpoints/ directory.")
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        found = ckpt.restore_params(abstract)
    finally:
        ckpt.close()
    if found is None:
        raise FileNotFoundError(f"restore_params: no checkpoint in {ckpt.directory}.")
    return found


def stored_layout(cfg: ModelConfig, stored_model) -> ModelConfig:
    """`cfg` with the layer structure a run's checkpoints hold, read from its config's `model`
    (scan_layers and sinks; cfg's own when the run has no config)."""
    if stored_model is None:
        return cfg
    sinks = bool((stored_model.get("attention") or {}).get("sinks") or False)
    attention = dataclasses.replace(cfg.attention, sinks=sinks)
    scan = bool(stored_model.get("scan_layers") or False)
    return dataclasses.replace(cfg, scan_layers=scan, attention=attention)


def restore_model_params(workdir, cfg: ModelConfig, mesh, stored):
    """(step, params) of `workdir`'s newest readable checkpoint, as `cfg`'s parameters on
    `mesh`, converted from the structure the run stored them in: `stored` is the run's config
    (`directory.read_config(workdir)`; None: the run has none, its structure is cfg's)."""
    layout = stored_layout(cfg, None if stored is None else stored.model)
    abstract = abstract_params(layout, mesh)
    target = None
    if layout != cfg:
        target = jax.tree.map(lambda x: x.sharding, abstract_params(cfg, mesh))
    step, params = restore_params(workdir, abstract)
    if target is not None:
        convert = functools.partial(convert_layers, src=layout, dst=cfg)
        params = jax.jit(convert, out_shardings=target)(params)
    return step, params


def layers_of(params, cfg: ModelConfig):
    """[layer i's parameters] of a model's parameters, whatever their structure."""
    n, every = cfg.num_layers, _group(cfg)
    if not cfg.scan_layers:
        return [params[f"layer_{i}"] for i in range(n)]
    if every:
        stacked = params["layers"]
        return [
            jax.tree.map(lambda x, i=i: x[i // every], stacked[f"block_{i % every}"])
            for i in range(n)
        ]
    return [jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(n)]


def with_layers(params, layers, cfg: ModelConfig):
    """`params` with its layers replaced by `layers` (one tree per layer), in cfg's structure."""
    out = {k: v for k, v in params.items() if k != "layers" and not k.startswith("layer_")}
    if not cfg.scan_layers:
        return out | {f"layer_{i}": layer for i, layer in enumerate(layers)}
    every = _group(cfg)
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)  # noqa: E731
    if every:
        out["layers"] = {f"block_{j}": stack(layers[j::every]) for j in range(every)}
    else:
        out["layers"] = stack(layers)
    return out


def convert_layers(params, src: ModelConfig, dst: ModelConfig):
    """Parameters of structure `src` (scan_layers, sinks) in the structure of `dst`."""
    layers = layers_of(params, src)
    if dst.attention.sinks and not src.attention.sinks:
        zeros = jnp.zeros((dst.num_heads,), dst.param_dtype)
        layers = [{**layer, "attn": {**layer["attn"], "sinks": zeros}} for layer in layers]
    elif src.attention.sinks and not dst.attention.sinks:
        drop = lambda attn: {k: v for k, v in attn.items() if k != "sinks"}  # noqa: E731
        layers = [{**layer, "attn": drop(layer["attn"])} for layer in layers]
    return with_layers(params, layers, dst)


def _group(cfg: ModelConfig):
    """How many layers a scanned step holds: 0 when every layer is alike (one block scanned
    num_layers times), else `global_every` (local and global layers alternate), as in
    nn/model.py's scan."""
    windows = {cfg.layer_window(i) for i in range(cfg.num_layers)}
    return 0 if len(windows) == 1 else cfg.attention.global_every
