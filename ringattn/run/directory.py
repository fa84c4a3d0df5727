"""A run directory's config: `<workdir>/config.json`, written by the trainer or by the Hugging
Face importer, read back by inference and by runs started from this one, and checked before a
rerun writes anything (ringattn/run/fields.py says which fields may differ and how)."""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from ringattn.nn.config import upgrade
from ringattn.run import fields

CONFIG_FILE = "config.json"
HF_SUBDIR = "hf"  # an imported run's Hugging Face files: config.json, the tokenizer's


def read_config(workdir):
    """`<workdir>/config.json` as a ConfigDict (a deprecated `sliding_window` read as
    `local_window_size`), or None if there is none."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        config = json.load(f)
    if "model" in config:
        config["model"] = upgrade(config["model"])
    return ml_collections.ConfigDict(config)


def load_config(workdir, config=None):
    """`config` if given, else `<workdir>/config.json`."""
    if config is not None:
        return config
    stored = read_config(workdir)
    if stored is None:
        raise FileNotFoundError(
            f"load_config: {os.path.join(workdir, CONFIG_FILE)} does not exist (runs trained "
            "before configs were saved: pass the config, e.g. --config=configs/default.py)."
        )
    return stored


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


def prepare(config, workdir):
    """(the config a run in `workdir` trains with, [(field, old, new)] it changes, a text that
    shows them): resumed from the run already in `workdir` (a change a rerun may not make
    raises, naming it), started from `config.init_from`'s run, or fresh; see
    ringattn/run/fields.py. Writes nothing."""
    stored = read_config(workdir)
    if stored is not None:
        config, rows = fields.resume(config, stored, workdir)
        if stored.get(fields.RECORD) is not None:  # how the run was started: kept
            config[fields.RECORD] = stored[fields.RECORD]
        head = f"resuming the run in {workdir}, with these fields changed:"
        return config, rows, f"{head}\n{fields.table(rows)}" if rows else ""
    source = config.get("init_from")
    if source:
        config, rows = fields.start_from(config, load_config(source), source)
        config[fields.RECORD] = [list(row) for row in rows]
        head = f"init_from {source}: its model, with these fields changed (kept in config.json):"
        return config, rows, f"{head}\n{fields.table(rows, source)}" if rows else ""
    return fields.fresh(config), [], ""


def write_config(workdir, config):
    """`<workdir>/config.json` (process 0)."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(config.to_json(indent=1))


def hf_template_dir(workdir, max_depth=8):
    """`<workdir>/hf` (an imported run's Hugging Face config and tokenizer files), else that of
    the run it was started from (config.init_from), and so on; None if there is none (a run
    trained from scratch)."""
    for _ in range(max_depth):
        if os.path.isdir(os.path.join(workdir, HF_SUBDIR)):
            return os.path.join(workdir, HF_SUBDIR)
        workdir = load_config(workdir).get("init_from")
        if not workdir:
            return None
    return None
