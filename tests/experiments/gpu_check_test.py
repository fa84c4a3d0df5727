"""experiments/gpu_check.py: end to end on the CPU (--interpret --quick) as a subprocess from a
copy of the checkout where nothing of ours is importable, so only the script's own sys.path set-up
can find ringattn (as on a GPU machine with JAX alone); and its failure reporting, in-process."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import jax.numpy as jnp
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EXPERIMENTS = os.path.join(ROOT, "experiments")
PALLAS_CALLS = ("fwd", "fwd continued", "dK/dV", "dK/dV continued", "dQ", "dQ continued")

# `python -I` ignores PYTHONPATH, the user's site-packages and the script's directory; the
# editable install of ringattn is an import hook that site-packages installs, dropped here.
BARE = """\
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def bare_run(tmp_path_factory):
    """(completed process, checkout copy, --out dir) of --interpret --quick from the copy."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    checkout, out = tmp / "checkout", tmp / "out"
    for name in ("ringattn", "experiments"):
        ignore = shutil.ignore_patterns("__pycache__", "results")
        shutil.copytree(os.path.join(ROOT, name), checkout / name, ignore=ignore)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "XLA_", "JAX_"))}
    script = str(checkout / "experiments" / "gpu_check.py")
    cmd = [sys.executable, "-I", "-c", BARE, script, "--interpret", "--quick", f"--out={out}"]
    proc = subprocess.run(
        cmd, cwd=tmp, env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    return proc, checkout, out


def _lines(proc, pattern):
    return [line for line in proc.stdout.splitlines() if re.match(pattern, line)]


@pytest.mark.slow  # ~1 min of CPU (the Pallas interpreter compiles each call in seconds)
def test_interpret_quick_from_a_bare_checkout(bare_run):
    proc, checkout, out = bare_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"ringattn from {checkout / 'ringattn'}" in proc.stdout.splitlines()
    # Stage 0: each of our Pallas kernel's calls compiled and run on its own, within tolerance.
    for call in PALLAS_CALLS:
        assert len(_lines(proc, rf"  pallas {re.escape(call)} causal +ok  ")) == 1, call
    assert len(_lines(proc, r"  cudnn (fwd|bwd) causal +n/a: ")) == 2
    # Stage 1: our Pallas kernel, auto and both emulated rings pass; our cuDNN path is n/a.
    checks = _lines(proc, r"  segments T=96 ")
    for path in ("pallas", "auto", "ring2 pallas", "ring2 auto"):
        assert len([x for x in checks if re.match(rf"  segments T=96 +{path} .* PASS ", x)]) == 1
    assert len([x for x in checks if re.match(r"  segments T=96 +cudnn .* n/a: ", x)]) == 1
    assert len(checks) == 5
    # Stage 2: timed paths, and the cuDNN ones n/a (not FAILED).
    for path in ("pallas", "auto", "ring2 auto", "xla1024"):
        assert len(_lines(proc, rf"  causal T=128 +fwdbwd {path} +[0-9.]+ ms ")) == 1, path
    for path in ("jax cudnn", "cudnn"):
        assert len(_lines(proc, rf"  causal T=128 +fwdbwd {path} +n/a: ")) == 1, path
    assert "FAILED" not in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("RESULT: PASS, 0 failed")

    assert (out / "gpu_check.txt").read_text() == proc.stdout
    assert (out / "gpu_check.log").read_text() == ""  # tracebacks only: none
    figures = json.loads((out / "gpu_check.json").read_text())
    assert figures["meta"]["result"] == "PASS" and figures["failures"] == []
    assert [r["status"] for r in figures["checks"]].count("PASS") == 4
    timed = [r for r in figures["timing"] if r["status"] == "ok"]
    assert len(timed) == 16 and all(r["ms"] > 0 and r["tflops"] > 0 for r in timed)


def _load(monkeypatch, name):
    monkeypatch.syspath_prepend(EXPERIMENTS)
    return importlib.import_module(name)


def test_a_failing_call_is_one_line_and_a_logged_traceback(tmp_path, monkeypatch, capsys):
    stages = _load(monkeypatch, "gpu_check_stages")
    rep = _load(monkeypatch, "gpu_check_lib").Report(str(tmp_path))

    def broken(p):
        raise ValueError("no such tile\nsecond line")

    where = "stage 0, pallas, dQ, B=1 T=8 H=1 K=1 D=8 causal"
    stages._run_call(rep, where, "pallas dQ causal", broken, {"dq": jnp.ones(3)}, "dq")
    line = f"  {'pallas dQ causal':30s} FAILED [{where}] compile: ValueError: no such tile"
    assert capsys.readouterr().out == line + "\n"
    assert rep.failures == [f"{where}: compile: ValueError: no such tile"]
    log = (tmp_path / "gpu_check.log").read_text()
    assert f"=== {where} (compile) ===" in log and "Traceback" in log and "second line" in log
    [row] = json.loads((tmp_path / "gpu_check.json").read_text())["calls"]
    assert row["status"] == "FAILED" and row["where"] == where


def test_exit_status_is_1_when_anything_failed(tmp_path, monkeypatch):
    gpu_check = _load(monkeypatch, "gpu_check")
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main replaces it
    monkeypatch.setattr(
        gpu_check.stages, "stage_calls", lambda rep, *_: rep.fail("stage 0, x", "ValueError: y")
    )
    assert gpu_check.main(["--stages=calls", f"--out={tmp_path}"]) == 1
    text = (tmp_path / "gpu_check.txt").read_text().splitlines()
    assert text[-2].startswith("RESULT: FAIL, 1 failed")
    assert text[-1] == "  FAILED stage 0, x: ValueError: y"
    assert json.loads((tmp_path / "gpu_check.json").read_text())["meta"]["result"] == "FAIL"
