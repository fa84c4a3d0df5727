"""A drop-in for `ring_attention` of the original Ring Attention JAX code (Liu et al., the
`ringattention` package), backed by `ringattn.ring_attention` in the contiguous layout.

Same positional signature and semantics, called inside `jax.shard_map` on local shards:
  q, k, v           [B, T_local, H, D] (q may also have more heads than k/v here: GQA)
  attn_bias         must be None (not supported)
  segment_ids       None, or int [B, T_global] replicated along the axis (what the original
                    indexes: global chunk offsets into it), or [B, T_local] sharded like q;
                    queries and keys share them
  cache_idx         must be None (decoding comes with the decode API, not this function)
  axis_name         the ring's mesh axis
  float32_logits    accepted: logits and softmax statistics are always accumulated in f32
  blockwise_kwargs  dict with causal_block_size (None: no mask; c: query block i // c sees key
                    blocks <= i // c, c = 1 being causal), query_chunk_size and key_chunk_size
                    (-> block_q / block_k), and optionally deterministic, dropout_rng,
                    attn_pdrop (dropout is not supported), dtype, policy, precision and
                    prevent_cse (ignored: the kernel never saves tiles).
Returns the local output [B, T_local, H, D] in v's dtype, differentiable like the original.
"""

from __future__ import annotations

import numpy as np
from jax import lax

from ringattn.parallel.ring import ring_attention

_REQUIRED = ("causal_block_size", "query_chunk_size", "key_chunk_size")
_OPTIONAL = ("deterministic", "dropout_rng", "attn_pdrop", "dtype", "policy", "precision")
_OPTIONAL += ("prevent_cse",)


def _positive_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x > 0


def _check_kwargs(fn, kw):
    if not isinstance(kw, dict):
        raise TypeError(f"{fn}: `blockwise_kwargs` must be a dict, got {type(kw).__name__}.")
    missing = [k for k in _REQUIRED if k not in kw]
    unknown = sorted(set(kw) - set(_REQUIRED) - set(_OPTIONAL))
    if missing or unknown:
        raise TypeError(
            f"{fn}: `blockwise_kwargs` needs {list(_REQUIRED)} and accepts {list(_OPTIONAL)}; "
            f"missing {missing}, unknown {unknown}."
        )
    c = kw["causal_block_size"]
    if c is not None and not _positive_int(c):
        raise ValueError(
            f"{fn}: blockwise_kwargs['causal_block_size'] must be None or a positive int, got "
            f"{c!r}."
        )
    for name in ("query_chunk_size", "key_chunk_size"):
        if not _positive_int(kw[name]):
            raise ValueError(
                f"{fn}: blockwise_kwargs[{name!r}] must be a positive int, got {kw[name]!r}."
            )
    if not kw.get("deterministic", True) and kw.get("attn_pdrop", 0.0) > 0:
        raise NotImplementedError(
            f"{fn}: attention dropout (deterministic=False, attn_pdrop="
            f"{kw['attn_pdrop']}) is not supported; pass deterministic=True or attn_pdrop=0."
        )


def _local_segments(fn, segment_ids, t, n, idx):
    """This shard's segment ids [B, t] from global [B, n t] or local [B, t] ones."""
    length = segment_ids.shape[-1] if np.ndim(segment_ids) == 2 else None
    if length == n * t:
        return lax.dynamic_slice_in_dim(segment_ids, idx * t, t, axis=1)
    if length == t:
        return segment_ids
    raise ValueError(
        f"{fn}: `segment_ids` must be [batch, {n * t}] (global, replicated along the axis) or "
        f"[batch, {t}] (local), got shape {np.shape(segment_ids)}."
    )


def ring_attention_original_api(
    q, k, v, attn_bias, segment_ids, cache_idx, axis_name, float32_logits, blockwise_kwargs
):
    """`ringattention.ring_attention(q, k, v, attn_bias, segment_ids, cache_idx, axis_name,
    float32_logits, blockwise_kwargs)`, exact, on `ringattn.ring_attention` (module docstring)."""
    fn = "ring_attention_original_api"
    del float32_logits  # always: scores, softmax statistics and accumulators are f32
    if attn_bias is not None:
        raise NotImplementedError(
            f"{fn}: `attn_bias` is not supported (got shape {np.shape(attn_bias)}); express the "
            f"mask with segment ids or causal_block_size, or use ringattn.ring_attention."
        )
    if cache_idx is not None:
        raise NotImplementedError(
            f"{fn}: `cache_idx` (decoding with a cache) is not supported here; decoding belongs "
            f"to the KV-cache decode API (ringattn.decode), not to this drop-in."
        )
    _check_kwargs(fn, blockwise_kwargs)
    c = blockwise_kwargs["causal_block_size"]
    n, idx = lax.psum(1, axis_name), lax.axis_index(axis_name)
    t, s = q.shape[1], k.shape[1]
    kw = {}
    if segment_ids is not None:
        if s != t:
            raise ValueError(
                f"{fn}: `segment_ids` are shared by queries and keys, so q and k must have the "
                f"same length; got {t} and {s}."
            )
        kw["segment_ids"] = _local_segments(fn, segment_ids, t, n, idx)
    if c is not None and c > 1:
        # Block-causal is causal on block indices: the mask reads positions only.
        kw["q_positions"] = (idx * t + lax.iota("int32", t)) // c
        kw["kv_positions"] = (idx * s + lax.iota("int32", s)) // c
    out = ring_attention(
        q,
        k,
        v,
        axis_name=axis_name,
        layout="contiguous",
        causal=c is not None,
        block_q=blockwise_kwargs["query_chunk_size"],
        block_k=blockwise_kwargs["key_chunk_size"],
        **kw,
    )
    return out.astype(v.dtype)
