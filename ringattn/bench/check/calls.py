"""Stage 0 of gpu_check: every kernel call compiled and run on its own at one small shape, against
the f32 reference, so that a failure names the call: our Pallas kernel's three pallas_calls (fresh
and continuing a state), cuDNN's forward and backward, splash attention's passes on TPUs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import ringattn
from ringattn.attention import inputs, masks
from ringattn.attention.kernels import base, cudnn, dispatch, pallas_bwd, pallas_fwd, splash
from ringattn.attention.kernels.cudnn import Cudnn
from ringattn.attention.kernels.pallas_gpu import PallasGpu
from ringattn.bench.check.paths import auto_kernel, describe
from ringattn.bench.check.problems import TOL, highest_precision, make_data, reference
from ringattn.bench.check.report import attempt, compile_and_run, rel_errors, shape_str


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
