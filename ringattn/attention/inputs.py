"""Checking and normalising the arguments every attention entry point shares.

All checks read only shapes and dtypes, so they run at trace time, before any heavy work, and name
the argument, what was expected and what was given. `check` turns a call's keywords into the one
bundle that travels down: static `Options`, the mask's arrays (`MaskArrays`) and the sinks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ringattn.attention import keywords
from ringattn.attention.masks import MaskSpec


class MaskArrays(NamedTuple):
    """A mask's arrays, normalised: positions [P, L] int32 (P is 1 or B), segments [B, L] int32
    (None: no segments; positions None only before a strategy derives them from its layout)."""

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
    """Ranks, dtypes and matching sizes of q [B,T,H,D], k [B,S,K,D], v [B,S,K,Dv]."""
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
    if _shape(k)[:3] != _shape(v)[:3]:
        raise ValueError(
            f"{fn}: `k` and `v` must have the same batch, length and heads [B, S, K] (v may have "
            f"its own head dim), got {_shape(k)} and {_shape(v)}."
        )
    (b, _, h, d), (bk, _, kh, dk) = _shape(q), _shape(k)
    if b != bk:
        raise ValueError(f"{fn}: `q` and `k` batch sizes differ: {b} and {bk}.")
    if d != dk:
        raise ValueError(f"{fn}: `q` and `k` head dims differ: {d} and {dk}.")
    if kh == 0 or h % kh:
        raise ValueError(
            f"{fn}: the heads of `q` ({h}, axis 2) must be a multiple of the key/value heads of "
            f"`k` and `v` ({kh}); got q {_shape(q)} and k {_shape(k)}."
        )


def check_soft_cap(fn, logits_soft_cap):
    """None, or a positive Python/numpy float (static: it shapes the compiled program)."""
    c = logits_soft_cap
    if c is None:
        return None
    if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"{fn}: `logits_soft_cap` must be None or a positive float, got {type(c).__name__}."
        )
    if not c > 0 or not np.isfinite(c):
        raise ValueError(f"{fn}: `logits_soft_cap` must be a positive finite float, got {c!r}.")
    return float(c)


def check_sinks(fn, sinks, num_heads):
    """None, or a floating array [H]: one learnable sink logit per query head."""
    if sinks is None:
        return None
    if not jnp.issubdtype(jnp.result_type(sinks), jnp.floating):
        raise TypeError(
            f"{fn}: `sinks` must be a floating-point array [heads], got dtype "
            f"{jnp.result_type(sinks)}."
        )
    if _shape(sinks) != (num_heads,):
        raise ValueError(
            f"{fn}: `sinks` must have shape [heads] = ({num_heads},), one logit per query head, "
            f"got {_shape(sinks)}."
        )
    return jnp.asarray(sinks)


def check_blocks(fn, block_q, block_k, allow_none=True):
    """Positive ints, or None: the XLA kernel's tiles for the platform (kernels/xla.py)."""
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if (b is None and allow_none) or (_is_int(b) and b > 0):
            continue
        raise ValueError(f"{fn}: `{name}` must be a positive int or None, got {b!r}.")


@dataclasses.dataclass(frozen=True)
class Options:
    """The static half of an attention call, checked: the mask rule, the softmax scale, the soft
    cap, the XLA kernel's tiles and the kernel to run. Hashable, so it keys compiled programs and
    travels from the public functions down to the kernels as one value."""

    spec: MaskSpec
    scale: float
    logits_soft_cap: float | None = None
    block_q: int | None = None  # None: the platform's default (kernels/xla.py)
    block_k: int | None = None
    kernel: object = "auto"
    # Called on the host for every tile the XLA kernel computes (blockwise_attention's docs).
    tile_callback: Callable | None = None


def check(
    fn,
    q,
    k,
    v,
    *,
    fill_positions=True,
    **attention,
):
    """Validate every argument of an attention call (shapes and dtypes only, so before any work)
    and return (Options, MaskArrays, sinks) with the defaults filled in; positions not given
    stay None with `fill_positions=False` (the strategies derive them from their layout).
    `attention`: the call's keywords (keywords.py; those not given take their defaults)."""
    unknown = sorted(set(attention) - set(keywords.DEFAULTS))
    if unknown:
        raise TypeError(f"{fn}: unexpected keyword argument(s) {unknown}.")
    a = {**keywords.DEFAULTS, **attention}
    causal, local_window_size, scale, logits_soft_cap = (
        a["causal"], a["local_window_size"], a["scale"], a["logits_soft_cap"]
    )  # fmt: skip
    segment_ids, kv_segment_ids = a["segment_ids"], a["kv_segment_ids"]
    q_positions, kv_positions = a["q_positions"], a["kv_positions"]
    sinks, block_q, block_k = a["sinks"], a["block_q"], a["block_k"]
    check_qkv(fn, q, k, v)
    batch, t, h, d = _shape(q)
    s = _shape(k)[1]
    window = normalize_window(fn, local_window_size)
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"{fn}: `causal` must be a bool, got {causal!r}.")
    if scale is None:
        scale = 1.0 / float(np.sqrt(d))
    elif not isinstance(scale, (int, float, np.floating)):
        raise TypeError(f"{fn}: `scale` must be a Python float or None, got {type(scale)}.")
    cap = check_soft_cap(fn, logits_soft_cap)
    sinks = check_sinks(fn, sinks, h)
    check_blocks(fn, block_q, block_k)

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
            return jnp.arange(length, dtype=jnp.int32)[None] if fill_positions else None
        _check_int(fn, name, x, sorted({(length,), (1, length), (batch, length)}))
        x = jnp.asarray(x, jnp.int32)
        return x[None] if x.ndim == 1 else x

    masks = MaskArrays(
        positions("q_positions", q_positions, t),
        positions("kv_positions", kv_positions, s),
        segment_ids,
        kv_segment_ids,
    )
    opts = Options(
        MaskSpec(bool(causal), window),
        float(scale),
        cap,
        block_q,
        block_k,
        a["kernel"],
        a["tile_callback"],
    )
    return opts, masks, sinks
