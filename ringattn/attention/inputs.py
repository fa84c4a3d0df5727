"""Checking and normalising the arguments every attention entry point shares.

All checks read only shapes and dtypes, so they run at trace time, before any heavy work, and name
the argument, what was expected and what was given.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ringattn.attention.masks import MaskSpec


class MaskArrays(NamedTuple):
    """A mask's arrays, normalised: positions [P, L] int32 (P is 1 or B), segments [B, L]."""

    q_pos: jax.Array
    kv_pos: jax.Array
    q_seg: jax.Array | None
    kv_seg: jax.Array | None


def _shape(x):
    return tuple(getattr(x, "shape", np.shape(x)))


def _check_int(fn, name, x, shapes):
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise TypeError(f"{fn}: `{name}` must be an integer array, got dtype {jnp.result_type(x)}.")
    if _shape(x) not in shapes:
        want = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{fn}: `{name}` must have shape {want}, got {_shape(x)}.")


def _is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def normalize_window(fn, local_window_size):
    """int w -> (w, w); (left, right) kept; None kept. Negative sizes are rejected."""
    w = local_window_size
    if w is None:
        return None
    if _is_int(w):
        window = (int(w), int(w))
    elif isinstance(w, (tuple, list)) and len(w) == 2 and all(_is_int(x) for x in w):
        window = (int(w[0]), int(w[1]))
    else:
        raise TypeError(
            f"{fn}: `local_window_size` must be an int or a (left, right) pair of ints, got {w!r}."
        )
    if min(window) < 0:
        raise ValueError(f"{fn}: `local_window_size` must be non-negative, got {w!r}.")
    return window


def check_qkv(fn, q, k, v):
    """Ranks, dtypes and matching sizes of q [B,T,H,D], k/v [B,S,K,D]."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(_shape(x)) != 4:
            raise ValueError(
                f"{fn}: `{name}` must have rank 4 [batch, length, heads, head_dim], "
                f"got shape {_shape(x)}."
            )
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise TypeError(
                f"{fn}: `{name}` must be a floating-point array, got dtype {jnp.result_type(x)}."
            )
    if _shape(k) != _shape(v):
        raise ValueError(
            f"{fn}: `k` and `v` must have the same shape, got {k.shape} and {v.shape}."
        )
    (b, _, h, d), (bk, _, kh, dk) = q.shape, k.shape
    if b != bk:
        raise ValueError(f"{fn}: `q` and `k` batch sizes differ: {b} and {bk}.")
    if d != dk:
        raise ValueError(f"{fn}: `q` and `k` head dims differ: {d} and {dk}.")
    if kh == 0 or h % kh:
        raise ValueError(
            f"{fn}: the heads of `q` ({h}, axis 2) must be a multiple of the key/value heads of "
            f"`k` and `v` ({kh}); got q {q.shape} and k {k.shape}."
        )


def check_and_normalize(
    fn,
    q,
    k,
    v,
    *,
    causal,
    local_window_size,
    segment_ids,
    kv_segment_ids,
    q_positions,
    kv_positions,
    scale,
):
    """Validate everything; return (MaskSpec, MaskArrays, scale) with defaults filled in."""
    check_qkv(fn, q, k, v)
    batch, t, _, d = q.shape
    s = k.shape[1]
    window = normalize_window(fn, local_window_size)
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"{fn}: `causal` must be a bool, got {causal!r}.")
    if scale is None:
        scale = 1.0 / float(np.sqrt(d))
    elif not isinstance(scale, (int, float, np.floating)):
        raise TypeError(f"{fn}: `scale` must be a Python float or None, got {type(scale)}.")

    if kv_segment_ids is not None and segment_ids is None:
        raise ValueError(f"{fn}: `kv_segment_ids` given without `segment_ids`.")
    if segment_ids is not None:
        _check_int(fn, "segment_ids", segment_ids, [(batch, t)])
        if kv_segment_ids is None:
            if s != t:
                raise ValueError(
                    f"{fn}: `kv_segment_ids` is required when key length ({s}) differs from "
                    f"query length ({t})."
                )
            kv_segment_ids = segment_ids
        _check_int(fn, "kv_segment_ids", kv_segment_ids, [(batch, s)])
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        kv_segment_ids = jnp.asarray(kv_segment_ids, jnp.int32)

    def positions(name, x, length):
        if x is None:
            return jnp.arange(length, dtype=jnp.int32)[None]
        _check_int(fn, name, x, sorted({(length,), (1, length), (batch, length)}))
        x = jnp.asarray(x, jnp.int32)
        return x[None] if x.ndim == 1 else x

    masks = MaskArrays(
        positions("q_positions", q_positions, t),
        positions("kv_positions", kv_positions, s),
        segment_ids,
        kv_segment_ids,
    )
    return MaskSpec(bool(causal), window), masks, float(scale)
