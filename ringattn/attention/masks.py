"""The mask algebra: which (query, key) pairs are visible, per token and per tile.

A pair (i, j) is visible when all of these hold (positions, not array indices):
    * segments:  seg_q(i) == seg_kv(j)                   (packed documents)
    * causal:    pos_kv(j) <= pos_q(i)
    * window:    pos_q(i) - left <= pos_kv(j) <= pos_q(i) + right

The same rule is decided twice: per token inside a tile (`token_visible`), and per tile from the
ranges of positions and segment ids it covers (`tile_state`), so that a tile that is fully masked
is skipped and a fully visible one applies no mask. The tile rule is conservative: it may call a
tile PARTIAL that is in fact empty or full, never the other way round.

Kernels carry "this query has seen no key yet" as the finite lse `LSE_NONE`, not -inf: nothing a
user runs under `jax.debug_infs` sees an infinity unless the result holds one (`public_lse`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SKIP, FULL, PARTIAL = 0, 1, 2

# The lse of a query that has seen no key: far below any real score (exp(LSE_NONE - s) == 0 in
# float32), and finite, so that continuing a softmax state needs no inf arithmetic.
LSE_NONE = -1e30


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """The static part of a mask: causal flag and (left, right) window, or None."""

    causal: bool = False
    window: tuple[int, int] | None = None


class Ranges(NamedTuple):
    """Inclusive (lo, hi) bounds of positions and segment ids over a set of tokens."""

    pos_lo: jax.Array
    pos_hi: jax.Array
    seg_lo: jax.Array | None
    seg_hi: jax.Array | None


def token_visible(spec: MaskSpec, q_pos, kv_pos, q_seg=None, kv_seg=None):
    """Boolean visibility [..., Tq, Tk] from positions [..., Tq] / [..., Tk] and segment ids."""
    qp, kp = q_pos[..., :, None], kv_pos[..., None, :]
    visible = None

    def conj(a, b):
        return b if a is None else a & b

    if spec.causal:
        visible = conj(visible, kp <= qp)
    if spec.window is not None:
        left, right = spec.window
        # Compare offsets, not qp +- w: a window near int32 max must not wrap around.
        visible = conj(visible, (qp - kp <= left) & (kp - qp <= right))
    if q_seg is not None:
        visible = conj(visible, q_seg[..., :, None] == kv_seg[..., None, :])
    if visible is None:
        visible = jnp.ones(qp.shape[:-1] + kp.shape[-1:], bool)
    return visible


def tile_state(spec: MaskSpec, q: Ranges, kv: Ranges):
    """SKIP if no pair of the two token sets is visible, FULL if every pair is, else PARTIAL.

    On numpy ranges it computes in numpy (static plans), on jax arrays in jax."""
    xp = np if isinstance(q.pos_lo, np.ndarray | np.generic | int) else jnp
    empty = xp.asarray(False)
    full = xp.asarray(True)
    if spec.causal:
        empty = empty | (kv.pos_lo > q.pos_hi)
        full = full & (kv.pos_hi <= q.pos_lo)
    if spec.window is not None:
        left, right = spec.window
        empty = empty | (q.pos_lo - kv.pos_hi > left) | (kv.pos_lo - q.pos_hi > right)
        full = full & (q.pos_hi - kv.pos_lo <= left) & (kv.pos_hi - q.pos_lo <= right)
    if q.seg_lo is not None:
        empty = empty | (q.seg_hi < kv.seg_lo) | (kv.seg_hi < q.seg_lo)
        full = full & (q.seg_lo == q.seg_hi) & (kv.seg_lo == kv.seg_hi) & (q.seg_lo == kv.seg_lo)
    return xp.where(empty, SKIP, xp.where(full, FULL, PARTIAL)).astype(np.int32)


def block_ranges(pos_PL, seg_BL, block: int) -> Ranges:
    """Per-block ranges [L // block] of positions [P, L] and segment ids [B, L] (L % block == 0)."""

    def lo_hi(x):
        x = x.reshape(x.shape[0], -1, block)
        return x.min(axis=(0, 2)), x.max(axis=(0, 2))

    seg = lo_hi(seg_BL) if seg_BL is not None else (None, None)
    return Ranges(*lo_hi(pos_PL), *seg)


def reduce_ranges(r: Ranges) -> Ranges:
    """Ranges over all blocks together."""
    red = lambda x, f: None if x is None else f(x)  # noqa: E731
    return Ranges(r.pos_lo.min(), r.pos_hi.max(), red(r.seg_lo, jnp.min), red(r.seg_hi, jnp.max))


def index_ranges(r: Ranges, i) -> Ranges:
    return Ranges(*(None if x is None else x[i] for x in r))


def public_lse(lse):
    """The lse users get: -inf for queries that saw no key (lse at LSE_NONE), else unchanged.

    log(0) makes the -inf only where there is one, so the op is clean under jax.debug_infs
    whenever the result is."""
    seen = lse > 0.5 * LSE_NONE
    return jnp.where(seen, lse, LSE_NONE) + jnp.log(seen.astype(lse.dtype))


def backward_lse(lse):
    """lse for the backward pass: queries that saw no key get -LSE_NONE, so p = exp(s - lse) is
    exactly 0 for them (their keys are masked anyway) and nothing overflows."""
    return jnp.where(lse > 0.5 * LSE_NONE, lse, -LSE_NONE)


def masked_softmax(s, visible):
    """(p, lse) of scores s [..., S] over the keys `visible` [..., S] marks: p is 0 on masked keys,
    rows that see nothing give p = 0 and lse = LSE_NONE; no inf is ever formed."""
    s = jnp.where(visible, s, LSE_NONE)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(visible, jnp.exp(s - row_max), 0.0)
    denom = p.sum(-1, keepdims=True)
    seen = denom > 0
    lse = jnp.where(seen, jnp.log(jnp.where(seen, denom, 1.0)) + row_max, LSE_NONE)
    return p / jnp.where(seen, denom, 1.0), lse[..., 0]
