"""What the absl entrypoints in experiments/ share, defined once: their common flags (a function
defines its flag in absl's FLAGS when an entrypoint calls it at import, like flags.DEFINE_*, and
returns the flag's holder) and what each main does first (`start`).

Not imported by `ringattn` itself: it needs absl and ml_collections.
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from ringattn.mesh import start_entrypoint

# The checkout's configs/default.py: the experiments run from a checkout.
DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py"
)


def num_cpu_devices(help="Simulated devices on CPU."):
    """--num_cpu_devices (default 8): `start` simulates them when JAX runs on the CPU."""
    return flags.DEFINE_integer("num_cpu_devices", 8, help)


def run_config():
    """--config of a run directory that has no config.json (default: the run's own)."""
    return config_flags.DEFINE_config_file(
        "config",
        None,
        "The run's config, for runs without <workdir>/config.json.",
        lock_config=True,
    )


def config(help):
    """--config: an ml_collections config file with an optional :variant, by default the
    checkout's configs/default.py."""
    return config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, help, lock_config=True)


def start(cpu_devices, *required):
    """What a main does first, once absl has parsed the flags: a UsageError when a `required`
    flag (a holder) is unset, then start_entrypoint (logging, and --num_cpu_devices, the holder
    `cpu_devices`: before anything starts JAX's backend)."""
    if not all(holder.value for holder in required):
        names = " and ".join(f"--{holder.name}" for holder in required)
        raise app.UsageError(f"{names} {'is' if len(required) == 1 else 'are'} required.")
    start_entrypoint(cpu_devices.value)


def open_run(workdir, config=None, num_devices=None):
    """(run, tokenizer) of the run directory `workdir` (~ expanded): run.load.load_run on
    the first `num_devices` devices (default: all; `config` for a run without config.json), and
    the run's tokenizer (hf.tokenizer.load_tokenizer: an imported model's own, else bytes)."""
    from ringattn.hf.tokenizer import load_tokenizer
    from ringattn.run.load import load_run

    workdir = os.path.expanduser(workdir)
    return load_run(workdir, config=config, num_devices=num_devices), load_tokenizer(workdir)


CACHES = ("full", "sink_window", "window", "retrieval")


def cache_flags(window=1020):
    """The KV cache flags of generate and needle: --cache (a kind, ringattn/decode/), --num_sinks,
    --window (sink_window, window, retrieval: recent tokens kept exactly), --page_size,
    --top_pages and --selection_block (retrieval). Returns their holders; `cache_spec` reads
    them."""
    return dict(
        kind=flags.DEFINE_enum("cache", "full", list(CACHES), "KV cache kind."),
        num_sinks=flags.DEFINE_integer(
            "num_sinks", 4, "sink_window / retrieval: tokens kept from the start."
        ),
        window=flags.DEFINE_integer(
            "window", window, "sink_window / window / retrieval: recent tokens kept."
        ),
        page_size=flags.DEFINE_integer("page_size", 64, "retrieval: tokens per page."),
        top_pages=flags.DEFINE_integer(
            "top_pages", 12, "retrieval: pages attended per step, chosen by their key bounds."
        ),
        selection_block=flags.DEFINE_integer(
            "selection_block", 16, "retrieval: prompt tokens of a chunk sharing one selection."
        ),
        dense_layers=flags.DEFINE_integer(
            "dense_layers", 0, "retrieval: the lowest layers read every page (Quest: 2)."
        ),
    )


def cache_spec(holders, max_len=None, quantize=False):
    """The CacheSpec (ringattn/evals/generate.py) the `cache_flags` holders say; `max_len` for
    the kinds that hold every token (full, retrieval)."""
    from ringattn.evals.generate import CacheSpec

    kind = holders["kind"].value
    if kind == "full":
        return CacheSpec("full", max_len=max_len, quantize=quantize)
    opts = {name: holders[name].value for name in ("num_sinks", "window")}
    if kind == "window":
        opts["num_sinks"] = 0
    if kind == "retrieval":
        opts.update(
            {
                n: holders[n].value
                for n in ("page_size", "top_pages", "selection_block", "dense_layers")
            }
        )
        opts["max_len"] = max_len
    return CacheSpec(kind, quantize=quantize, **opts)
