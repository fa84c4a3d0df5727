"""Ring attention (pass-KV), called inside `jax.shard_map` on the local shards.

At step s device r holds the k/v shard of device r - s. Each step first issues the send of the
shard it holds to r + 1, then continues its softmax state with that shard, so XLA can overlap the
transfer with the compute; the forward sends n - 1 times. A step whose shard the mask rules out
entirely (a causal future shard, a shard outside every window) computes nothing.

The backward runs the same ring. dK/dV accumulators travel with their K/V, gather every device's
contribution and arrive home after the n-th send; dQ stays put. All accumulators are updated in
place by the blockwise kernel, so no step allocates a full-size temporary.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ringattn.attention import blockwise, masks
from ringattn.attention.blockwise import Config, Side
from ringattn.attention.kernels import dispatch
from ringattn.parallel import layouts


class RingPlan(NamedTuple):
    """Which ring steps run: `steps` consecutive ones from step `first` (mod n).

    At step s device r holds the k/v shard of device r - s. The first step's shard is fetched
    with one send of shift `first`, each later one with a hop to the next device."""

    first: int
    steps: int


@functools.lru_cache(maxsize=256)  # static arguments; every layer of a model asks the same
def plan_ring(spec, layout, n, q_len, kv_len) -> RingPlan:
    """The shortest run of steps that holds every step some device needs, from the positions
    `layout` gives each shard (segment ids are not known statically and are ignored, which is
    safe: a step that runs but is not needed computes nothing). A causal window of T / (2n) in
    the contiguous layout needs steps {0, 1}: 2 steps and 1 send instead of n and n - 1."""

    def ranges(length, shard):  # bounds of the positions each shard in `shard` holds
        pos = np.stack([layouts.shard_positions(layout, length, r, n) for r in range(n)])
        return masks.Ranges(pos.min(1)[shard], pos.max(1)[shard], None, None)

    s_R, r_R = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")  # [step, device]
    with jax.ensure_compile_time_eval():  # concrete values, also while tracing a shard_map
        state = masks.tile_state(spec, ranges(q_len, r_R), ranges(kv_len, (r_R - s_R) % n))
    state = np.broadcast_to(np.asarray(state), s_R.shape)  # a scalar when nothing is masked
    needed = [bool(x) for x in (state != masks.SKIP).any(axis=1)]
    if all(needed) or not any(needed):
        return RingPlan(0, n)
    # The complement of the longest cyclic run of unneeded steps.
    best_len, best_end = 0, 0
    for start in range(n):
        length = 0
        while length < n and not needed[(start + length) % n]:
            length += 1
        if length > best_len:
            best_len, best_end = length, (start + length) % n
    return RingPlan(best_end, n - best_len)


def _send(tree, axis_name, n, shift=1):
    """Send every array of `tree` from each device r to r + shift. Narrow floats travel as bits
    (blockwise.to_storage), which also keeps XLA:CPU from widening them."""
    return lax.ppermute(tree, axis_name, perm=[(i, (i + shift) % n) for i in range(n)])


def _visible(cfg, qs: Side, ks: Side):
    """Whether any query of this device sees any key of the shard it holds."""
    state = masks.tile_state(
        cfg.spec, masks.reduce_ranges(qs.ranges), masks.reduce_ranges(ks.ranges)
    )
    return state != masks.SKIP


def _ring_loop(n, axis_name, plan, compute, kv, carry, send_carry=False):
    """`carry = compute(kv, carry)` over the plan's steps, kv moving one hop between steps.

    With `send_carry`, the carry's last element (dK/dV) moves with kv, and after the last step
    goes home to the device that owns its shard.
    """
    if plan.first:
        kv = _send(kv, axis_name, n, plan.first)

    def step(_, state):
        kv, carry = state
        kv_next = _send(kv, axis_name, n)  # issued before the compute it overlaps
        carry = compute(kv, carry)
        if send_carry:
            carry = (*carry[:-1], _send(carry[-1], axis_name, n))
        return kv_next, carry

    kv, carry = lax.fori_loop(0, plan.steps - 1, step, (kv, carry))
    carry = compute(kv, carry)
    home = -(plan.first + plan.steps - 1) % n
    if send_carry and home:
        carry = (*carry[:-1], _send(carry[-1], axis_name, n, home))
    return carry


def _fwd(cfg, axis_name, plan, q, k, v, m):
    ops = blockwise.kernel_ops(cfg)  # the XLA kernel's passes or a fused kernel's
    qs, q_, kv = ops.prepare(cfg, q, k, v, m)

    def compute(kv, state):
        k_, v_, kpos, kseg = kv
        ks = ops.kv_side(cfg, kpos, kseg)
        return lax.cond(
            _visible(cfg, qs, ks),
            lambda c: ops.fwd_pass(cfg, q_, k_, v_, qs, ks, *c),
            lambda c: c,
            state,
        )

    n = lax.psum(1, axis_name)
    state = _ring_loop(n, axis_name, plan, compute, kv, ops.init_fwd_state(cfg, q_))
    out, lse = ops.finish_fwd(cfg, q, *state)
    return (out, lse), (q, k, v, m, out, lse)


def _bwd(cfg, axis_name, plan, res, cts):
    q, k, v, m, out, lse = res
    ops = blockwise.kernel_ops(cfg)
    qs, q_, kv = ops.prepare(cfg, q, k, v, m)
    do_, lse_, delta = ops.prepare_bwd(cfg, k, out, lse, *cts)

    def compute(kv, carry):
        k_, v_, kpos, kseg = kv
        dq, (dk, dv) = carry
        ks = ops.kv_side(cfg, kpos, kseg)
        dq, dk, dv = lax.cond(
            _visible(cfg, qs, ks),
            lambda g: ops.bwd_pass(cfg, q_, k_, v_, do_, lse_, delta, qs, ks, g),
            lambda g: g,
            (dq, dk, dv),
        )
        return dq, (dk, dv)

    acc = blockwise.acc_dtype(cfg)
    zeros = lambda x: jnp.zeros_like(x, dtype=acc)  # noqa: E731
    carry = (zeros(q_), (zeros(kv[0]), zeros(kv[1])))
    n = lax.psum(1, axis_name)
    dq, (dk, dv) = _ring_loop(n, axis_name, plan, compute, kv, carry, send_carry=True)
    return (*ops.finish_bwd(cfg, q, k, v, dq, dk, dv), None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ring(cfg, axis_name, plan, q, k, v, m):
    return _fwd(cfg, axis_name, plan, q, k, v, m)[0]


_ring.defvjp(_fwd, _bwd)


def ring_attention(
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
    tile_callback=None,
    kernel="auto",
):
    """Exact attention over a sequence sharded along the mesh axis `axis_name`.

    Call inside `jax.shard_map`; q/k/v, segment ids and positions are this device's shards, in
    `layout` order. Positions not given are those `layout` assigns to this device. Returns the
    local output (and lse [B, H, T_local], f32), exactly as dense attention over the whole sequence.
    `tile_callback` as in `blockwise_attention`: it sees every tile every device computes.
    `kernel` as in `blockwise_attention`: the single-device kernel every step runs.
    """
    fn = "ring_attention"
    n = lax.psum(1, axis_name)
    # With positions from the layout, the steps the mask needs are known before tracing.
    from_layout = q_positions is None and kv_positions is None
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
    t, s = q.shape[1], k.shape[1]
    blockwise.check_blocks(fn, block_q, block_k)
    dtype = jnp.result_type(q, k, v)
    kern = dispatch.resolve(fn, kernel, dtype, q.shape[-1], t, s, tile_callback)
    bq, bk = dispatch.blocks(kern, block_q, block_k, t, s)
    cfg = Config(spec, scale, bq, bk, s, dtype, tile_callback, kern)
    plan = plan_ring(spec, layout, n, t, s) if from_layout else RingPlan(0, n)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    out, lse = _ring(cfg, axis_name, plan, q, k, v, m)
    return (out, lse) if return_lse else out
