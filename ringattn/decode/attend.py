"""Decode attention: t new queries against a KV cache, in float32, as (out, lse).

The cache's slots are unordered (a ring buffer, shards), so the mask reads positions: slot j is
visible to query i when it holds a token (pos_j >= 0), the query is not padding (pos_i >= 0) and,
if causal, pos_j <= pos_i (and within a layer's local window). The partial results of disjoint
sets of slots (shards of a cache) merge exactly through their lse (`merge_partials`); sinks are
added once, after the merge.
"""

from __future__ import annotations

from typing import NamedTuple, Unpack

import jax.numpy as jnp
import numpy as np

from ringattn import deprecation
from ringattn.attention import inputs, keywords, masks
from ringattn.attention.blockwise import add_sinks
from ringattn.decode import cache as cache_lib
from ringattn.decode import merge


class Rule(NamedTuple):
    """A decode call's checked options: scale (a float), causal, rope (a callable or None), the
    soft cap and the local window (None, or (left, right) as `inputs.normalize_window` gives)."""

    scale: float
    causal: bool
    rope: object
    cap: float | None
    window: tuple[int, int] | None


def check_attend(fn, q, q_pos, cache, rope, attention):
    """q [B, t, H, D] floating with H a multiple of the cache's K, q_pos [B, t] integer, and the
    options (`rope` and the DecodeKeywords `attention`); returns (Rule, sinks) normalised."""
    b, _, kh, d = cache.k.shape
    shape = tuple(np.shape(q))
    if len(shape) != 4 or shape[0] != b or shape[3] != d:
        raise ValueError(
            f"{fn}: `q` must have shape [batch={b}, t, heads, head_dim={d}], got {shape}."
        )
    if shape[2] % kh:
        raise ValueError(
            f"{fn}: the heads of `q` ({shape[2]}) must be a multiple of the cache's KV heads "
            f"({kh})."
        )
    if not jnp.issubdtype(jnp.result_type(q), jnp.floating):
        raise ValueError(f"{fn}: `q` must be floating, got {jnp.result_type(q)}.")
    cache_lib.check_positions(fn, "q_pos", q_pos, shape[:2])
    scale, causal = attention["scale"], attention["causal"]
    if scale is not None and not isinstance(scale, (int, float, np.floating)):
        raise ValueError(f"{fn}: `scale` must be a Python float or None, got {scale!r}.")
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"{fn}: `causal` must be a bool, got {causal!r}.")
    if rope is not None and not callable(rope):
        raise ValueError(f"{fn}: `rope` must be None or a callable (x, positions), got {rope!r}.")
    window = inputs.normalize_window(fn, attention["local_window_size"])
    scale = 1.0 / float(np.sqrt(d)) if scale is None else float(scale)
    cap = inputs.check_soft_cap(fn, attention["logits_soft_cap"])
    sinks = inputs.check_sinks(fn, attention["sinks"], shape[2])
    return Rule(scale, bool(causal), rope, cap, window), sinks


def partial_attention(q, q_pos, cache, rule: Rule, kv_rope_pos=None, q_rope_pos=None):
    """(out [B, t, H, Dv], lse [B, H, t]) over this cache (or shard), both in float32 (float64
    for float64 inputs); rows that see nothing give 0 and lse = LSE_NONE. With `rule.rope`, keys
    and queries rotate at kv_rope_pos / q_rope_pos."""
    b, t, h, d = q.shape
    kh = cache.k.shape[2]
    acc = jnp.promote_types(q.dtype, jnp.float32)
    if not cache.quantized:
        acc = jnp.promote_types(acc, cache.k.dtype)
    q, k, v = q.astype(acc), cache.k.astype(acc), cache.v.astype(acc)
    if rule.rope is not None:
        # RoPE is linear in x, so int8 keys rotate before their scale is applied.
        q, k = rule.rope(q, q_rope_pos).astype(acc), rule.rope(k, kv_rope_pos).astype(acc)
    q_BtKGD = q.reshape(b, t, kh, h // kh, d)
    s_BKGtS = jnp.einsum("btkgd,bskd->bkgts", q_BtKGD, k) * rule.scale
    if cache.quantized:
        s_BKGtS = s_BKGtS * jnp.moveaxis(cache.k_scale, 1, 2)[:, :, None, None].astype(acc)
    if rule.cap is not None:
        s_BKGtS = rule.cap * jnp.tanh(s_BKGtS / rule.cap)
    q_pos = jnp.asarray(q_pos, jnp.int32)[:, :, None]
    kv_pos = cache.pos[:, None, :]
    visible_BtS = (kv_pos >= 0) & (q_pos >= 0)
    if rule.causal:
        visible_BtS &= kv_pos <= q_pos
    if rule.window is not None:
        left, right = rule.window
        visible_BtS &= (q_pos - kv_pos <= left) & (kv_pos - q_pos <= right)
    p_BKGtS, lse_BKGt = masks.masked_softmax(s_BKGtS, visible_BtS[:, None, None])
    if cache.quantized:  # sum_j p_j (s_j v_j) = sum_j (p_j s_j) v_j: no dequantised V
        p_BKGtS = p_BKGtS * jnp.moveaxis(cache.v_scale, 1, 2)[:, :, None, None].astype(acc)
    out = jnp.einsum("bkgts,bskd->btkgd", p_BKGtS, v).reshape(b, t, h, v.shape[-1])
    return out, lse_BKGt.reshape(b, h, t)


def merge_partials(out_BtHD, lse_BHt, axis_name):
    """Exact merge across `axis_name` of partial results over disjoint key sets:
    lse = logsumexp over devices, out = sum of out_r * exp(lse_r - lse); rows no device sees
    stay 0 with lse = LSE_NONE. One all-gather (decode/merge.py)."""
    return merge.merge_partials(out_BtHD, lse_BHt, axis_name)


def finish(q, out, lse, sinks, return_lse):
    """Sinks added once (after every shard merged), out in q's dtype, the users' lse."""
    out, lse = add_sinks(out, lse, sinks)
    out = out.astype(q.dtype)
    return (out, masks.public_lse(lse)) if return_lse else out


@deprecation.renamed_keywords({"local_window": "local_window_size"})
@keywords.takes(keywords.DecodeKeywords, causal=True)
def attend(
    q, q_pos, cache, *, rope=None, return_lse=False, **attention: Unpack[keywords.DecodeKeywords]
):
    """Attention of q [B, t, H, D] at positions q_pos [B, t] (negative: padding, output 0) to
    the cache's tokens; out [B, t, H, Dv] in q's dtype, computed in float32 (float64 for float64).

    Call after `update` wrote the t new tokens, so that they see themselves. With `rope`,
    a callable (x [B, L, N, D], positions [B, L]) -> x, q and the stored (un-rotated) keys are
    rotated at `cache_positions` (StreamingLLM positions for window kinds); without it they are
    used as given. Window kinds: query i of a chunk of t tokens sees the sinks and the last
    window - (t - 1 - i) tokens (the chunk is written before it is attended): exactly
    StreamingLLM when decoding one token at a time. `local_window_size` w: a query at position p
    sees the keys at positions p - w ... p (a model's sliding-window layer), as everywhere.
    GQA: query heads are grouped [B, t, K, H/K, D]; KV heads are never repeated.
    """
    rule, sinks = check_attend("attend", q, q_pos, cache, rope, attention)
    kv_rope, q_rope = cache_lib.cache_positions(cache, q_pos) if rope is not None else (None, None)
    out, lse = partial_attention(q, q_pos, cache, rule, kv_rope, q_rope)
    return finish(q, out, lse, sinks, return_lse)
