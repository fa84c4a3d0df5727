"""gpu_check's stages as tests on the device they check, at --quick's plan: `pytest -m gpu` on a
GPU machine (our Pallas kernel's and cuDNN's calls, every path against the f32 reference, the
timing against cuDNN), `pytest -m tpu` on a TPU (splash attention's); skipped elsewhere
(tests/bench/conftest.py). The one-command report, with the targets: experiments/gpu_check.py.

They run as gpu_check does, without float64 (the tests' conftest turns it on)."""

import jax
import pytest

from ringattn.bench.check import report, run
from ringattn.bench.hardware import HARDWARE

STAGES = ("calls", "checks", "timing")
KERNELS = {"cuda": ("pallas", "cudnn"), "tpu": ("splash",)}  # stage 0's, by platform


@pytest.fixture
def no_x64():
    with jax.enable_x64(False):
        yield


def _run_stage(platform, stage):
    """The Report of one stage of --quick's plan for `platform`, after asserting it failed
    nowhere."""
    rep = report.Report()
    plan = run.make_plan(quick=True, interpret=False, platform=platform)
    run.stage_work(rep, stage, plan, interpret=False)()
    assert rep.failures == [], "\n".join(rep.failures)
    return rep


def _assert_ran(rep, stage, platform):
    """What `platform` runs in `stage` ran, none of it n/a, and met the f32 reference where the
    stage checks against it: its kernels' calls (stage 0), its paths (stages 1 and 2)."""
    good = {"calls": "ok", "checks": "PASS", "timing": "ok"}[stage]
    rows = rep.figures[stage]
    assert any(r["status"] == good for r in rows), rows
    assert all(r["status"] in (good, "n/a") for r in rows), rows
    if stage == "calls":  # where: "stage 0, KERNEL, CALL, SHAPE MASK"
        mine = [r for r in rows if r["where"].split(", ")[1] in KERNELS[platform]]
    elif stage == "checks":  # where: "stage 1, PATH, fwd+bwd, SHAPE MASK"
        mine = rows
    else:
        mine = [r for r in rows if r["path"] in HARDWARE[platform].time_paths]
        assert {r["path"] for r in mine} == set(HARDWARE[platform].time_paths)
        assert all(r["ms"] > 0 and r["tflops"] > 0 and r["ratio"] > 0 for r in mine)
    assert mine and all(r["status"] == good for r in mine), mine


@pytest.mark.gpu
@pytest.mark.parametrize("stage", STAGES)
def test_gpu_stage(stage, no_x64):
    _assert_ran(_run_stage("cuda", stage), stage, "cuda")


@pytest.mark.tpu
@pytest.mark.parametrize("stage", STAGES)
def test_tpu_stage(stage, no_x64):
    _assert_ran(_run_stage("tpu", stage), stage, "tpu")
