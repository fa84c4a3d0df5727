"""The backward pallas_calls of our GPU kernel, from (q, k, v, do, lse, delta):

  dK/dV     grid (k blocks, B, K): a key block streams the q blocks of all G query heads that
            share its KV head, so the group reduction happens in registers, without atomics.
  dQ        grid (q blocks, B, H): a q block streams the key blocks.

delta = rowsum(do * o) - dlse is the usual pre-pass, done by XLA (a fused elementwise +
reduction). Gradients are f32 and without the softmax scale, like the XLA kernel's.
`pl.program_id` is read at the top level of each kernel only, so interpret mode runs them.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ringattn.attention.kernels import pallas_common as pc
from ringattn.attention.kernels.base import soft_cap, soft_cap_slope
from ringattn.attention.masks import FULL


def _tile_ds(q, k, do, v, lse, delta, scale, cap, mask_args, state):
    """(p, ds) of one tile: p = exp(s - lse), masked (`pc.visible(*mask_args)`) unless the tile
    is FULL, ds = p (dp - delta) times the soft cap's slope; mask_args is None without a mask."""
    s = soft_cap(pc.dot(q, k) * scale, cap)
    p = jnp.exp2(s * pc.LOG2E - lse[:, None])
    if mask_args is not None:  # the mask is built only in PARTIAL tiles
        p = lax.cond(
            state == FULL, lambda p: p, lambda p: jnp.where(pc.visible(*mask_args), p, 0.0), p
        )
    ds = p * (pc.dot(do, v) - delta[:, None])
    if cap is not None:
        ds = ds * soft_cap_slope(s, cap)
    return p, ds


def _dkv_kernel(r, dk_ref, dv_ref, *, spec, scale, cap, bq, bk, kv_len, nq, g, masked, has_grads):
    j = pl.program_id(0)  # the key block
    k_start = pl.multiple_of(j * bk, bk)
    k, v = r["k"][...], r["v"][...]
    dk = r["dk_in"][...] if has_grads else jnp.zeros(k.shape, jnp.float32)
    dv = r["dv_in"][...] if has_grads else jnp.zeros(v.shape, jnp.float32)
    if masked:
        kv_pos, kv_seg = r["kv_pos"][...], pc.load(r, "kv_seg")
        lo, hi = r["bounds"][0], r["bounds"][1]
    else:
        lo, hi = 0, nq

    def over_q(i, carry, gi):
        dk, dv = carry
        q_sl = pl.ds(pl.multiple_of(i * bq, bq), bq)
        q, do = r["q"][q_sl, gi, :], r["do"][q_sl, gi, :]
        lse, delta = r["lse"][gi, q_sl] * pc.LOG2E, r["delta"][gi, q_sl]
        mask_args, state = None, None
        if masked:
            q_pos, q_seg = r["q_pos"][q_sl], pc.load(r, "q_seg", q_sl)
            mask_args = (spec, kv_len, q_pos, kv_pos, q_seg, kv_seg, k_start, bk)
            state = r["state"][i]
        p, ds = _tile_ds(q, k, do, v, lse, delta, scale, cap, mask_args, state)
        dv = dv + pc.dot(p.astype(do.dtype), do, (0, 0))
        return dk + pc.dot(ds.astype(q.dtype), q, (0, 0)), dv

    def over_group(gi, carry):  # the G query heads that share this KV head
        return lax.fori_loop(lo, hi, functools.partial(over_q, gi=gi), carry)

    dk, dv = lax.fori_loop(0, g, over_group, (dk, dv))
    dk_ref[...] = dk
    dv_ref[...] = dv


def _dq_kernel(r, dq_ref, *, spec, scale, cap, bk, kv_len, nk, masked, has_grads):
    q, do = r["q"][...], r["do"][...]
    lse, delta = r["lse"][...] * pc.LOG2E, r["delta"][...]
    dq = r["dq_in"][...] if has_grads else jnp.zeros(q.shape, jnp.float32)
    if masked:
        q_pos, q_seg = r["q_pos"][...], pc.load(r, "q_seg")
        lo, hi = r["bounds"][0], r["bounds"][1]
    else:
        lo, hi = 0, nk

    def body(j, dq):
        k_start = pl.multiple_of(j * bk, bk)
        k_sl = pl.ds(k_start, bk)
        k, v = r["k"][k_sl, :], r["v"][k_sl, :]
        mask_args, state = None, None
        if masked:
            kv_pos, kv_seg = r["kv_pos"][k_sl], pc.load(r, "kv_seg", k_sl)
            mask_args = (spec, kv_len, q_pos, kv_pos, q_seg, kv_seg, k_start, bk)
            state = r["state"][j]
        _, ds = _tile_ds(q, k, do, v, lse, delta, scale, cap, mask_args, state)
        return dq + pc.dot(ds.astype(k.dtype), k, (1, 0))

    dq_ref[...] = lax.fori_loop(lo, hi, body, dq)


def _mask_inputs(call, qs, ks, tab, blocks, by_q):
    """Positions, segments, tile states and block runs for a backward grid: by q block (dQ,
    program (i, b, head): q block i against every key) or by key block (dK/dV, program
    (j, b, kv head): key block j against every query). `blocks` = (q block, key block) sizes."""
    pq, pk = qs.pos.shape[0], ks.pos.shape[0]
    q_at = (lambda a: a) if by_q else (lambda a: 0)  # noqa: E731
    k_at = (lambda a: 0) if by_q else (lambda a: a)  # noqa: E731
    bq, bk = blocks
    call.add("q_pos", qs.pos, (None, bq), lambda a, bb, c: (bb if pq > 1 else 0, q_at(a)))
    call.add("kv_pos", ks.pos, (None, bk), lambda a, bb, c: (bb if pk > 1 else 0, k_at(a)))
    call.add("q_seg", qs.seg, (None, bq), lambda a, bb, c: (bb, q_at(a)))
    call.add("kv_seg", ks.seg, (None, bk), lambda a, bb, c: (bb, k_at(a)))
    nq, nk = tab.state.shape[1:]
    if by_q:
        call.add("state", tab.state, (None, None, nk), lambda a, bb, c: (bb, a, 0))
        call.add("bounds", tab.q_bounds, (None, None, 2), lambda a, bb, c: (bb, a, 0))
    else:
        call.add("state", tab.state, (None, nq, None), lambda a, bb, c: (bb, 0, a))
        call.add("bounds", tab.k_bounds, (None, None, 2), lambda a, bb, c: (bb, a, 0))


def backward(kern, cfg, q_, k_, v_, do_, lse_, delta, qs, ks, grads=None):
    """(dq, dk, dv) f32 and unscaled, plus `grads` if given (accumulated in place).

    lse_ has -LSE_NONE where a query sees nothing (so p = 0), delta = rowsum(do * o) - dlse.
    """
    b, tp, h, d = q_.shape
    sp, kh, dv_dim = k_.shape[1], k_.shape[2], v_.shape[-1]
    g = h // kh
    bq, bk = min(kern.block_q_bwd, tp), min(kern.block_k_bwd, sp)
    nq, nk = tp // bq, sp // bk
    q_, k_, v_, do_ = (pc.pad_head_dim(x) for x in (q_, k_, v_, do_))
    dp, dvp = q_.shape[-1], v_.shape[-1]
    masked = pc.has_mask(cfg, qs)
    tab = pc.Tables(cfg, qs, ks, bq, bk, b) if masked else None
    grads = None if grads is None else tuple(pc.pad_head_dim(x) for x in grads)
    common = dict(
        spec=cfg.spec, scale=cfg.scale, cap=cfg.soft_cap, kv_len=cfg.kv_len, masked=masked
    )

    # dK/dV: program (j, b, kv head).
    call = pc.Call()
    call.add("q", q_, (None, tp, g, dp), lambda j, bb, kk: (bb, 0, kk, 0))
    call.add("do", do_, (None, tp, g, dvp), lambda j, bb, kk: (bb, 0, kk, 0))
    call.add("lse", lse_, (None, g, tp), lambda j, bb, kk: (bb, kk, 0))
    call.add("delta", delta, (None, g, tp), lambda j, bb, kk: (bb, kk, 0))
    call.add("k", k_, (None, bk, None, dp), lambda j, bb, kk: (bb, j, kk, 0))
    call.add("v", v_, (None, bk, None, dvp), lambda j, bb, kk: (bb, j, kk, 0))
    if masked:
        _mask_inputs(call, qs, ks, tab, (tp, bk), by_q=False)
    k_spec = pl.BlockSpec((None, bk, None, dp), lambda j, bb, kk: (bb, j, kk, 0))
    v_spec = pl.BlockSpec((None, bk, None, dvp), lambda j, bb, kk: (bb, j, kk, 0))
    aliases = {}
    if grads is not None:
        call.add("dk_in", grads[1], (None, bk, None, dp), lambda j, bb, kk: (bb, j, kk, 0))
        call.add("dv_in", grads[2], (None, bk, None, dvp), lambda j, bb, kk: (bb, j, kk, 0))
        aliases = {call.index("dk_in"): 0, call.index("dv_in"): 1}
    dk, dv = call(
        kern,
        _dkv_kernel,
        grid=(nk, b, kh),
        out_shapes=(k_.shape, v_.shape),
        out_specs=(k_spec, v_spec),
        aliases=aliases,
        label="dkv",
        bq=bq,
        bk=bk,
        nq=nq,
        g=g,
        has_grads=grads is not None,
        **common,
    )

    # dQ: program (i, b, head).
    call = pc.Call()
    call.add("q", q_, (None, bq, None, dp), lambda i, bb, hh: (bb, i, hh, 0))
    call.add("do", do_, (None, bq, None, dvp), lambda i, bb, hh: (bb, i, hh, 0))
    call.add("lse", lse_, (None, None, bq), lambda i, bb, hh: (bb, hh, i))
    call.add("delta", delta, (None, None, bq), lambda i, bb, hh: (bb, hh, i))
    call.add("k", k_, (None, sp, None, dp), lambda i, bb, hh: (bb, 0, hh // g, 0))
    call.add("v", v_, (None, sp, None, dvp), lambda i, bb, hh: (bb, 0, hh // g, 0))
    if masked:
        _mask_inputs(call, qs, ks, tab, (bq, sp), by_q=True)
    aliases = {}
    if grads is not None:
        call.add("dq_in", grads[0], (None, bq, None, dp), lambda i, bb, hh: (bb, i, hh, 0))
        aliases = {call.index("dq_in"): 0}
    (dq,) = call(
        kern,
        _dq_kernel,
        grid=(nq, b, h),
        out_shapes=(q_.shape,),
        out_specs=(pl.BlockSpec((None, bq, None, dp), lambda i, bb, hh: (bb, i, hh, 0)),),
        aliases=aliases,
        label="dq",
        bk=bk,
        nk=nk,
        has_grads=grads is not None,
        **common,
    )
    return dq[..., :d], dk[..., :d], dv[..., :dv_dim]
