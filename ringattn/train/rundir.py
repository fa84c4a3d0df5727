"""A run directory: its config (`<workdir>/config.json`, written by the trainer or by the Hugging
Face importer) and the parameters of its newest readable checkpoint, restored straight into the
shardings asked for (Orbax reshards to any mesh; nothing else of the checkpoint is read, so a
checkpoint holding parameters only, as an imported one does, restores too).

`--config.init_from=DIR` starts training from DIR's parameters: the model's shape comes from DIR's
config, what may change (RoPE, attention, window, remat, dtypes, sharding rules) from the run's
config, and the optimizer and the step start afresh.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from ringattn.train.checkpoint import Checkpointer
from ringattn.train.state import TrainState

# Model fields a run started from another run's parameters takes from its own config; every other
# model field (the parameters' shapes and what they were trained with: vocabulary, layers, widths,
# heads, tying, norm eps, ...) comes from the parameters' run.
CHANGEABLE = ("rope", "attention", "remat", "scan_layers", "mlp_chunk_size", "dtype")
CHANGEABLE += ("param_dtype", "rule_overrides")
# ... except these attention fields, which change the function the parameters compute with.
FIXED_ATTENTION = ("logits_soft_cap", "sinks")


def load_config(workdir, config=None):
    """`config` if given, else `<workdir>/config.json`."""
    if config is not None:
        return config
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"load_config: {path} does not exist (runs trained before configs were saved: pass "
            "the config, e.g. --config=configs/default.py)."
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def with_overrides(config, overrides):
    """A copy of `config` with dotted keys replaced: {"model.rope.scaling": "yarn"}."""
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in (overrides or {}).items():
        *parents, name = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        if name not in node:
            raise KeyError(f"with_overrides: {key!r} is not a field of the config.")
        node[name] = value
    return config


def restore_params(workdir, abstract_params):
    """(step, params) of the newest checkpoint in `workdir` whose parameters read, placed as
    `abstract_params` (ShapeDtypeStructs with shardings) says; an unreadable checkpoint is
    reported and the one before it used."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"restore_params: {workdir} has no checkpoints/ directory.")
    ckpt = Checkpointer(workdir, async_save=False)
    item = {"params": abstract_params}
    args = ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,  # the optimizer state and step are left on disk
        )
    )
    try:
        for step in sorted(ckpt.manager.all_steps(), reverse=True):
            try:
                return int(step), ckpt.manager.restore(step, args=args)["state"]["params"]
            except Exception as e:  # noqa: BLE001 -- any failure to read means: try an older one
                logging.warning("Checkpoint %d is unreadable (%s: %s).", step, type(e).__name__, e)
                print(
                    f"checkpoint {step} is unreadable ({type(e).__name__}); trying the previous one"
                )
    finally:
        ckpt.close()
    raise FileNotFoundError(f"restore_params: no readable checkpoint in {ckpt.directory}.")


def merge_model(config_model, source_model):
    """The model fields of a run started from `source_model`'s parameters: the source's fields,
    with those in CHANGEABLE taken from `config_model` (dicts or ConfigDicts)."""
    ours = _to_dict(config_model)
    merged = _to_dict(source_model)
    for name in CHANGEABLE:
        if name == "attention" and name in ours:
            fixed = {k: v for k, v in merged.get(name, {}).items() if k in FIXED_ATTENTION}
            merged[name] = {**ours[name], **fixed}
        elif name in ours:
            merged[name] = ours[name]
    return merged


def with_init_from(config):
    """`config` with its model merged with that of `config.init_from`'s run (see merge_model);
    prints the model fields that the merge changed. Unchanged when init_from is empty."""
    source = config.get("init_from")
    if not source:
        return config
    source_model = load_config(source).model
    merged = merge_model(config.model, source_model)
    for key, (was, now) in sorted(_diff(_to_dict(config.model), merged).items()):
        print(f"init_from: model.{key} = {now!r} from {source} (the config has {was!r})")
    for key, (was, now) in sorted(_diff(_to_dict(source_model), merged).items()):
        print(f"init_from: model.{key} = {now!r} from the config ({source} has {was!r})")
    config = ml_collections.ConfigDict(config.to_dict())
    config.model = ml_collections.ConfigDict(merged)
    return config


def state_from_run(directory, abstract_state, tx):
    """A train state at step 0 with `directory`'s newest parameters and a fresh optimizer state,
    all in `abstract_state`'s shardings."""
    step, params = restore_params(directory, abstract_state.params)
    print(f"init_from: parameters of checkpoint {step} in {directory}; step 0, fresh optimizer")
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    zero = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(zero, params, opt_state)


def _to_dict(config):
    return json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else config))


class _Default:
    def __repr__(self):
        return "(unset: the default)"


def _diff(before, after, prefix=""):
    """{dotted key: (before, after)} where two nested dicts differ."""
    out = {}
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, _Default()), after.get(key, _Default())
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            out[f"{prefix}{key}"] = (a, b)
    return out
