"""Ulysses attention (DeepSpeed-Ulysses), called inside `jax.shard_map` on the local shards.

One all-to-all turns the sequence-sharded q/k/v [B, T/n, H, D] into head-sharded [B, T, H/n, D]:
device r gets query heads [r H/n, (r + 1) H/n) over the whole sequence, attends with them
(positions and segment ids are gathered to the whole sequence) and a second all-to-all brings
the output back to sequence shards. Two all-to-alls of q/k/v/out each way instead of n - 1 K/V
sends, but the heads must be a multiple of the axis size.

GQA/MQA: K/V are repeated (`repeat_kv`) only as far as each device needs one copy of the KV
heads its query heads use: not at all when n divides K, n / K times when K divides n.
"""

from __future__ import annotations

import math
from typing import Unpack

import jax
from jax import lax

from ringattn.attention import blockwise, inputs, keywords
from ringattn.parallel import layouts, sharding
from ringattn.parallel.allgather import gather_sequence


def check_heads(fn, num_heads, axis_size, axis):
    if num_heads % axis_size:
        raise ValueError(
            f"{fn}: Ulysses splits the heads of `q` ({num_heads}) over the {axis_size} devices of "
            f"axis {axis!r}, so they must be a multiple of {axis_size}; use `strategy`='ring', or "
            f"'hybrid' with a Ulysses axis that divides the heads."
        )


def repeat_kv(k_BSKD, n):
    """KV heads repeated so that n divides them and the all-to-all hands each device exactly the
    KV heads of its query heads: lcm(K, n) heads, each repeated n / gcd(K, n) times (consecutive
    copies, so query head h still uses KV head h // (H / heads))."""
    rep = n // math.gcd(k_BSKD.shape[2], n)
    return k_BSKD if rep == 1 else k_BSKD.repeat(rep, axis=2)


def to_heads(x_BLHD, axis_name):
    """[B, L/n, H, D] sequence shards -> [B, L, H/n, D] head shards, the sequence in shard order."""
    return lax.all_to_all(x_BLHD, axis_name, split_axis=2, concat_axis=1, tiled=True)


def to_sequence(x_BLHD, axis_name):
    """Inverse of `to_heads`."""
    return lax.all_to_all(x_BLHD, axis_name, split_axis=1, concat_axis=2, tiled=True)


def lse_to_sequence(lse_BHL, axis_name):
    """lse [B, H/n, L] head shards -> [B, H, L/n] sequence shards."""
    return lax.all_to_all(lse_BHL, axis_name, split_axis=2, concat_axis=1, tiled=True)


def ulysses(fn, q, k, v, opts, m, sinks, *, axis_name, layout, attend=blockwise.attend):
    """(out, lse) of checked arguments inside shard_map: `attend(fn, q, k, v, opts, m, sinks)`
    on head shards, between the two all-to-alls over `axis_name`, with the positions and segment
    ids of the whole sequence of its group of devices and the sinks of its heads; positions None
    in `m` are the layout's."""
    layouts.check_layout_name(fn, layout)
    n, index = lax.axis_size(axis_name), lax.axis_index(axis_name)
    check_heads(fn, q.shape[2], n, axis_name)
    m = layouts.local_masks(fn, m, layout, index, n, q.shape[1], k.shape[1])
    q_h = to_heads(q, axis_name)
    k_h, v_h = (to_heads(repeat_kv(x, n), axis_name) for x in (k, v))
    q_seg = gather_sequence(m.q_seg, axis_name)
    kv_seg = q_seg if m.kv_seg is m.q_seg else gather_sequence(m.kv_seg, axis_name)
    whole = inputs.MaskArrays(
        gather_sequence(m.q_pos, axis_name), gather_sequence(m.kv_pos, axis_name), q_seg, kv_seg
    )
    if sinks is not None:  # this device's query heads
        heads = q_h.shape[2]
        sinks = lax.dynamic_slice_in_dim(sinks, index * heads, heads)
    out, lse = attend(fn, q_h, k_h, v_h, opts, whole, sinks)
    return to_sequence(out, axis_name), lse_to_sequence(lse, axis_name)


# One compiled program when called eagerly inside a user's shard_map (ring._ring_jit).
_ulysses_jit = jax.jit(
    ulysses, static_argnums=(0, 4), static_argnames=("axis_name", "layout", "attend")
)


@keywords.takes(keywords.AttentionKeywords)
def ulysses_attention(
    q,
    k,
    v,
    *,
    axis_name,
    layout="contiguous",
    return_lse=False,
    **attention: Unpack[keywords.AttentionKeywords],
):
    """Exact attention over a sequence sharded along `axis_name`, by all-to-all to head shards.

    Call inside `jax.shard_map` with the local shards (in `layout` order), like `ring_attention`;
    positions not given are those `layout` assigns to this device. The heads of q must be a
    multiple of the axis size. `kernel` as in `blockwise_attention`.
    """
    fn = "ulysses_attention"
    sharding.check_bound(fn, axis_name, "ringattn.context_parallel_attention")
    opts, m, sinks = inputs.check(fn, q, k, v, **attention, fill_positions=False)
    out, lse = _ulysses_jit(fn, q, k, v, opts, m, sinks, axis_name=axis_name, layout=layout)
    return (out, lse) if return_lse else out
