"""A trained (or imported) run, rebuilt for inference: its config (`<workdir>/config.json`) with
overrides, a mesh over the chosen devices, and the parameters of the newest readable checkpoint
restored straight into that mesh's shardings (any device count: Orbax reshards)."""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from ringattn.mesh import make_mesh
from ringattn.nn.config import ModelConfig
from ringattn.run.directory import load_config, read_config, with_overrides
from ringattn.run.params import restore_model_params

PLATFORM_DEFAULTS = ("block_q", "block_k")  # attention fields a loaded run takes from here


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
    shards its cache over context). `config` replaces `<workdir>/config.json` (runs trained
    before configs were saved); `overrides` ({"model.rope.scaling": "yarn"}) change fields.

    The kernel's tiles are the platform's default (None) unless `overrides` set them: the run's
    stored blocks were chosen for where it trained (speed only, ringattn/run/fields.py)."""
    stored = read_config(workdir)  # read once: the model and the checkpoints' layer structure
    if config is None:
        config = stored if stored is not None else load_config(workdir)  # (which says why not)
    config = with_overrides(config, overrides)
    for key in PLATFORM_DEFAULTS:
        if f"model.attention.{key}" not in (overrides or {}) and "attention" in config.model:
            config.model.attention[key] = None
    devices = jax.devices()[: num_devices or None]
    shape = {axis: 1 if size == -1 else size for axis, size in config.mesh.items()}
    mesh = make_mesh({**shape, "context": -1}, devices)
    cfg = ModelConfig.from_config(config.model)
    step, params = restore_model_params(workdir, cfg, mesh, stored=stored)
    return Run(config, cfg, mesh, params, step)
