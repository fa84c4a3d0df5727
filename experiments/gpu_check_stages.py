"""The three stages of experiments/gpu_check.py: every kernel call on its own (stage 0),
correctness against an f32 reference (stage 1) and timing against cuDNN (stage 2). Each reports
through gpu_check_lib.Report: a line per call, check or timed path; failures go on (a failure is
one line naming where, its traceback in the log)."""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
from gpu_check_lib import (
    GRADS,
    TOL,
    attempt,
    auto_kernel,
    compile_and_run,
    describe,
    highest_precision,
    make_data,
    mask_kwargs,
    paths,
    reference,
    rel_errors,
    shape_str,
)

import ringattn
from ringattn.attention import inputs, masks
from ringattn.attention.kernels import base, cudnn, dispatch, pallas_bwd, pallas_fwd, splash
from ringattn.attention.kernels.cudnn import Cudnn
from ringattn.attention.kernels.pallas_gpu import PallasGpu

# ---------------------------------------------------------------------------------------------
# Stage 0: every kernel call on its own.


def _call_problem(shape, causal):
    """Inputs and the f32 reference of one small call (dlse = 0), and the reference's state
    after the first half of the keys (what a continued forward starts from)."""
    b, t, h, kh, d = shape
    data = make_data(b, t, h, kh, d)
    kw = {"causal": causal}
    out, lse, dq, dk, dv = reference(data, kw, jnp.zeros((b, h, t), jnp.float32))
    half = t // 2
    pos = jnp.arange(t)
    f32 = [data[x].astype(jnp.float32)[:, : (t if x == "q" else half)] for x in "qkv"]
    with highest_precision():
        o_half, lse_half = ringattn.reference_attention(
            *f32, q_positions=pos, kv_positions=pos[:half], return_lse=True, **kw
        )
    p = dict(q=data["q"], k=data["k"], v=data["v"], do=data["do"], out=out.astype(jnp.bfloat16))
    return dict(p, lse=lse, dq=dq, dk=dk, dv=dv, o_half=o_half, lse_half=lse_half)


def _kernel_config(kern, causal, shape):
    b, t, h, kh, d = shape
    kern = kern.fit(t, t)
    spec = masks.MaskSpec(causal, None)
    blocks = kern.blocks(None, None, t, t)
    return base.Config(spec, d**-0.5, None, *blocks, t, jnp.bfloat16, kern, None, t)


def _operands(cfg, p):
    pos = jnp.arange(p["q"].shape[1], dtype=jnp.int32)[None]
    m = inputs.MaskArrays(pos, pos, None, None)
    qs, q_, (k_, v_, kpos, kseg) = base.prepare(cfg, p["q"], p["k"], p["v"], m)
    do, out = (p[x].astype(jnp.float32) for x in ("do", "out"))
    delta = jnp.moveaxis(jnp.sum(do * out, -1), 1, 2)
    b = base.BwdInputs(p["out"], p["do"], masks.backward_lse(p["lse"]), delta, jnp.asarray(False))
    bwd = cfg.kernel.prepare_bwd(cfg, p["q"], p["k"], b)
    return q_, k_, v_, qs, base.kv_side(cfg, kpos, kseg), bwd


def pallas_calls(cfg):
    """Our Pallas kernel's three pallas_calls, fresh and continuing a state (name -> fn(p) ->
    results comparable to p's reference)."""
    kern, c = cfg.kernel, cfg.scale

    def fwd(p, continued=False):
        q_, k_, v_, qs, ks, _ = _operands(cfg, p)
        if not continued:
            return pallas_fwd.forward(kern, cfg, q_, k_, v_, qs, ks)
        h = k_.shape[1] // 2
        rest = dataclasses.replace(cfg, kv_len=cfg.kv_len - h)
        ks2 = base.kv_side(cfg, ks.pos[:, h:], None)
        state = (p["o_half"], p["lse_half"])
        return pallas_fwd.forward(kern, rest, q_, k_[:, h:], v_[:, h:], qs, ks2, state=state)

    def dkv(p, continued=False):  # continued: the reference's gradients in, twice them out
        q_, k_, v_, qs, ks, (do_, lse_, aux) = _operands(cfg, p)
        grads = (p["dk"] / c, p["dv"]) if continued else None
        dk, dv = pallas_bwd.backward_dkv(kern, cfg, q_, k_, v_, do_, lse_, aux.delta, qs, ks, grads)
        return (dk * c / 2, dv / 2) if continued else (dk * c, dv)

    def dq(p, continued=False):
        q_, k_, v_, qs, ks, (do_, lse_, aux) = _operands(cfg, p)
        given = p["dq"] / c if continued else None
        dq = pallas_bwd.backward_dq(kern, cfg, q_, k_, v_, do_, lse_, aux.delta, qs, ks, given)
        return (dq * c / 2,) if continued else (dq * c,)

    calls = {}
    for name, fn, want in (("fwd", fwd, "out lse"), ("dK/dV", dkv, "dk dv"), ("dQ", dq, "dq")):
        calls[name] = (fn, want)
        calls[f"{name} continued"] = (lambda p, fn=fn: fn(p, True), want)
    return calls


def cudnn_calls(cfg):
    causal, c = cfg.spec.causal, cfg.scale

    def fwd(p):
        out, lse = cudnn.cudnn_fwd(p["q"], p["k"], p["v"], c, causal)
        return out.astype(jnp.float32), lse

    def bwd(p):
        return cudnn.cudnn_bwd(p["q"], p["k"], p["v"], p["out"], p["lse"], p["do"], c, causal)

    return {"fwd": (fwd, "out lse"), "bwd": (bwd, "dq dk dv")}


def fused_calls(cfg):
    """A fused kernel's fresh forward and backward passes (splash attention's on TPUs)."""
    kern = cfg.kernel

    def fwd(p):
        q_, k_, v_, qs, ks, _ = _operands(cfg, p)
        return kern.finish_fwd(cfg, p["q"], kern.attend(cfg, q_, k_, v_, qs, ks))

    def bwd(p):
        q_, k_, v_, qs, ks, b = _operands(cfg, p)
        grads = kern.attend_bwd(cfg, q_, k_, v_, b, qs, ks)
        return kern.finish_bwd(cfg, p["q"], p["k"], p["v"], grads)

    return {"fwd": (fwd, "out lse"), "bwd": (bwd, "dq dk dv")}


def _run_call(rep, where, label, fn, p, want):
    res, why = compile_and_run(rep, where, fn, p)
    if res is None:
        rep.line(f"  {label:30s} FAILED [{where}] {why}")
        rep.fail(where, why)
        return rep.record("calls", where=where, status="FAILED", error=why)
    _, got, compile_s, run_s = res
    names = want.split()
    errs = rel_errors(jax.device_get(got), [p[x] for x in names])
    status = "ok" if max(errs) <= TOL else "FAIL"
    detail = " ".join(f"{n}={e:.1e}" for n, e in zip(names, errs, strict=True))
    rep.line(
        f"  {label:30s} {status:4s}  compile {compile_s:5.1f} s, first run {run_s * 1e3:7.1f} ms;"
        f" vs f32: {detail}"
    )
    if status == "FAIL":
        rep.fail(where, f"error vs the f32 reference above {TOL}: {detail}")
    errors = dict(zip(names, errs, strict=True))
    rep.record("calls", where=where, status=status, compile_s=compile_s, errors=errors)


def stage_calls(rep, shape, mask_kinds, interpret, hardware="cuda"):
    """Stage 0: each kernel call compiled and run on its own at one small shape, per mask kind
    ("none", "causal"), against the f32 reference, so that a failure names the call: our Pallas
    kernel's and cuDNN's for "cuda", splash attention's for "tpu"."""
    shp = shape_str(*shape)
    rep.line(
        f"== stage 0 [{rep.elapsed():.0f} s]: every kernel call on its own, vs the f32 reference "
        f"(bf16, {shp}) =="
    )
    on = dispatch.platform()
    kernels = (
        ("pallas", PallasGpu(interpret=interpret), pallas_calls),
        ("cudnn", Cudnn(), cudnn_calls),
        ("splash", splash.PallasTpu(interpret=interpret and hardware == "tpu"), fused_calls),
    )
    kernels = kernels[2:] if hardware == "tpu" else kernels
    na = {
        "pallas": None if on == "gpu" or interpret else f"needs a GPU (platform {on})",
        "cudnn": cudnn.unavailable_reason(),
        "splash": None if on == "tpu" or kernels[-1][1].interpret else f"not a TPU (platform {on})",
    }
    for mask in mask_kinds:
        causal = mask == "causal"
        p = _call_problem(shape, causal)
        for kname, kern, calls in kernels:
            cfg = _kernel_config(kern, causal, shape)
            for call, (fn, want) in calls(cfg).items():
                label, where = f"{kname} {call} {mask}", f"stage 0, {kname}, {call}, {shp} {mask}"
                if na[kname] is not None:
                    rep.line(f"  {label:30s} n/a: {na[kname]}")
                    rep.record("calls", where=where, status="n/a", why=na[kname])
                else:
                    _run_call(rep, where, label, fn, p, want)
        where = f"stage 0, auto, kernel choice, {shp} {mask}"
        ok, res = attempt(rep, where, auto_kernel, p["q"], p["k"], p["v"], causal=causal)
        if ok:
            rep.line(f"  {'auto ' + mask:30s} runs {describe(res)}")
        else:
            rep.line(f"  {'auto ' + mask:30s} FAILED [{where}] {res}")
            rep.fail(where, res)


# ---------------------------------------------------------------------------------------------
# Stage 1: correctness.


def _check(rep, where, label, attn, data, kw, dlse, want):
    """One path's (out, lse, dq, dk, dv) against `want`; forward and backward compile apart."""
    q, k, v, do = (data[x] for x in ("q", "k", "v", "do"))
    fwd = jax.jit(lambda q, k, v: jax.vjp(lambda q, k, v: attn(q, k, v, **kw), q, k, v))
    ok, res = attempt(rep, f"{where} fwd", lambda: jax.block_until_ready(fwd(q, k, v)))
    if ok:
        (out, lse), vjp = res
        bwd = jax.jit(lambda f, ct: f(ct))
        ok, res = attempt(rep, f"{where} bwd", lambda: jax.device_get(bwd(vjp, (do, dlse))))
        why = f"bwd: {res}"
    else:
        why = f"fwd: {res}"
    if not ok:
        rep.line(f"  {label:44s} FAILED [{where}] {why}")
        rep.fail(where, why)
        return rep.record("checks", where=where, status="FAILED", error=why)
    errs = rel_errors(jax.device_get((out, lse, *res)), want)
    status = "PASS" if max(errs) <= TOL else "FAIL"
    detail = " ".join(f"{n}={e:.1e}" for n, e in zip(GRADS, errs, strict=True))
    rep.line(f"  {label:44s} {status}  {detail}")
    if status == "FAIL":
        rep.fail(where, f"error vs the f32 reference above {TOL}: {detail}")
    rep.record("checks", where=where, status=status, errors=dict(zip(GRADS, errs, strict=True)))


def _auto_label(name, data, kw):
    """' [the kernel auto runs]' for the auto paths (on one shard for the ring), else ''."""
    if not name.endswith("auto"):
        return ""
    n = 2 if name.startswith("ring2") else 1
    t = data["q"].shape[1] // n
    kw = {k: (v[:, :t] if k == "segment_ids" else v) for k, v in kw.items()}
    try:
        return f" [{describe(auto_kernel(*(data[x][:, :t] for x in 'qkv'), **kw))}]"
    except Exception:  # noqa: BLE001 - the check itself reports it
        return " [?]"


def stage_checks(rep, shape, lens, mask_kinds, names, interpret):
    """Stage 1: every path and mask kind against the f32 reference, out, lse and the
    gradients; the cuDNN paths with a zero lse cotangent (cuDNN's backward cannot take one)."""
    b, h, kh, d = shape
    rep.line(
        f"== stage 1 [{rep.elapsed():.0f} s]: correctness vs the f32 reference (bf16, "
        f"B={b} H={h} K={kh} D={d}, T in {list(lens)}; max |err| / max |ref| <= {TOL}) =="
    )
    all_paths = paths(interpret)
    for t in lens:
        data = make_data(b, t, h, kh, d, seed=t)
        shp = shape_str(b, t, h, kh, d)
        for mask in mask_kinds:
            kw = mask_kwargs(mask, t, data["seg"])
            want = {}
            for name in names:
                path = all_paths[name]
                cot = "dlse" if path.dlse else "dlse=0"
                label = f"{mask:8s} T={t:<5d} {name:12s} {cot:6s}" + _auto_label(name, data, kw)
                where = f"stage 1, {name}, fwd+bwd, {shp} {mask}"
                if path.na is not None:
                    rep.line(f"  {label:44s} n/a: {path.na}")
                    rep.record("checks", where=where, status="n/a", why=path.na)
                    continue
                dlse = data["dlse"] if path.dlse else jnp.zeros_like(data["dlse"])
                if cot not in want:
                    want[cot] = jax.device_get(reference(data, kw, dlse))
                _check(rep, where, label, path.attn, data, kw, dlse, want[cot])


# ---------------------------------------------------------------------------------------------
# Stage 2: timing.


def flops(b, h, d, t, mask, mode):
    """FlashAttention-2's count: visible (query, key) pairs only (causal: T (T + 1) / 2), 4 D
    per pair and head forward, 14 D forward + backward."""
    pairs = t * (t + 1) // 2 if mask == "causal" else t * t
    return pairs * b * h * d * (4 if mode == "fwd" else 14)


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


def _interleaved(calls, iters):
    """Median seconds per call; the calls take turns, round after round, so that load and clock
    changes fall on all of them alike."""
    times = {name: [] for name in calls}
    for _ in range(iters):
        for name, call in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


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
    ok, times = attempt(rep, f"stage 2, timing, {head}", _interleaved, ready, iters)
    if not ok:
        rep.line(f"  {head} FAILED while timing [stage 2, {shape_str(*shape)}] {times}")
        rep.fail(f"stage 2, timing, {head}", times)
        return rep.record("timing", mask=mask, T=t, mode=mode, status="FAILED", error=times)
    base_s = times.get(baseline)
    for name, sec in times.items():
        tflops = flops(b, h, d, t, mask, mode) / sec / 1e12
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
