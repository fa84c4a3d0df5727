"""A trained run, rebuilt for inference: its config (`<workdir>/config.json`, written by the
trainer) with overrides, a mesh over the chosen devices, and the parameters of the newest
readable checkpoint restored straight into that mesh's shardings (any device count: Orbax
reshards)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections

from ringattn.mesh import make_mesh
from ringattn.nn.config import ModelConfig
from ringattn.nn.model import Transformer
from ringattn.train.checkpoint import Checkpointer
from ringattn.train.state import state_shardings
from ringattn.train.trainer import model_config, optimizer


@dataclasses.dataclass
class Run:
    config: ml_collections.ConfigDict
    model_cfg: ModelConfig
    mesh: jax.sharding.Mesh
    params: dict
    step: int


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


def load_run(workdir, *, config=None, overrides=None, num_devices=None):
    """The run in `workdir` on the first `num_devices` devices (default: all), on a mesh with
    the config's fixed axis sizes and the context axis taking the devices they leave (decoding
    shards its cache over context)."""
    config = with_overrides(load_config(workdir, config), overrides)
    devices = jax.devices()[: num_devices or None]
    shape = {axis: 1 if size == -1 else size for axis, size in config.mesh.items()}
    mesh = make_mesh({**shape, "context": -1}, devices)
    cfg = model_config(config.model)
    tx, _ = optimizer(config)  # the checkpoint holds the optimizer state too
    abstract, _ = state_shardings(Transformer(cfg, mesh), tx, mesh, cfg.rules)
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        restored = ckpt.restore_latest(abstract)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"load_run: no readable checkpoint in {ckpt.directory}.")
    step, state, _ = restored
    return Run(config, cfg, mesh, state.params, int(step))
