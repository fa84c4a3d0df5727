"""A trained (or imported) run, rebuilt for inference: its config (`<workdir>/config.json`) with
overrides, a mesh over the chosen devices, and the parameters of the newest readable checkpoint
restored straight into that mesh's shardings (any device count: Orbax reshards). Reading the run
directory is ringattn/train/rundir.py's (training from a run's parameters uses it too)."""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import optax

from ringattn.mesh import make_mesh
from ringattn.nn.config import ModelConfig
from ringattn.nn.model import Transformer
from ringattn.train.rundir import load_config, restore_params, with_overrides
from ringattn.train.state import state_shardings
from ringattn.train.trainer import model_config

__all__ = ["Run", "load_config", "load_run", "with_overrides"]


@dataclasses.dataclass
class Run:
    config: ml_collections.ConfigDict
    model_cfg: ModelConfig
    mesh: jax.sharding.Mesh
    params: dict
    step: int


def load_run(workdir, *, config=None, overrides=None, num_devices=None):
    """The run in `workdir` on the first `num_devices` devices (default: all), on a mesh with
    the config's fixed axis sizes and the context axis taking the devices they leave (decoding
    shards its cache over context)."""
    config = with_overrides(load_config(workdir, config), overrides)
    devices = jax.devices()[: num_devices or None]
    shape = {axis: 1 if size == -1 else size for axis, size in config.mesh.items()}
    mesh = make_mesh({**shape, "context": -1}, devices)
    cfg = model_config(config.model)
    abstract, _ = state_shardings(Transformer(cfg, mesh), optax.identity(), mesh, cfg.rules)
    step, params = restore_params(workdir, abstract.params)
    return Run(config, cfg, mesh, params, step)
