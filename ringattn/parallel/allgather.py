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

import dataclasses
from typing import Unpack

import jax
from jax import lax

from ringattn.attention import inputs, keywords
from ringattn.attention.blockwise import exact_attention, make_config
from ringattn.attention.kernels import base
from ringattn.attention.kernels.xla import Xla
from ringattn.parallel import layouts, sharding


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


def _put(x, part, start, axis):
    return lax.dynamic_update_slice_in_dim(x, part, start, axis)


@dataclasses.dataclass(frozen=True)
class AllGather:
    """The kernel's passes over the gathered k/v, `chunks` KV-head chunks at a time (the XLA
    kernel only when chunks > 1: its grouped layout is what the chunks slice). `m` holds the
    local query side and the gathered key side."""

    axis_name: str
    chunks: int

    def _operands(self, cfg, q, k, v, m):
        """Mask sides (q local, k/v gathered), q in the kernel's layout, local k/v stored."""
        qs = base.make_side(m.q_pos, m.q_seg, cfg.block_q)
        ks = base.make_side(m.kv_pos, m.kv_seg, cfg.block_k)
        q_ = base.pad_to_block(cfg.kernel.store_q(q, k.shape[2]), cfg.block_q)
        return qs, ks, q_, cfg.kernel.store_kv(k), cfg.kernel.store_kv(v)

    def _loop(self, cfg, k_, v_, body, carry):
        """`carry = body(start, slicer, k_i, v_i, carry)` for each chunk of KV heads, in order.

        `start` is the chunk's first KV head, k_i/v_i the chunk gathered over the axis and
        padded to whole blocks; `slicer(x, axis)` cuts the chunk's heads out of any array grouped
        by KV head. A loop, not a Python unroll, so that XLA cannot hold two gathered chunks.
        """
        kc = k_.shape[2] // self.chunks

        def step(i, carry):
            sl = lambda x, ax: lax.dynamic_slice_in_dim(x, i * kc, kc, ax)  # noqa: E731
            if self.chunks == 1:  # the identity (fused kernels' operands have other layouts)
                sl = lambda x, ax: x  # noqa: E731
            k_i, v_i = (
                base.pad_to_block(gather_sequence(sl(x, 2), self.axis_name), cfg.block_k)
                for x in (k_, v_)
            )
            return body(i * kc, sl, k_i, v_i, carry)

        return lax.fori_loop(0, self.chunks, step, carry) if self.chunks > 1 else step(0, carry)

    def forward(self, cfg, q, k, v, m):
        kern = cfg.kernel
        qs, ks, q_, k_, v_ = self._operands(cfg, q, k, v, m)

        def body(start, sl, k_i, v_i, state):
            o, lse = state
            o_i, lse_i = kern.fwd_pass(cfg, sl(q_, 2), k_i, v_i, qs, ks, (sl(o, 2), sl(lse, 1)))
            return _put(o, o_i, start, 2), _put(lse, lse_i, start, 1)

        state = self._loop(cfg, k_, v_, body, kern.init_state(cfg, q_, v_))
        return kern.finish_fwd(cfg, q, state)

    def backward(self, cfg, q, k, v, m, b):
        kern = cfg.kernel
        qs, ks, q_, k_, v_ = self._operands(cfg, q, k, v, m)
        do_, lse_, rest = kern.prepare_bwd(cfg, q, k, b)  # rest: delta, or BwdAux (chunks = 1)

        def body(start, sl, k_i, v_i, grads):
            dq, dk, dv = grads
            _, dk0, dv0 = kern.init_grads(cfg, q_, k_i, v_i)
            bwd = (sl(do_, 2), sl(lse_, 1), sl(rest, 1))
            dq_i, dk_i, dv_i = kern.bwd_pass(
                cfg, sl(q_, 2), k_i, v_i, bwd, qs, ks, (sl(dq, 2), dk0, dv0)
            )
            # Every device's contribution to each k/v shard, summed on the shard's owner.
            dk_i, dv_i = (
                lax.psum_scatter(
                    x[:, : cfg.kv_len], self.axis_name, scatter_dimension=1, tiled=True
                )
                for x in (dk_i, dv_i)
            )
            return _put(dq, dq_i, start, 2), _put(dk, dk_i, start, 2), _put(dv, dv_i, start, 2)

        grads = self._loop(cfg, k_, v_, body, kern.init_grads(cfg, q_, k_, v_))
        return kern.finish_bwd(cfg, q, k, v, grads)


def allgather(fn, q, k, v, opts: inputs.Options, m, sinks, *, axis_name, layout, head_chunks=1):
    """(out, lse) of checked arguments inside shard_map; positions None in `m` are the layout's."""
    layouts.check_layout_name(fn, layout)
    check_head_chunks(fn, head_chunks, k.shape[2])
    n, t = lax.axis_size(axis_name), q.shape[1]
    m = layouts.local_masks(fn, m, layout, lax.axis_index(axis_name), n, t, k.shape[1])
    m = m._replace(
        kv_pos=gather_sequence(m.kv_pos, axis_name), kv_seg=gather_sequence(m.kv_seg, axis_name)
    )
    if opts.kernel == "auto" and head_chunks > 1:
        opts = dataclasses.replace(opts, kernel="xla")  # chunks slice the XLA kernel's layout
    cfg = make_config(fn, opts, q, k, v, m, kv_len=k.shape[1] * n)
    if not isinstance(cfg.kernel, Xla) and head_chunks > 1:
        raise ValueError(
            f"{fn}: kernel={opts.kernel!r} runs with head_chunks=1 only, got {head_chunks}; use "
            f"kernel='xla' to gather K/V in chunks."
        )
    q, k, v = (x.astype(cfg.dtype) for x in (q, k, v))
    return exact_attention(cfg, AllGather(axis_name, head_chunks), q, k, v, m, sinks)


# One compiled program when called eagerly inside a user's shard_map (ring._ring_jit).
_allgather_jit = jax.jit(
    allgather, static_argnums=(0, 4), static_argnames=("axis_name", "layout", "head_chunks")
)


@keywords.takes(keywords.AttentionKeywords)
def allgather_attention(
    q,
    k,
    v,
    *,
    axis_name,
    layout="contiguous",
    head_chunks=1,
    return_lse=False,
    **attention: Unpack[keywords.AttentionKeywords],
):
    """Exact attention over a sequence sharded along `axis_name`, by gathering K/V.

    Call inside `jax.shard_map` with the local shards (in `layout` order), like `ring_attention`;
    positions not given are those `layout` assigns to this device. `head_chunks` (dividing the
    KV heads) bounds the gathered K/V per device to 1 / head_chunks of it. `kernel` as in
    `blockwise_attention`; fused kernels need head_chunks = 1 ("auto" then runs XLA).
    """
    fn = "allgather_attention"
    sharding.check_bound(fn, axis_name, "ringattn.context_parallel_attention")
    opts, m, sinks = inputs.check(fn, q, k, v, **attention, fill_positions=False)
    out, lse = _allgather_jit(
        fn, q, k, v, opts, m, sinks, axis_name=axis_name, layout=layout, head_chunks=head_chunks
    )
    return (out, lse) if return_lse else out
