"""All-gather attention, called inside `jax.shard_map` on the local shards.

Each device gathers the whole K/V (and their positions and segment ids) along the axis and
attends with its local queries in one step: the fewest steps of any strategy, with exposed
communication, often the best at small axis sizes. With `head_chunks` > 1 only one chunk of KV
heads (with the query heads that use it) is gathered at a time, in a loop, so a device never
holds more than S x K / head_chunks gathered keys and values.

The backward re-gathers each chunk instead of saving it and reduce-scatters dK/dV
(`lax.psum_scatter`, the transpose of the forward's `all_gather`), so with chunks the training
memory is bounded too: residuals are the local shards, never the gathered K/V.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ringattn.attention import blockwise
from ringattn.attention.blockwise import Config
from ringattn.attention.kernels import dispatch
from ringattn.parallel import layouts


def gather_sequence(x, axis_name, axis=1):
    """The whole sequence of a sharded array (None passes through)."""
    return None if x is None else lax.all_gather(x, axis_name, axis=axis, tiled=True)


def check_head_chunks(fn, head_chunks, num_kv_heads):
    if not isinstance(head_chunks, int) or isinstance(head_chunks, bool) or head_chunks <= 0:
        raise ValueError(f"{fn}: `head_chunks` must be a positive int, got {head_chunks!r}.")
    if num_kv_heads % head_chunks:
        raise ValueError(
            f"{fn}: `head_chunks` must divide the key/value heads of `k` ({num_kv_heads}), "
            f"got {head_chunks}."
        )


def _chunks(cfg, axis_name, chunks, k_, v_, body, carry):
    """`carry = body(start, slicer, k_i, v_i, carry)` for each chunk of KV heads, in order.

    `start` is the chunk's first KV head, k_i/v_i the chunk gathered over the axis and padded to
    whole blocks; `slicer(x, axis)` cuts the chunk's heads out of any array grouped by KV head.
    A loop, not a Python unroll, so that XLA cannot hold two gathered chunks at once.
    """
    kc = k_.shape[2] // chunks

    def step(i, carry):
        sl = lambda x, ax: lax.dynamic_slice_in_dim(x, i * kc, kc, ax)  # noqa: E731
        if chunks == 1:  # the identity (fused kernels' operands have other head layouts)
            sl = lambda x, ax: x  # noqa: E731
        k_i, v_i = (
            blockwise.pad_to_block(gather_sequence(sl(x, 2), axis_name), cfg.block_k)
            for x in (k_, v_)
        )
        return body(i * kc, sl, k_i, v_i, carry)

    return lax.fori_loop(0, chunks, step, carry) if chunks > 1 else step(0, carry)


def _operands(cfg, q, k, v, m):
    """Mask sides (m: local q side, gathered kv side), q grouped and padded, local k/v; narrow
    floats as bits (`blockwise.to_storage`), which also travel as bits. A fused kernel's q is
    only padded and its k/v are as given."""
    qs = blockwise.make_side(m.q_pos, m.q_seg, cfg.block_q)
    ks = blockwise.make_side(m.kv_pos, m.kv_seg, cfg.block_k)
    if cfg.kernel is not None:
        return qs, ks, blockwise.pad_to_block(q, cfg.block_q), k, v
    q_ = blockwise.pad_to_block(blockwise.group_heads(q, k.shape[2]), cfg.block_q)
    return qs, ks, *(blockwise.to_storage(x) for x in (q_, k, v))


def _put(x, part, start, axis):
    return lax.dynamic_update_slice_in_dim(x, part, start, axis)


def _fwd(cfg, axis_name, chunks, q, k, v, m):
    ops = blockwise.kernel_ops(cfg)
    qs, ks, q_, k_, v_ = _operands(cfg, q, k, v, m)

    def body(start, sl, k_i, v_i, state):
        o, lse = state
        o_i, lse_i = ops.fwd_pass(cfg, sl(q_, 2), k_i, v_i, qs, ks, sl(o, 2), sl(lse, 1))
        return _put(o, o_i, start, 2), _put(lse, lse_i, start, 1)

    state = _chunks(cfg, axis_name, chunks, k_, v_, body, ops.init_fwd_state(cfg, q_))
    out, lse = ops.finish_fwd(cfg, q, *state)
    return (out, lse), (q, k, v, m, out, lse)


def _bwd(cfg, axis_name, chunks, res, cts):
    q, k, v, m, out, lse = res
    ops = blockwise.kernel_ops(cfg)
    qs, ks, q_, k_, v_ = _operands(cfg, q, k, v, m)
    do_, lse_, delta = ops.prepare_bwd(cfg, k, out, lse, *cts)
    acc = blockwise.acc_dtype(cfg)

    def body(start, sl, k_i, v_i, grads):
        dq, dk, dv = grads
        zero = jnp.zeros_like(k_i, dtype=acc)
        g = (sl(dq, 2), zero, zero)
        dq_i, dk_i, dv_i = ops.bwd_pass(
            cfg, sl(q_, 2), k_i, v_i, sl(do_, 2), sl(lse_, 1), sl(delta, 1), qs, ks, g
        )
        # Every device's contribution to each k/v shard, summed on the shard's owner.
        dk_i, dv_i = (
            lax.psum_scatter(x[:, : cfg.kv_len], axis_name, scatter_dimension=1, tiled=True)
            for x in (dk_i, dv_i)
        )
        return _put(dq, dq_i, start, 2), _put(dk, dk_i, start, 2), _put(dv, dv_i, start, 2)

    zeros = lambda x: jnp.zeros_like(x, dtype=acc)  # noqa: E731
    grads = _chunks(cfg, axis_name, chunks, k_, v_, body, (zeros(q_), zeros(k_), zeros(v_)))
    return (*ops.finish_bwd(cfg, q, k, v, *grads), None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _allgather(cfg, axis_name, chunks, q, k, v, m):
    return _fwd(cfg, axis_name, chunks, q, k, v, m)[0]


_allgather.defvjp(_fwd, _bwd)


def allgather_attention(
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
    head_chunks=1,
    return_lse=False,
    kernel="auto",
):
    """Exact attention over a sequence sharded along `axis_name`, by gathering K/V.

    Call inside `jax.shard_map` with the local shards (in `layout` order), like `ring_attention`;
    positions not given are those `layout` assigns to this device. `head_chunks` (dividing the
    KV heads) bounds the gathered K/V per device to 1 / head_chunks of it. `kernel` as in
    `blockwise_attention`; fused kernels need head_chunks = 1 ("auto" then runs XLA).
    """
    fn = "allgather_attention"
    n = lax.psum(1, axis_name)
    spec, m, scale = layouts.check_local(
        fn,
        q,
        k,
        v,
        lax.axis_index(axis_name),
        n,
        layout=layout,
        q_positions=q_positions,
        kv_positions=kv_positions,
        causal=causal,
        local_window_size=local_window_size,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        scale=scale,
    )
    check_head_chunks(fn, head_chunks, k.shape[2])
    blockwise.check_blocks(fn, block_q, block_k)
    m = m._replace(
        kv_pos=gather_sequence(m.kv_pos, axis_name), kv_seg=gather_sequence(m.kv_seg, axis_name)
    )
    dtype = jnp.result_type(q, k, v)
    t, s = q.shape[1], k.shape[1] * n
    # "auto" gathers in chunks with the XLA kernel: fused kernels take whole K/V.
    auto_xla = kernel == "auto" and head_chunks > 1
    kern = dispatch.resolve(fn, "xla" if auto_xla else kernel, dtype, q.shape[-1], t, s)
    if kern is not None and head_chunks > 1:
        raise ValueError(
            f"{fn}: kernel={kernel!r} runs with head_chunks=1 only, got {head_chunks}; use "
            f"kernel='xla' to gather K/V in chunks."
        )
    bq, bk = dispatch.blocks(kern, block_q, block_k, t, s)
    cfg = Config(spec, scale, bq, bk, s, dtype, None, kern)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    out, lse = _allgather(cfg, axis_name, head_chunks, q, k, v, m)
    return (out, lse) if return_lse else out
