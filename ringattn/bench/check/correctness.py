"""Stage 1 of gpu_check: every path and mask kind against the f32 reference, out, lse and the
gradients; forward and backward compile apart, so that a failure names which."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ringattn.bench.check.paths import auto_kernel, describe, paths
from ringattn.bench.check.problems import GRADS, TOL, make_data, mask_kwargs, reference
from ringattn.bench.check.report import attempt, rel_errors, shape_str


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
