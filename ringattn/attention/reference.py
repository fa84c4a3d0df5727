"""Dense attention: the ground truth every kernel is tested against (also in float64)."""

from __future__ import annotations

import jax.numpy as jnp

from ringattn.attention import inputs, masks


def reference_attention(
    q,
    k,
    v,
    *,
    causal=False,
    local_window_size=None,
    segment_ids=None,
    kv_segment_ids=None,
    q_positions=None,
    kv_positions=None,
    scale=None,
    return_lse=False,
):
    """softmax(q k^T * scale + mask) v with a T x S score matrix; lse is natural-log, [B, H, T].

    Computes in float32 at least (float64 when given float64). Queries that see no key get 0 and
    lse = -inf.
    """
    spec, m, scale = inputs.check_and_normalize(
        "reference_attention",
        q,
        k,
        v,
        causal=causal,
        local_window_size=local_window_size,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_positions=q_positions,
        kv_positions=kv_positions,
        scale=scale,
    )
    b, t, h, d = q.shape
    kh = k.shape[2]
    acc = jnp.promote_types(jnp.result_type(q, k, v), jnp.float32)
    q_BTKGD = q.astype(acc).reshape(b, t, kh, h // kh, d)
    s_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k.astype(acc)) * scale
    visible = masks.token_visible(spec, m.q_pos, m.kv_pos, m.q_seg, m.kv_seg)  # [B|1, T, S]
    s_BKGTS = jnp.where(visible[:, None, None], s_BKGTS, -jnp.inf)
    row_max = jnp.max(s_BKGTS, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(s_BKGTS - row_max)
    denom = p.sum(-1, keepdims=True)
    lse_BKGT = jnp.where(denom[..., 0] > 0, jnp.log(denom[..., 0]) + row_max[..., 0], -jnp.inf)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(acc)).reshape(b, t, h, d).astype(q.dtype)
    if return_lse:
        return out, lse_BKGT.reshape(b, h, t)
    return out
