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


INPUT_LAYOUTS = ("natural",) + LAYOUTS


def check_input_layout(fn, layout, input_layout, positions_given, lengths, num_shards):
    """The order the caller's arrays are in, resolved: None (no permutation) or "natural" (lay
    them out inside and return natural order). A balanced `layout` with neither `input_layout`
    nor explicit positions is refused: arrays in natural order would silently give wrong
    results, and arrays already laid out cannot be told apart from them."""
    if input_layout is not None and input_layout not in ("natural", layout):
        raise ValueError(
            f"{fn}: `input_layout` must be 'natural' (the arrays are in natural order) or "
            f"{layout!r} (already in `layout` order), got {input_layout!r}; arrays in another "
            f"layout go back to natural order with ringattn.from_layout first."
        )
    if layout == "contiguous" or input_layout == layout:
        return None
    if input_layout is None:
        if positions_given:
            return None  # the positions say where every token is
        raise ValueError(
            f"{fn}: `layout`={layout!r} needs the order of q, k and v: "
            f"input_layout='natural' (they are in natural order; they are laid out inside and "
            f"the result comes back in natural order, one all-to-all or two collective "
            f"permutes of each array each way) or input_layout={layout!r} (they are in "
            f"{layout!r} order already, e.g. from ringattn.to_layout; nothing is permuted)."
        )
    for name, length in lengths.items():
        if layout == "striped" and length % (num_shards * num_shards):
            raise ValueError(
                f"{fn}: input_layout='natural' with layout 'striped' over {num_shards} shards "
                f"moves tokens with one all-to-all, which needs the {name} ({length}) to be a "
                f"multiple of {num_shards * num_shards}; lay the arrays out beforehand "
                f"(ringattn.to_layout) and pass input_layout='striped'."
            )
    return "natural"


def _zigzag_destinations(n):
    """Where natural shard r's even chunk (2r) and odd chunk (2r + 1) go in the zigzag layout
    (chunk c lives on device c if c < n, else on device 2n - 1 - c)."""
    home = lambda c: c if c < n else 2 * n - 1 - c  # noqa: E731
    return [home(2 * r) for r in range(n)], [home(2 * r + 1) for r in range(n)]


def _ppermute(x, axis_name, perm):
    """lax.ppermute with `perm` over the index `lax.axis_index(axis_name)` gives, for a tuple of
    axes too. JAX versions disagree on how ppermute numbers devices over several axes (0.10 in
    the mesh's axis order, later ones in the tuple's), but agree when the tuple is in mesh
    order: so the permutation is renumbered into the mesh's order."""
    if not isinstance(axis_name, (tuple, list)) or len(axis_name) == 1:
        return jax.lax.ppermute(x, axis_name, perm)
    names = jax.sharding.get_abstract_mesh().axis_names
    ordered = tuple(a for a in names if a in axis_name)
    sizes = {a: jax.lax.axis_size(a) for a in axis_name}

    def renumber(i):  # index over axis_name (row-major) -> index over `ordered`
        coords = np.unravel_index(i, [sizes[a] for a in axis_name])
        where = dict(zip(axis_name, coords, strict=True))
        return int(np.ravel_multi_index([where[a] for a in ordered], [sizes[a] for a in ordered]))

    return jax.lax.ppermute(x, ordered, [(renumber(s), renumber(d)) for s, d in perm])


def from_natural(x, layout, axis_name, axis=1):
    """Inside shard_map: this device's shard of a sequence in natural order -> its shard in
    `layout` order. Every token moves once: striped, one all-to-all; zigzag, two collective
    permutes (each device receives one even and one odd chunk); contiguous: nothing."""
    if layout == "contiguous":
        return x
    n = jax.lax.axis_size(axis_name)
    x = jnp.moveaxis(x, axis, 0)
    local = x.shape[0]
    if layout == "striped":  # local index i * n + j -> device j, after the tokens of devices < r
        x = jnp.swapaxes(x.reshape(local // n, n, *x.shape[1:]), 0, 1)
        x = jax.lax.all_to_all(x, axis_name, 0, 0).reshape(local, *x.shape[2:])
    else:
        even, odd = _zigzag_destinations(n)
        c = local // 2
        got_even = _ppermute(x[:c], axis_name, list(enumerate(even)))
        got_odd = _ppermute(x[c:], axis_name, list(enumerate(odd)))
        first_even = jax.lax.axis_index(axis_name) % 2 == 0  # device d holds chunk d first
        x = jnp.where(
            first_even,
            jnp.concatenate([got_even, got_odd]),
            jnp.concatenate([got_odd, got_even]),
        )
    return jnp.moveaxis(x, 0, axis)


def to_natural(x, layout, axis_name, axis=1):
    """The inverse of `from_natural`: a shard in `layout` order -> its shard in natural order."""
    if layout == "contiguous":
        return x
    n = jax.lax.axis_size(axis_name)
    x = jnp.moveaxis(x, axis, 0)
    local = x.shape[0]
    if layout == "striped":
        x = jax.lax.all_to_all(x.reshape(n, local // n, *x.shape[1:]), axis_name, 0, 0)
        x = jnp.swapaxes(x, 0, 1).reshape(local, *x.shape[2:])
    else:
        even, odd = _zigzag_destinations(n)
        c = local // 2
        first_even = jax.lax.axis_index(axis_name) % 2 == 0
        mine_even = jnp.where(first_even, x[:c], x[c:])
        mine_odd = jnp.where(first_even, x[c:], x[:c])
        back_even = _ppermute(mine_even, axis_name, [(d, r) for r, d in enumerate(even)])
        back_odd = _ppermute(mine_odd, axis_name, [(d, r) for r, d in enumerate(odd)])
        x = jnp.concatenate([back_even, back_odd])
    return jnp.moveaxis(x, 0, axis)
