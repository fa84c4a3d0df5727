"""Stage 2 of gpu_check: fwd and fwd+bwd of every timed path, causal and unmasked, in turns (the
benchmarks' timer); TFLOP/s (the benchmarks' count) and the ratio of throughput to the baseline."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ringattn.bench import flops, timing
from ringattn.bench.check.paths import paths
from ringattn.bench.check.problems import make_data, mask_kwargs
from ringattn.bench.check.report import attempt, compile_and_run, shape_str


def _timed(attn, kw, mode):
    if mode == "fwd":
        return lambda q, k, v: attn(q, k, v, **kw)[0]

    def fwdbwd(q, k, v, do):
        def loss(q, k, v):
            return jnp.sum(attn(q, k, v, **kw)[0].astype(jnp.float32) * do.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return fwdbwd


def _dense_na(b, h, t, mode):
    """Why dense XLA attention cannot run: its f32 logits (B H T^2 4 bytes) and what they take
    in temporaries exceed the device's memory. On one H200 (H = 8) its temporaries were 1.4x
    the logits forward and 2.9x forward + backward (results/gpu_h200_core.txt): 2x and 3.5x
    here, to be safe."""
    try:
        limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - no memory figures on this backend
        limit = None
    need = b * h * t * t * 4 * (2 if mode == "fwd" else 3.5)
    if limit and need > limit:
        return f"its f32 logits need ~{need / 2**30:.0f} GiB, the device has {limit / 2**30:.0f}"
    return None


def _out_of_memory(why):
    return any(x in why for x in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))


def _time_group(rep, group, shape, data, names, iters, interpret, baseline):
    """Compile, run once and time every path of one (mask, T, mode); lines and rows."""
    (b, t, h, _, d), (mask, mode) = shape, group
    args = [data[x] for x in ("q", "k", "v", "do")[: 3 if mode == "fwd" else 4]]
    kw = mask_kwargs(mask, t)
    head = f"{mask:6s} T={t:<6d} {mode:6s}"
    all_paths, ready = paths(interpret), {}
    for name in names:
        path = all_paths[name]
        row = dict(mask=mask, T=t, mode=mode, path=name)
        where = f"stage 2, {name}, {mode}, {shape_str(*shape)} {mask}"
        why = path.na or (_dense_na(b, h, t, mode) if name == "jax xla" else None)
        if why is None:
            res, failed = compile_and_run(rep, where, _timed(path.attn, kw, mode), *args)
            if res is not None:
                ready[name] = lambda c=res[0]: c(*args)
                continue
            if name == "jax xla" and _out_of_memory(failed):
                why = f"its f32 logits do not fit: {failed}"
        if why is None:
            rep.line(f"  {head} {name:12s} FAILED [{where}] {failed}")
            rep.fail(where, failed)
            rep.record("timing", **row, status="FAILED", error=failed)
        else:
            rep.line(f"  {head} {name:12s} n/a: {why}")
            rep.record("timing", **row, status="n/a", why=why)
    ok, times = attempt(rep, f"stage 2, timing, {head}", timing.interleaved, ready, iters)
    if not ok:
        rep.line(f"  {head} FAILED while timing [stage 2, {shape_str(*shape)}] {times}")
        rep.fail(f"stage 2, timing, {head}", times)
        return rep.record("timing", mask=mask, T=t, mode=mode, status="FAILED", error=times)
    base_s = times.get(baseline)
    for name, sec in times.items():
        tflops = flops.attention_flops(b, h, d, t, mode, flops.mask_reach(mask)) / sec / 1e12
        ratio = base_s / sec if base_s else None
        vs = f"{ratio:5.2f}x {baseline.removeprefix('jax ')}" if ratio else ""
        rep.line(f"  {head} {name:12s} {sec * 1e3:9.3f} ms {tflops:7.2f} TFLOP/s {vs}")
        row = dict(mask=mask, T=t, mode=mode, path=name, status="ok", ms=sec * 1e3)
        rep.record("timing", **row, tflops=tflops, ratio=ratio)


def stage_timing(rep, shape, lens, names, iters, budget_s, interpret, baseline="jax cudnn"):
    """Stage 2: fwd and fwd+bwd, causal and unmasked, every path; TFLOP/s and the ratio of
    throughput to the `baseline` path's (JAX's own fused attention). Groups that would start
    past `budget_s` (seconds since the start) are not run."""
    b, h, kh, d = shape
    rep.line(
        f"== stage 2 [{rep.elapsed():.0f} s]: timing (bf16, B={b} H={h} K={kh} D={d}; median of "
        f"{iters} interleaved runs; TFLOP/s count visible pairs only: causal about half) =="
    )
    for t in sorted(lens, reverse=True):  # what the targets need first, if time runs out
        data = make_data(b, t, h, kh, d)
        for group in (("causal", "fwdbwd"), ("causal", "fwd"), ("none", "fwdbwd"), ("none", "fwd")):
            if budget_s and rep.elapsed() > budget_s:
                why = f"over the time budget (--budget_s={budget_s:g})"
                rep.line(f"  {group[0]:6s} T={t:<6d} {group[1]:6s} n/a: {why}")
                rep.record("timing", mask=group[0], T=t, mode=group[1], status="n/a", why=why)
                continue
            _time_group(rep, group, (b, t, h, kh, d), data, names, iters, interpret, baseline)
