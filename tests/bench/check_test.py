"""gpu_check's library (ringattn/bench/check) in this process: its data, the ring it emulates
through a kernel's passes (against the float64 reference, with and without jit), a failure as one
line and a logged traceback, the exit status, the lowering stage's verdict, the TPU mode."""

import json
import os
import re
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ringattn
from ringattn.bench.check import calls, lower, paths, problems, report, run
from ringattn.bench.check.emulated_ring import emulated_ring
from ringattn.bench.hardware import HARDWARE


def test_make_data_shapes_and_dtypes():
    data = problems.make_data(2, 48, 4, 2, 16, seed=1)
    shapes = dict(q=(2, 48, 4, 16), k=(2, 48, 2, 16), v=(2, 48, 2, 16), do=(2, 48, 4, 16))
    chex.assert_trees_all_equal_shapes(
        {name: data[name] for name in shapes}, {n: np.empty(s) for n, s in shapes.items()}
    )
    chex.assert_type([data[name] for name in shapes], jnp.bfloat16)
    chex.assert_shape(data["dlse"], (2, 4, 48))
    chex.assert_type(data["dlse"], jnp.float32)
    chex.assert_shape(data["seg"], (2, 48))
    seg = np.asarray(data["seg"])
    assert seg.dtype == np.int32 and (np.diff(seg, axis=1) >= 0).all() and seg.max() <= 2


def _ring_errors(n, mask, wrap=jax.jit):
    """max |err| / max |ref| of out, lse, dq, dk, dv of the ring emulated over n shards through
    the XLA kernel (float64; called through `wrap`) against the dense float64 reference."""
    rng = np.random.default_rng(n)
    q, do = (jnp.asarray(rng.standard_normal((2, 16, 4, 8))) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((2, 16, 2, 8))) for _ in range(2))
    dlse = jnp.asarray(rng.standard_normal((2, 4, 16)))
    kw = {key: val for key, val in mask.items() if key != "segments"}
    if "segments" in mask:
        kw["segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (2, 16)), axis=1), jnp.int32)

    def grads(attn):
        def run_all(q, k, v, do, dlse):
            (out, lse), vjp = jax.vjp(lambda q, k, v: attn(q, k, v, **kw), q, k, v)
            return (out, lse, *vjp((do, dlse)))

        return run_all

    ring = grads(lambda q, k, v, **kw: emulated_ring(q, k, v, kernel="xla", n=n, **kw))
    ref = grads(lambda q, k, v, **kw: ringattn.reference_attention(q, k, v, return_lse=True, **kw))
    got, want = wrap(ring)(q, k, v, do, dlse), jax.jit(ref)(q, k, v, do, dlse)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    errors = [np.abs(g - w).max() / np.abs(w).max() for g, w in zip(got, want, strict=True)]
    return dict(zip(problems.GRADS, errors, strict=True))


class EmulatedRingTest(chex.TestCase):
    """The emulated ring (q shard i against every k/v shard in ring order, one kernel state) is
    exact, eagerly and under jit."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_the_reference(self):
        errors = _ring_errors(2, {"causal": True, "segments": True}, self.variant)
        assert max(errors.values()) <= 1e-12, errors


def test_emulated_ring_of_4_shards_with_a_window():
    errors = _ring_errors(4, {"local_window_size": (3, 2)})
    assert max(errors.values()) <= 1e-12, errors


def test_emulated_ring_refuses_a_length_it_cannot_split():
    x = jnp.zeros((1, 10, 1, 8))
    with pytest.raises(ValueError, match=r"T \(10\) must be a multiple of n \(4\)"):
        emulated_ring(x, x, x, kernel="xla", n=4)


def test_a_failing_call_is_one_line_and_a_logged_traceback(tmp_path, capsys):
    rep = report.Report(str(tmp_path))

    def broken(p):
        raise ValueError("no such tile\nsecond line")

    where = "stage 0, pallas, dQ, B=1 T=8 H=1 K=1 D=8 causal"
    calls._run_call(rep, where, "pallas dQ causal", broken, {"dq": jnp.ones(3)}, "dq")
    line = f"  {'pallas dQ causal':30s} FAILED [{where}] compile: ValueError: no such tile"
    assert capsys.readouterr().out == line + "\n"
    assert rep.failures == [f"{where}: compile: ValueError: no such tile"]
    log = (tmp_path / "gpu_check.log").read_text()
    assert f"=== {where} (compile) ===" in log and "Traceback" in log and "second line" in log
    [row] = json.loads((tmp_path / "gpu_check.json").read_text())["calls"]
    assert row["status"] == "FAILED" and row["where"] == where


def test_exit_status_is_1_when_anything_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # run replaces it
    monkeypatch.setattr(
        calls, "stage_calls", lambda rep, *_: rep.fail("stage 0, x", "ValueError: y")
    )
    assert run.run(run.Options(stages="calls", out=str(tmp_path))) == 1
    text = (tmp_path / "gpu_check.txt").read_text().splitlines()
    assert text[-2].startswith("RESULT: FAIL, 1 failed")
    assert text[-1] == "  FAILED stage 0, x: ValueError: y"
    assert json.loads((tmp_path / "gpu_check.json").read_text())["meta"]["result"] == "FAIL"


def test_options_refuse_unknown_stages_and_platforms():
    with pytest.raises(ValueError, match=r"stages: expected names from .* got \['call'\]"):
        run.Options(stages="call,timing")
    with pytest.raises(ValueError, match="platform: expected one of"):
        run.Options(platform="rocm")


def test_a_lowered_program_without_its_kernels_fails(tmp_path):
    """A program that lowers but calls none of the kernels expected (fell back to XLA) is one
    FAILED line naming what is missing, like one that does not lower."""
    rep = report.Report(str(tmp_path))
    lower._line(rep, "tpu", "ring fwd+bwd", lambda: "%0 = stablehlo.add %a, %a", lower.SPLASH)
    lower._line(rep, "tpu", "ulysses fwd+bwd", lambda: 1 / 0, lower.SPLASH)
    assert [f.split(": ", 1)[0] for f in rep.failures] == [
        "lower, tpu, ring fwd+bwd",
        "lower, tpu, ulysses fwd+bwd",
    ]
    assert (
        "lowered without ['splash_mqa_fwd', 'splash_mqa_dkv', 'splash_mqa_dq']" in rep.failures[0]
    )
    assert rep.failures[1].endswith("ZeroDivisionError: division by zero")
    assert [r["status"] for r in rep.figures["lower"]] == ["FAILED", "FAILED"]


def test_tpu_mode_checks_splash_calls_and_its_baseline(tmp_path, monkeypatch, capsys):
    """--platform=tpu (in the TPU interpreter here): stage 0 runs splash attention's calls
    through our splash path, none of the GPU kernels'; the timing baseline, JAX's splash on its
    own, agrees with the f32 reference."""
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # run replaces it
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # --interpret adds flags
    options = run.Options(
        platform="tpu", interpret=True, quick=True, stages="calls", out=str(tmp_path)
    )
    assert run.run(options) == 0
    out = capsys.readouterr().out
    assert out.startswith("gpu_check: tpu checks, quick, interpret;")
    for call in ("fwd", "bwd"):
        assert len(re.findall(rf"\n  splash {call} causal +ok  ", out)) == 1, out
    assert "pallas" not in out and "cudnn" not in out
    assert "  auto (blockwise) >= 0.85x splash " in out  # the TPU's targets

    data = problems.make_data(1, 128, 2, 1, 32)
    q, k, v = (data[x] for x in "qkv")
    want = problems.reference(data, {"causal": True}, jnp.zeros((1, 2, 128), jnp.float32))[0]
    baseline = paths.paths(interpret=True)[HARDWARE["tpu"].baseline].attn
    got, lse = jax.jit(lambda q, k, v: baseline(q, k, v, causal=True))(q, k, v)
    assert lse is None and report.rel_errors([got], [want])[0] <= problems.TOL
