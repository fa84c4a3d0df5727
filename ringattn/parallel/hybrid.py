"""Hybrid (USP-style 2-D) attention: Ulysses over one mesh axis, a ring over another.

The sequence is sharded over both axes, ring-major: `PartitionSpec(None, (ring_axis,
ulysses_axis))`, so shard index = ring index * n_u + Ulysses index and the n_u devices of a
Ulysses group hold n_u consecutive shards of the global array. The Ulysses all-to-all gives each
of them that contiguous chunk (shards in order) for H / n_u heads; the ring then runs over the
n_r chunks with explicit positions, so every layout of the n = n_u * n_r shards works (zigzag
and striped shards stay balanced: a chunk is a union of balanced shards).
"""

from __future__ import annotations

from typing import Unpack

import jax
from jax import lax

from ringattn.attention import inputs, keywords
from ringattn.parallel import layouts, ring, sharding, ulysses


def check_axis_pair(fn, axis_name):
    """(ulysses_axis, ring_axis): two distinct axis names."""
    if (
        not isinstance(axis_name, (tuple, list))
        or len(axis_name) != 2
        or axis_name[0] == axis_name[1]
    ):
        raise ValueError(
            f"{fn}: `axis_name` must be a pair (ulysses_axis, ring_axis) of two different mesh "
            f"axes for strategy 'hybrid', got {axis_name!r}."
        )
    return tuple(axis_name)


def hybrid(fn, q, k, v, opts, m, sinks, *, axis_name, layout):
    """(out, lse) of checked arguments inside shard_map: Ulysses over axis_name[0], then a ring
    over axis_name[1] with the gathered (explicit) positions."""
    u_axis, r_axis = check_axis_pair(fn, axis_name)
    layouts.check_layout_name(fn, layout)
    n_u, n_r = lax.axis_size(u_axis), lax.axis_size(r_axis)
    index = lax.axis_index(r_axis) * n_u + lax.axis_index(u_axis)
    # Positions of this shard among all n_u * n_r (Ulysses then gathers its group's).
    m = layouts.local_masks(fn, m, layout, index, n_u * n_r, q.shape[1], k.shape[1])

    def ring_steps(fn, q, k, v, opts, m, sinks):
        return ring.ring(fn, q, k, v, opts, m, sinks, axis_name=r_axis, layout=layout)

    return ulysses.ulysses(
        fn, q, k, v, opts, m, sinks, axis_name=u_axis, layout=layout, attend=ring_steps
    )


# One compiled program when called eagerly inside a user's shard_map (ring._ring_jit).
_hybrid_jit = jax.jit(hybrid, static_argnums=(0, 4), static_argnames=("axis_name", "layout"))


@keywords.takes(keywords.AttentionKeywords)
def hybrid_attention(
    q,
    k,
    v,
    *,
    axis_name,
    layout="contiguous",
    return_lse=False,
    **attention: Unpack[keywords.AttentionKeywords],
):
    """Exact attention over a sequence sharded over `axis_name` = (ulysses_axis, ring_axis).

    Call inside `jax.shard_map` with the local shards, the sequence sharded ring-major
    (`P(None, (ring_axis, ulysses_axis))`, see the module docstring) in `layout` order over all
    n_u * n_r shards. Positions not given are those `layout` assigns to this shard. The heads of
    q must be a multiple of the Ulysses axis size. `kernel`: the ring steps' kernel.
    """
    fn = "hybrid_attention"
    sharding.check_bound(fn, axis_name, "ringattn.context_parallel_attention")
    opts, m, sinks = inputs.check(fn, q, k, v, **attention, fill_positions=False)
    out, lse = _hybrid_jit(fn, q, k, v, opts, m, sinks, axis_name=axis_name, layout=layout)
    return (out, lse) if return_lse else out
