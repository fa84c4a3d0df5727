"""Hybrid (USP-style 2-D) attention: Ulysses over one mesh axis, a ring over another.

The sequence is sharded over both axes, ring-major: `PartitionSpec(None, (ring_axis,
ulysses_axis))`, so shard index = ring index * n_u + Ulysses index and the n_u devices of a
Ulysses group hold n_u consecutive shards of the global array. The Ulysses all-to-all gives each
of them that contiguous chunk (shards in order) for H / n_u heads; the ring then runs over the
n_r chunks with explicit positions, so every layout of the n = n_u * n_r shards works (zigzag
and striped shards stay balanced: a chunk is a union of balanced shards).
"""

from __future__ import annotations

from jax import lax

from ringattn.attention import blockwise
from ringattn.parallel import layouts, ring, ulysses


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


def hybrid_attention(
    q,
    k,
    v,
    *,
    axis_name,
    layout="contiguous",
    causal=False,
    local_window_size=None,
    segment_ids=None,
    kv_segment_ids=None,
    q_positions=None,
    kv_positions=None,
    scale=None,
    block_q=512,
    block_k=512,
    return_lse=False,
    kernel="auto",
):
    """Exact attention over a sequence sharded over `axis_name` = (ulysses_axis, ring_axis).

    Call inside `jax.shard_map` with the local shards, the sequence sharded ring-major
    (`P(None, (ring_axis, ulysses_axis))`, see the module docstring) in `layout` order over all
    n_u * n_r shards. Positions not given are those `layout` assigns to this shard. The heads of
    q must be a multiple of the Ulysses axis size. `kernel`: the ring steps' kernel.
    """
    fn = "hybrid_attention"
    u_axis, r_axis = check_axis_pair(fn, axis_name)
    n_u, n_r = lax.psum(1, u_axis), lax.psum(1, r_axis)
    index = lax.axis_index(r_axis) * n_u + lax.axis_index(u_axis)
    spec, m, scale = layouts.check_local(
        fn,
        q,
        k,
        v,
        index,
        n_u * n_r,
        layout=layout,
        q_positions=q_positions,
        kv_positions=kv_positions,
        causal=causal,
        local_window_size=local_window_size,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        scale=scale,
    )
    ulysses.check_heads(fn, q.shape[2], n_u, u_axis)
    blockwise.check_blocks(fn, block_q, block_k)
    attend = lambda *a, **kw: ring.ring_attention(  # noqa: E731
        *a,
        **kw,
        axis_name=r_axis,
        block_q=block_q,
        block_k=block_k,
        return_lse=True,
        kernel=kernel,
    )
    out, lse = ulysses.ulysses(attend, fn, q, k, v, axis_name=u_axis, m=m, spec=spec, scale=scale)
    return (out, lse) if return_lse else out
