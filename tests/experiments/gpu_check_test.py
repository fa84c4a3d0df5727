"""experiments/gpu_check.py: end to end on the CPU (--interpret --quick, and --lower --quick
with nothing but JAX importable) as a subprocess from a copy of the checkout where nothing of
ours is importable, so only the script's own sys.path set-up can find ringattn (as on a GPU
machine with JAX alone); and the package's check code importing with JAX alone. The check code
itself, in-process: tests/bench/check_test.py."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PALLAS_CALLS = ("fwd", "fwd continued", "dK/dV", "dK/dV continued", "dQ", "dQ continued")

# `python -I` ignores PYTHONPATH, the user's site-packages and the script's directory; the
# editable install of ringattn is an import hook that site-packages installs, dropped here.
NO_EDITABLE = """\
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
"""
BARE = (
    NO_EDITABLE
    + """\
import runpy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
)
# Nothing importable from site-packages but JAX and its dependencies (as on a machine with `pip
# install jax` alone; the checkout is found by the script): other packages raise
# ModuleNotFoundError.
JAX_ALONE = """\
import importlib.machinery, sys, sysconfig
SITE = tuple(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
JAX = ("jax", "jaxlib", "ml_dtypes", "numpy", "opt_einsum", "scipy")
class JaxAlone:
    def find_spec(self, name, path=None, target=None):
        if "." in name or name in JAX:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and (spec.origin or "").startswith(SITE):
            raise ModuleNotFoundError(f"No module named {name!r} (JAX alone)", name=name)
sys.meta_path.insert(0, JaxAlone())
"""


def _run_bare(tmp, *args, prelude=""):
    """(completed process, checkout copy, --out dir) of gpu_check.py `args` from a copy."""
    checkout, out = tmp / "checkout", tmp / "out"
    for name in ("ringattn", "experiments"):
        ignore = shutil.ignore_patterns("__pycache__", "results")
        shutil.copytree(os.path.join(ROOT, name), checkout / name, ignore=ignore)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "XLA_", "JAX_"))}
    script = str(checkout / "experiments" / "gpu_check.py")
    cmd = [sys.executable, "-I", "-c", prelude + BARE, script, *args, f"--out={out}"]
    proc = subprocess.run(
        cmd, cwd=tmp, env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    return proc, checkout, out


@pytest.fixture(scope="module")
def bare_run(tmp_path_factory):
    return _run_bare(tmp_path_factory.mktemp("gpu_check"), "--interpret", "--quick")


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


def test_lower_quick_from_a_bare_checkout_with_jax_alone(tmp_path):
    """--lower --quick on this CPU with nothing but JAX importable: every fused kernel's passes
    and the whole programs lower for CUDA (Triton calls) and TPU (Mosaic calls); cuDNN and the
    LM's train step (flax) are n/a, said so."""
    proc, _, out = _run_bare(tmp_path, "--lower", "--quick", prelude=JAX_ALONE)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.splitlines()[0].startswith("gpu_check: lower, quick;")
    for mask in ("none", "causal", "window", "segments", "soft cap"):
        line = rf"  cuda pallas passes, {mask}, bfloat16, D=128 +ok .* ringattn_dq \(in place\) x1"
        assert len(_lines(proc, line)) == 1, mask
    for mask in ("none", "causal", "window", "segments"):
        assert len(_lines(proc, rf"  tpu  splash passes, {mask}, .* ok .* splash_mqa_dq_")) == 1
    assert len(_lines(proc, r"  tpu  splash passes, soft cap, .* n/a: .*soft cap")) == 1
    assert len(_lines(proc, r"  cuda cudnn passes \(every case\) +n/a: cuDNN not detected")) == 1
    for strategy in ("ring", "allgather", "ulysses", "hybrid"):
        label = rf"{strategy} fwd\+bwd \(8 devices\) +ok "
        assert len(_lines(proc, rf"  cuda {label}.*ringattn_fwd.*")) == 1, strategy
        assert len(_lines(proc, rf"  tpu  {label}.*splash_mqa_fwd.*")) == 1, strategy
    assert len(_lines(proc, r"  (cuda|tpu ) LM train step, impl=ring +n/a: needs flax")) == 2
    assert "FAILED" not in proc.stdout and "targets" not in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("RESULT: PASS, 0 failed")
    rows = json.loads((out / "gpu_check.json").read_text())["lower"]
    assert [r["status"] for r in rows].count("ok") == 6 + 4 + 2 * 5  # passes, programs


def test_check_code_imports_with_jax_alone():
    """ringattn and what gpu_check imports of it (the check code, the timer, the FLOP count, the
    hardware table) import with nothing but JAX: no absl, flax, matplotlib or ml_collections."""
    code = (
        JAX_ALONE
        + BARE.splitlines()[1]
        + f"""
sys.path.insert(0, {ROOT!r})
import ringattn, ringattn.bench.check.run, ringattn.bench.flops, ringattn.bench.timing
print(ringattn.__file__)
print(sorted(m for m in ("absl", "flax", "matplotlib", "ml_collections") if m in sys.modules))
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "XLA_", "JAX_"))}
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code], env=dict(env, JAX_PLATFORMS="cpu"),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.splitlines() == [os.path.join(ROOT, "ringattn", "__init__.py"), "[]"]
