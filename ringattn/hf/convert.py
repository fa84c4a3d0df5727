"""A Hugging Face checkpoint directory <-> one of our run directories.

import_checkpoint writes `<workdir>/config.json` (the given training config with the HF model's
fields), an Orbax checkpoint 0 holding the parameters alone, and `<workdir>/hf/` (the HF
config.json, tokenizer and generation files, kept for the export). The run loads like a trained
one (ringattn.run.load.load_run) and trains on with --config.init_from. export_checkpoint
writes a run's newest parameters back in HF's format.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import jax
import ml_collections

from ringattn.hf import config as hf_config_lib
from ringattn.hf import weights as weights_lib
from ringattn.mesh import make_mesh
from ringattn.nn.config import ModelConfig
from ringattn.run import fields as run_fields
from ringattn.run.checkpoint import Checkpointer
from ringattn.run.directory import HF_SUBDIR, hf_template_dir, load_config, write_config
from ringattn.run.params import abstract_params, restore_model_params

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".index.json")


def _placement_mesh(cfg, devices=None):
    """The devices on the fsdp axis (as many as divide d_model; the rest on data): the rules
    shard every matrix's embedding dim over it, so no device holds a whole weight matrix."""
    devices = jax.devices() if devices is None else devices
    fsdp = math.gcd(len(devices), cfg.d_model)
    return make_mesh({"data": len(devices) // fsdp, "fsdp": fsdp}, devices)


def imported_config(hf: dict, base, param_dtype: str):
    """`base` (a training config) with its model replaced by the HF model's: its shape and
    function from `hf`, the speed-only fields (attention implementation, blocks, remat,
    sharding: ringattn/run/fields.py SPEED) from `base`, weights in `param_dtype`."""
    ours = run_fields.speed_only(base.model)
    ours["param_dtype"] = param_dtype
    ours["dtype"] = "bfloat16" if param_dtype == "bfloat16" else "float32"
    model = run_fields.merge_model(ours, hf_config_lib.model_fields(hf))
    config = ml_collections.ConfigDict(base.to_dict())
    config.model = ml_collections.ConfigDict(model)
    return config


def import_checkpoint(hf_dir, workdir, base, *, param_dtype=None, devices=None):
    """Convert the HF checkpoint in `hf_dir` into a run directory `workdir` (see the module
    docstring); `base` is the training config the run gets (its mesh, task, attention ...).
    Weights keep the checkpoint's dtype unless `param_dtype` is given. Returns the config."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    checkpoint = weights_lib.Checkpoint(hf_dir)
    dtype = param_dtype or checkpoint.dtype("model.embed_tokens.weight")
    config = write_run(hf, checkpoint, workdir, base, dtype, devices)
    keep = os.path.join(workdir, HF_SUBDIR)
    os.makedirs(keep, exist_ok=True)
    for name in os.listdir(hf_dir):
        path = os.path.join(hf_dir, name)
        if os.path.isfile(path) and not name.endswith(WEIGHT_FILES):
            shutil.copy(path, keep)
    return config


def write_run(hf, checkpoint, workdir, base, param_dtype, devices=None):
    """The run directory of the HF model `hf` (a config.json dict) whose tensors `checkpoint`
    (weights.Checkpoint's interface) holds: `<workdir>/config.json` (`base` with the model's
    fields, weights in `param_dtype`) and the parameters as checkpoint 0. Returns the config."""
    config = imported_config(hf, base, param_dtype)
    cfg = ModelConfig.from_config(config.model)
    mesh = _placement_mesh(cfg, devices)
    abstract = abstract_params(cfg, mesh)
    params = weights_lib.load_params(checkpoint, abstract, cfg.num_layers, cfg.tie_embeddings)
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        ckpt.save(0, {"params": params}, {})
    finally:
        ckpt.close()
    write_config(workdir, config)
    return config


def write_hf_files(workdir, hf, files):
    """`<workdir>/hf/config.json` (`hf`) and `files` ({name: text}: tokenizer files ...)."""
    keep = os.path.join(workdir, HF_SUBDIR)
    os.makedirs(keep, exist_ok=True)
    for name, text in {"config.json": json.dumps(hf, indent=2), **files}.items():
        with open(os.path.join(keep, name), "w", encoding="utf-8") as f:
            f.write(text)


def describe(config):
    """One line on an imported run's model."""
    m = config.model
    return (
        f"imported {m.num_layers} layers, d {m.d_model}, {m.num_heads}/{m.num_kv_heads} heads, "
        f"vocabulary {m.vocab_size}, {m.param_dtype}, RoPE {m.rope.scaling}"
    )


def export_checkpoint(workdir, out_dir, *, dtype=None, max_file_bytes=5 << 30, devices=None):
    """Write the newest parameters of the run in `workdir` as a HF checkpoint in `out_dir`
    (config.json, safetensors, the imported run's tokenizer files), in `dtype` if given (else
    the parameters' own). Returns the HF config dict."""
    config = load_config(workdir)
    cfg = ModelConfig.from_config(config.model)
    mesh = _placement_mesh(cfg, devices)
    _, params = restore_model_params(workdir, cfg, mesh, config)
    untie = cfg.tie_embeddings and cfg.scale_tied_logits
    tensors = weights_lib.hf_tensors(params, cfg.num_layers, untie, dtype)
    template_dir = hf_template_dir(workdir)
    template = None
    if template_dir and os.path.exists(os.path.join(template_dir, "config.json")):
        with open(os.path.join(template_dir, "config.json")) as f:
            template = json.load(f)
    if untie:
        cfg = dataclasses.replace(cfg, tie_embeddings=False)
    hf = hf_config_lib.hf_config(cfg, str(tensors[0][2]), template)
    weights_lib.save_tensors(tensors, out_dir, max_file_bytes)
    if template_dir:
        for name in os.listdir(template_dir):
            if name != "config.json":
                shutil.copy(os.path.join(template_dir, name), out_dir)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    return hf
