"""The one FLOP count of the benchmarks and gpu_check (FlashAttention-2's convention): only visible
(query, key) pairs count, whatever an implementation computes. Per visible pair and head: forward
4 D (QK^T and PV), backward 10 D (QK^T again, dV, dP, dQ, dK), so fwd+bwd is 14 D, 3.5x forward. An
implementation that computes the masked pairs too (dense) reaches at most ~half its raw throughput
under a causal mask."""

from __future__ import annotations

import numpy as np

FLOPS_PER_PAIR_PER_DIM = {"fwd": 4, "fwdbwd": 14}
MASKS = ("causal", "none", "window")


def mask_reach(mask: str, window: int | None = None) -> tuple[int | None, int | None]:
    """(left, right) reach of a query under `mask` (None: unbounded); "window" is causal with
    `window` keys to the left."""
    if mask not in MASKS:
        raise ValueError(f"mask: expected one of {MASKS}, got {mask!r}")
    if mask == "window" and window is None:
        raise ValueError("mask_reach: mask 'window' needs `window` (an int), got None")
    return {"causal": (None, 0), "none": (None, None), "window": (window, 0)}[mask]


def visible_pairs(seq_len: int, left: int | None, right: int | None) -> int:
    """The number of (i, j) with max(0, i - left) <= j <= min(T - 1, i + right) (causal: T (T + 1)
    / 2), computed exactly in int64."""
    i = np.arange(seq_len, dtype=np.int64)
    lo = np.zeros_like(i) if left is None else np.maximum(0, i - left)
    hi = np.full_like(i, seq_len - 1) if right is None else np.minimum(seq_len - 1, i + right)
    return int(np.maximum(hi - lo + 1, 0).sum())


def attention_flops(batch, num_heads, head_dim, seq_len, mode, reach=(None, None)) -> int:
    """FLOPs of attention over `seq_len` queries and keys, `mode` "fwd" or "fwdbwd", the mask
    given by its (left, right) `reach` (mask_reach)."""
    if mode not in FLOPS_PER_PAIR_PER_DIM:
        raise ValueError(f"mode: expected one of {tuple(FLOPS_PER_PAIR_PER_DIM)}, got {mode!r}")
    pairs = visible_pairs(seq_len, *reach)
    return pairs * batch * num_heads * head_dim * FLOPS_PER_PAIR_PER_DIM[mode]
