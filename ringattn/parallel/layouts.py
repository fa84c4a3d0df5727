"""Token orders across the shards of a sequence: contiguous, zigzag and striped.

Global arrays are kept in *layout order*: shard r of the sequence axis holds the tokens the layout
gives device r. Attention reads positions, never array indices, so any layout gives the same result
as contiguous once positions are permuted with the tokens.

  contiguous: device r holds tokens [r L, (r + 1) L)
  zigzag:     the sequence cut into 2n chunks; device r holds chunks r and 2n - 1 - r
  striped:    device r holds tokens t with t mod n == r
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ringattn.parallel import sharding

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout_name(fn, layout):
    if layout not in LAYOUTS:
        raise ValueError(f"{fn}: `layout` must be one of {LAYOUTS}, got {layout!r}.")


def check_layout(fn, layout, length, num_shards, what="sequence length"):
    check_layout_name(fn, layout)
    parts = 2 * num_shards if layout == "zigzag" else num_shards
    if length % parts:
        raise ValueError(
            f"{fn}: layout {layout!r} over {num_shards} shards needs the {what} to be a multiple "
            f"of {parts}, got {length}."
        )


def shard_positions(layout, local_len, index, num_shards):
    """Positions [local_len] int32 of the tokens held by shard `index` (an int, or traced)."""
    xp = np if isinstance(index, (int, np.integer)) else jnp
    iota = xp.arange(local_len, dtype=np.int32)
    if layout == "contiguous":
        return index * local_len + iota
    if layout == "striped":
        return index + num_shards * iota
    if layout == "zigzag":
        c = local_len // 2
        chunk = xp.where(iota < c, index, 2 * num_shards - 1 - index)
        return (chunk * c + iota % c).astype(np.int32)
    raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}.")


def layout_positions(layout, length, num_shards):
    """Positions [length] of a sequence in layout order: the permutation to_layout applies."""
    check_layout("layout_positions", layout, length, num_shards)
    local = length // num_shards
    return np.concatenate(
        [shard_positions(layout, local, r, num_shards) for r in range(num_shards)]
    )


def _permute(x, perm, axis):
    """x[..., perm, ...] along `axis`, keeping an explicitly sharded array's sharding (a gather
    on Explicit mesh axes must be told its output sharding)."""
    x = jnp.asarray(x)
    index = (slice(None),) * axis + (perm,)
    if sharding.explicitly_sharded(x):
        return x.at[index].get(out_sharding=jax.typeof(x).sharding)
    return x[index]


def to_layout(x, layout, num_shards, axis=1):
    """Reorder the sequence axis of `x` from natural order into `layout` order."""
    return _permute(x, layout_positions(layout, x.shape[axis], num_shards), axis)


def from_layout(x, layout, num_shards, axis=1):
    """Inverse of `to_layout`."""
    return _permute(x, np.argsort(layout_positions(layout, x.shape[axis], num_shards)), axis)


def local_masks(fn, m, layout, index, num_shards, q_len, kv_len):
    """A strategy's local mask arrays (inside shard_map): positions not given (None) are those
    `layout` assigns to shard `index` of num_shards, after checking that the global lengths fit
    the layout."""

    def fill(x, length, what):
        if x is not None:
            return x
        check_layout(fn, layout, length * num_shards, num_shards, f"global {what} length")
        return shard_positions(layout, length, index, num_shards)[None]

    return m._replace(q_pos=fill(m.q_pos, q_len, "query"), kv_pos=fill(m.kv_pos, kv_len, "key"))
