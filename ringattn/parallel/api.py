"""context_parallel_attention: attention over global arrays sharded along a mesh axis."""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from ringattn.attention import inputs
from ringattn.attention.blockwise import check_blocks
from ringattn.parallel import layouts, ring

STRATEGIES = ("ring",)


def _place(x, mesh, spec):
    """Ask for `x` sharded as `spec`: reshard on Explicit mesh axes, a constraint on Auto ones."""
    sharding = NamedSharding(mesh, spec)
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    used = [a for entry in spec if entry is not None for a in np.atleast_1d(entry)]
    if any(types[a] == AxisType.Explicit for a in used):
        return jax.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def context_parallel_attention(
    q,
    k,
    v,
    *,
    mesh,
    axis_name="context",
    strategy="ring",
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
):
    """Exact attention over global q [B, T, H, D], k/v [B, S, K, D] split along `axis_name`.

    The sequence is already in `layout` order (see `to_layout`) and the result comes back in the
    same order; positions not given are the ones `layout` implies. Works under `jax.jit` with any
    mesh (Explicit or Auto axes); the other mesh axes hold replicas.
    """
    fn = "context_parallel_attention"
    if strategy not in STRATEGIES:
        raise ValueError(f"{fn}: `strategy` must be one of {STRATEGIES}, got {strategy!r}.")
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"{fn}: `mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"{fn}: `axis_name` {axis_name!r} is not an axis of the mesh {mesh.axis_names}."
        )
    n = mesh.shape[axis_name]
    inputs.check_qkv(fn, q, k, v)
    t, s = q.shape[1], k.shape[1]
    layouts.check_layout(fn, layout, t, n, "query length")
    layouts.check_layout(fn, layout, s, n, "key length")
    # Positions the caller did not give come from the layout. If neither was given, the ring
    # derives them itself and then knows statically which of its steps the mask needs.
    given = q_positions is not None or kv_positions is not None
    if q_positions is None:
        q_positions = layouts.layout_positions(layout, t, n)
    if kv_positions is None:
        kv_positions = layouts.layout_positions(layout, s, n)
    spec, m, scale = inputs.check_and_normalize(
        fn,
        q,
        k,
        v,
        causal=causal,
        local_window_size=local_window_size,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_positions=q_positions,
        kv_positions=kv_positions,
        scale=scale,
    )
    check_blocks(fn, block_q, block_k)

    seq = P(None, axis_name)
    qkv = P(None, axis_name, None, None)
    args = (q, k, v, *((m.q_pos, m.kv_pos) if given else (None, None)), m.q_seg, m.kv_seg)
    specs = (qkv, qkv, qkv, seq, seq, seq, seq)
    args = tuple(
        None if x is None else _place(x, mesh, sp) for x, sp in zip(args, specs, strict=True)
    )

    def local(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        return ring.ring_attention(
            q,
            k,
            v,
            axis_name=axis_name,
            layout=layout,
            causal=spec.causal,
            local_window_size=spec.window,
            segment_ids=q_seg,
            kv_segment_ids=kv_seg,
            q_positions=q_pos,
            kv_positions=kv_pos,
            scale=scale,
            block_q=block_q,
            block_k=block_k,
            return_lse=True,
        )

    out, lse = jax.shard_map(
        functools.partial(local),
        mesh=mesh,
        in_specs=specs,
        out_specs=(qkv, P(None, None, axis_name)),
    )(*args)
    return (out, lse) if return_lse else out
