"""The backward pallas_calls of our GPU kernel, from (q, k, v, do, lse, delta):

  dK/dV     grid (k blocks, B, K): a key block streams the q blocks of all G query heads that
            share its KV head, so the group reduction happens in registers, without atomics.
  dQ        grid (q blocks, B, H): a q block streams the key blocks.

delta = rowsum(do * o) - dlse is the usual pre-pass, done by XLA (a fused elementwise +
reduction). Gradients are f32 and without the softmax scale, like the XLA kernel's.
`pl.program_id` is read at the top level of each kernel only, so interpret mode runs them.
`backward` runs both calls; `backward_dkv` and `backward_dq` are each one on its own (so a
compile failure can be pinned to one of them: experiments/gpu_check.py).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ringattn.attention.kernels import pallas_common as pc
from ringattn.attention.kernels.base import logits
from ringattn.attention.masks import FULL


def _tile_ds(q, k, do, v, lse, delta, scale, cap, mask_args, state):
    """(p, ds) of one tile: p = exp(s - lse), masked (`pc.visible(*mask_args)`) unless the tile
    is FULL, ds = p (dp - delta) times the soft cap's slope; mask_args is None without a mask."""
    s2, t = logits(pc.dot(q, k), scale, cap, unit=pc.LOG2E)  # the logits in base 2
    p = jnp.exp2(s2 - lse[:, None])
    if mask_args is not None:  # the mask is built only in PARTIAL tiles
        p = lax.cond(
            state == FULL, lambda p: p, lambda p: jnp.where(pc.visible(*mask_args), p, 0.0), p
        )
    ds = p * (pc.dot(do, v) - delta[:, None])
    if t is not None:  # the soft cap's slope
        ds = ds * (1.0 - t * t)
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


class _Operands:
    """What both backward calls start from: operands with head dims padded for Triton, block
    sizes and counts, and the tile tables (None without a mask)."""

    def __init__(self, kern, cfg, q_, k_, v_, do_, qs, ks):
        b, self.tp, self.h, self.d = q_.shape
        self.b, self.sp, self.kh = b, k_.shape[1], k_.shape[2]
        self.dv_dim, self.g = v_.shape[-1], self.h // self.kh
        self.bq, self.bk = min(kern.block_q_bwd, self.tp), min(kern.block_k_bwd, self.sp)
        self.nq, self.nk = self.tp // self.bq, self.sp // self.bk
        self.q, self.k, self.v, self.do = (pc.pad_head_dim(x) for x in (q_, k_, v_, do_))
        self.dp, self.dvp = self.q.shape[-1], self.v.shape[-1]
        self.masked = pc.has_mask(cfg, qs)
        self.tab = pc.Tables(cfg, qs, ks, self.bq, self.bk, b) if self.masked else None
        self.common = dict(
            spec=cfg.spec, scale=cfg.scale, cap=cfg.soft_cap, kv_len=cfg.kv_len, masked=self.masked
        )


def backward_dkv(kern, cfg, q_, k_, v_, do_, lse_, delta, qs, ks, grads=None):
    """(dk, dv) f32 and unscaled, plus grads = (dk, dv) if given (accumulated in place): the
    dK/dV pallas_call, program (j, b, kv head)."""
    o = _Operands(kern, cfg, q_, k_, v_, do_, qs, ks)
    tp, g, bk, dp, dvp = o.tp, o.g, o.bk, o.dp, o.dvp
    call = pc.Call()
    call.add("q", o.q, (None, tp, g, dp), lambda j, bb, kk: (bb, 0, kk, 0))
    call.add("do", o.do, (None, tp, g, dvp), lambda j, bb, kk: (bb, 0, kk, 0))
    call.add("lse", lse_, (None, g, tp), lambda j, bb, kk: (bb, kk, 0))
    call.add("delta", delta, (None, g, tp), lambda j, bb, kk: (bb, kk, 0))
    call.add("k", o.k, (None, bk, None, dp), lambda j, bb, kk: (bb, j, kk, 0))
    call.add("v", o.v, (None, bk, None, dvp), lambda j, bb, kk: (bb, j, kk, 0))
    if o.masked:
        _mask_inputs(call, qs, ks, o.tab, (tp, bk), by_q=False)
    k_spec = pl.BlockSpec((None, bk, None, dp), lambda j, bb, kk: (bb, j, kk, 0))
    v_spec = pl.BlockSpec((None, bk, None, dvp), lambda j, bb, kk: (bb, j, kk, 0))
    aliases = {}
    if grads is not None:
        dk_in, dv_in = (pc.pad_head_dim(x) for x in grads)
        call.add("dk_in", dk_in, (None, bk, None, dp), lambda j, bb, kk: (bb, j, kk, 0))
        call.add("dv_in", dv_in, (None, bk, None, dvp), lambda j, bb, kk: (bb, j, kk, 0))
        aliases = {call.index("dk_in"): 0, call.index("dv_in"): 1}
    dk, dv = call(
        kern,
        _dkv_kernel,
        grid=(o.nk, o.b, o.kh),
        out_shapes=(o.k.shape, o.v.shape),
        out_specs=(k_spec, v_spec),
        aliases=aliases,
        label="dkv",
        bq=o.bq,
        bk=bk,
        nq=o.nq,
        g=g,
        has_grads=grads is not None,
        **o.common,
    )
    return dk[..., : o.d], dv[..., : o.dv_dim]


def backward_dq(kern, cfg, q_, k_, v_, do_, lse_, delta, qs, ks, dq=None):
    """dq f32 and unscaled, plus `dq` if given (accumulated in place): the dQ pallas_call,
    program (i, b, head)."""
    o = _Operands(kern, cfg, q_, k_, v_, do_, qs, ks)
    sp, g, bq, dp, dvp = o.sp, o.g, o.bq, o.dp, o.dvp
    call = pc.Call()
    call.add("q", o.q, (None, bq, None, dp), lambda i, bb, hh: (bb, i, hh, 0))
    call.add("do", o.do, (None, bq, None, dvp), lambda i, bb, hh: (bb, i, hh, 0))
    call.add("lse", lse_, (None, None, bq), lambda i, bb, hh: (bb, hh, i))
    call.add("delta", delta, (None, None, bq), lambda i, bb, hh: (bb, hh, i))
    call.add("k", o.k, (None, sp, None, dp), lambda i, bb, hh: (bb, 0, hh // g, 0))
    call.add("v", o.v, (None, sp, None, dvp), lambda i, bb, hh: (bb, 0, hh // g, 0))
    if o.masked:
        _mask_inputs(call, qs, ks, o.tab, (bq, sp), by_q=True)
    aliases, has_grads = {}, dq is not None
    if has_grads:
        dq_in = pc.pad_head_dim(dq)
        call.add("dq_in", dq_in, (None, bq, None, dp), lambda i, bb, hh: (bb, i, hh, 0))
        aliases = {call.index("dq_in"): 0}
    (dq,) = call(
        kern,
        _dq_kernel,
        grid=(o.nq, o.b, o.h),
        out_shapes=(o.q.shape,),
        out_specs=(pl.BlockSpec((None, bq, None, dp), lambda i, bb, hh: (bb, i, hh, 0)),),
        aliases=aliases,
        label="dq",
        bk=o.bk,
        nk=o.nk,
        has_grads=has_grads,
        **o.common,
    )
    return dq[..., : o.d]


def backward(kern, cfg, q_, k_, v_, do_, lse_, delta, qs, ks, grads=None):
    """(dq, dk, dv) f32 and unscaled, plus `grads` if given (accumulated in place): the dK/dV
    call, then the dQ call.

    lse_ has -LSE_NONE where a query sees nothing (so p = 0), delta = rowsum(do * o) - dlse.
    """
    args = (kern, cfg, q_, k_, v_, do_, lse_, delta, qs, ks)
    dk, dv = backward_dkv(*args, None if grads is None else grads[1:])
    return backward_dq(*args, None if grads is None else grads[0]), dk, dv
