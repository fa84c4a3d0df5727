"""The forward pallas_call of our GPU kernel: grid (q blocks, B, H); a q block streams the key
blocks with an online softmax in base 2 and writes out and the natural-log lse [B, H, T] in f32.
It can *continue* a softmax state (o, lse) passed in (aliased to the outputs), as a ring step
does. GQA reads KV head h // G; K/V are never repeated."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ringattn.attention.kernels import pallas_common as pc
from ringattn.attention.kernels.base import logits
from ringattn.attention.masks import FULL, LSE_NONE


def _fwd_kernel(r, o_ref, lse_ref, *, spec, scale, cap, bk, kv_len, nk, masked, has_state):
    q = r["q"][...]
    bq = q.shape[0]
    if has_state:
        # The state as one pseudo-key: score lse, value o, sum 1. A query that saw nothing has
        # lse = LSE_NONE, which the first real score replaces (its weight exp2 -> 0).
        acc = r["o_in"][...].astype(jnp.float32)
        m = r["lse_in"][...] * pc.LOG2E
        den = jnp.ones((bq,), jnp.float32)
    else:
        acc = jnp.zeros((bq, r["v"].shape[-1]), jnp.float32)
        m = jnp.full((bq,), LSE_NONE * pc.LOG2E, jnp.float32)
        den = jnp.zeros((bq,), jnp.float32)
    if masked:
        q_pos = r["q_pos"][...]
        q_seg = pc.load(r, "q_seg")
        lo, hi = r["bounds"][0], r["bounds"][1]
    else:
        lo, hi = 0, nk

    def body(j, carry):
        acc, m, den = carry
        start = pl.multiple_of(j * bk, bk)
        k = r["k"][pl.ds(start, bk), :]
        v = r["v"][pl.ds(start, bk), :]
        s, _ = logits(pc.dot(q, k), scale, cap, unit=pc.LOG2E)
        if masked:  # the mask is built only in PARTIAL tiles (inside the cond's branch)

            def mask(s):
                kv_pos = r["kv_pos"][pl.ds(start, bk)]
                kv_seg = pc.load(r, "kv_seg", pl.ds(start, bk))
                vis = pc.visible(spec, kv_len, q_pos, kv_pos, q_seg, kv_seg, start, bk)
                return jnp.where(vis, s, -jnp.inf)

            s = lax.cond(r["state"][j] == FULL, lambda s: s, mask, s)
        m_new = jnp.maximum(m, s.max(-1))  # m starts finite, so m_new never is -inf
        p = jnp.exp2(s - m_new[:, None])
        corr = jnp.exp2(m - m_new)
        acc = acc * corr[:, None] + pc.dot(p.astype(v.dtype), v, (1, 0))
        return acc, m_new, den * corr + p.sum(-1)

    acc, m, den = lax.fori_loop(lo, hi, body, (acc, m, den))
    seen = den > 0
    den = jnp.where(seen, den, 1.0)
    o_ref[...] = (acc / den[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, (m + jnp.log2(den)) * pc.LN2, LSE_NONE)


def forward(kern, cfg, q_, k_, v_, qs, ks, state=None):
    """(o f32 [B, Tp, H, Dv], lse f32 [B, H, Tp]) over the keys k_/v_, continuing `state`."""
    b, tp, h, _ = q_.shape
    sp, kh, dv = k_.shape[1], k_.shape[2], v_.shape[-1]
    g = h // kh
    bq, bk = min(kern.block_q, tp), min(kern.block_k, sp)
    nq, nk = tp // bq, sp // bk
    q_, k_, v_ = (pc.pad_head_dim(x) for x in (q_, k_, v_))
    dp, dvp = q_.shape[-1], v_.shape[-1]
    masked = pc.has_mask(cfg, qs)
    call = pc.Call()
    call.add("q", q_, (None, bq, None, dp), lambda i, bb, hh: (bb, i, hh, 0))
    call.add("k", k_, (None, sp, None, dp), lambda i, bb, hh: (bb, 0, hh // g, 0))
    call.add("v", v_, (None, sp, None, dvp), lambda i, bb, hh: (bb, 0, hh // g, 0))
    if masked:
        tab = pc.Tables(cfg, qs, ks, bq, bk, b)
        pq, pk = qs.pos.shape[0], ks.pos.shape[0]
        call.add("q_pos", qs.pos, (None, bq), lambda i, bb, hh: (bb if pq > 1 else 0, i))
        call.add("kv_pos", ks.pos, (None, sp), lambda i, bb, hh: (bb if pk > 1 else 0, 0))
        call.add("q_seg", qs.seg, (None, bq), lambda i, bb, hh: (bb, i))
        call.add("kv_seg", ks.seg, (None, sp), lambda i, bb, hh: (bb, 0))
        call.add("state", tab.state, (None, None, nk), lambda i, bb, hh: (bb, i, 0))
        call.add("bounds", tab.q_bounds, (None, None, 2), lambda i, bb, hh: (bb, i, 0))
    aliases = {}
    if state is not None:
        o, lse = state
        o_spec = (None, bq, None, dvp)
        call.add("o_in", pc.pad_head_dim(o), o_spec, lambda i, bb, hh: (bb, i, hh, 0))
        call.add("lse_in", lse, (None, None, bq), lambda i, bb, hh: (bb, hh, i))
        aliases = {call.index("o_in"): 0, call.index("lse_in"): 1}
    o, lse = call(
        kern,
        _fwd_kernel,
        grid=(nq, b, h),
        out_shapes=((b, tp, h, dvp), (b, h, tp)),
        out_specs=(
            pl.BlockSpec((None, bq, None, dvp), lambda i, bb, hh: (bb, i, hh, 0)),
            pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i)),
        ),
        aliases=aliases,
        label="fwd",
        spec=cfg.spec,
        scale=cfg.scale,
        cap=cfg.soft_cap,
        bk=bk,
        kv_len=cfg.kv_len,
        nk=nk,
        masked=masked,
        has_state=state is not None,
    )
    return o[..., :dv], lse
