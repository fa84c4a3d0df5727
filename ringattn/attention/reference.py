"""Dense attention: the ground truth every kernel is tested against (also in float64)."""

from __future__ import annotations

from typing import Unpack

import jax.numpy as jnp

from ringattn.attention import inputs, keywords, masks


@keywords.takes(keywords.DenseKeywords)
def reference_attention(q, k, v, *, return_lse=False, **attention: Unpack[keywords.DenseKeywords]):
    """softmax(mask(cap(q k^T * scale))) v with a T x S score matrix; lse is natural-log,
    [B, H, T].

    `logits_soft_cap` c: scores become c tanh(s / c) before the mask. `sinks` [H]: one more
    logit per query head, of value 0, in every row's softmax (included in lse). Computes in
    float32 at least (float64 when given float64). Queries that see no key get 0 and lse = -inf
    (lse = their sink with sinks).
    """
    opts, m, sinks = inputs.check("reference_attention", q, k, v, **attention)
    b, t, h, d = q.shape
    kh = k.shape[2]
    acc = jnp.promote_types(jnp.result_type(q, k, v), jnp.float32)
    q_BTKGD = q.astype(acc).reshape(b, t, kh, h // kh, d)
    s_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k.astype(acc)) * opts.scale
    cap = opts.logits_soft_cap
    if cap is not None:
        s_BKGTS = cap * jnp.tanh(s_BKGTS / cap)
    visible = masks.token_visible(opts.spec, m.q_pos, m.kv_pos, m.q_seg, m.kv_seg)  # [B|1, T, S]
    visible = jnp.broadcast_to(visible[:, None, None], s_BKGTS.shape)
    if sinks is not None:  # the sink: one more, always visible, column; its value is 0
        sink_BKGT1 = jnp.broadcast_to(
            sinks.astype(acc).reshape(1, kh, h // kh, 1, 1), (*s_BKGTS.shape[:-1], 1)
        )
        s_BKGTS = jnp.concatenate([s_BKGTS, sink_BKGT1], axis=-1)
        visible = jnp.concatenate([visible, jnp.ones_like(visible[..., :1])], axis=-1)
    p_BKGTS, lse_BKGT = masks.masked_softmax(s_BKGTS, visible)
    if sinks is not None:
        p_BKGTS = p_BKGTS[..., :-1]
    out = jnp.einsum("bkgts,bskd->btkgd", p_BKGTS, v.astype(acc)).reshape(b, t, h, -1)
    out = out.astype(jnp.result_type(q, k, v))
    if return_lse:
        return out, masks.public_lse(lse_BKGT.reshape(b, h, t))
    return out
