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

import dataclasses
import functools
from typing import NamedTuple, Unpack

import jax
import numpy as np
from jax import lax

from ringattn.attention import inputs, keywords, masks
from ringattn.attention.blockwise import exact_attention, make_config
from ringattn.attention.kernels import base
from ringattn.attention.kernels.xla import from_storage, to_storage
from ringattn.parallel import layouts, sharding


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
    the contiguous layout needs steps {0, 1}: 2 steps and 1 send instead of n and n - 1.
    Computed in numpy: nothing here is traced, whatever the caller is tracing."""

    def ranges(length, shard):  # bounds of the positions each shard in `shard` holds
        pos = np.stack([layouts.shard_positions(layout, length, r, n) for r in range(n)])
        return masks.Ranges(pos.min(1)[shard], pos.max(1)[shard], None, None)

    s_R, r_R = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")  # [step, device]
    state = masks.tile_state(spec, ranges(q_len, r_R), ranges(kv_len, (r_R - s_R) % n))
    state = np.broadcast_to(state, s_R.shape)  # a scalar when nothing is masked
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


def send(tree, axis_name, n, shift=1):
    """Send every array of `tree` from each device r to r + shift. Narrow floats travel as bits
    (as the XLA kernel stores them), which keeps XLA:CPU from widening them to f32."""
    bits = jax.tree.map(to_storage, tree)
    bits = lax.ppermute(bits, axis_name, perm=[(i, (i + shift) % n) for i in range(n)])
    return jax.tree.map(lambda b, x: from_storage(b, x.dtype), bits, tree)


def visible(cfg, qs: base.Side, ks: base.Side):
    """Whether any query of this device sees any key of the shard it holds."""
    state = masks.tile_state(
        cfg.spec, masks.reduce_ranges(qs.ranges), masks.reduce_ranges(ks.ranges)
    )
    return state != masks.SKIP


def forward_step(cfg, q_, qs: base.Side, kv, state):
    """cfg.kernel's forward pass of the queries (q_ and their side qs) over one k/v bundle
    (base.prepare_kv's form), unless the mask rules all of it out."""
    k_, v_, kpos, kseg = kv
    ks = base.kv_side(cfg, kpos, kseg)
    return lax.cond(
        visible(cfg, qs, ks),
        lambda s: cfg.kernel.fwd_pass(cfg, q_, k_, v_, qs, ks, s),
        lambda s: s,
        state,
    )


def ring_loop(n, axis_name, plan, compute, kv, carry, send_carry=False):
    """`carry = compute(kv, carry)` over the plan's steps, kv moving one hop between steps.

    With `send_carry`, the carry's last element (dK/dV) moves with kv, and after the last step
    goes home to the device that owns its shard.
    """
    if plan.first:
        kv = send(kv, axis_name, n, plan.first)

    def step(_, state):
        kv, carry = state
        kv_next = send(kv, axis_name, n)  # issued before the compute it overlaps
        carry = compute(kv, carry)
        if send_carry:
            carry = (*carry[:-1], send(carry[-1], axis_name, n))
        return kv_next, carry

    kv, carry = lax.fori_loop(0, plan.steps - 1, step, (kv, carry))
    carry = compute(kv, carry)
    home = -(plan.first + plan.steps - 1) % n
    if send_carry and home:
        carry = (*carry[:-1], send(carry[-1], axis_name, n, home))
    return carry


@dataclasses.dataclass(frozen=True)
class Ring:
    """The kernel's passes over the k/v shards of every device, passed around `axis_name`."""

    axis_name: str
    plan: RingPlan

    def forward(self, cfg, q, k, v, m):
        kern = cfg.kernel
        qs, q_, kv = base.prepare(cfg, q, k, v, m)

        def compute(kv, state):
            return forward_step(cfg, q_, qs, kv, state)

        n = lax.axis_size(self.axis_name)
        state = ring_loop(
            n, self.axis_name, self.plan, compute, kv, kern.init_state(cfg, q_, kv[1])
        )
        return kern.finish_fwd(cfg, q, state)

    def backward(self, cfg, q, k, v, m, b):
        kern = cfg.kernel
        qs, q_, kv = base.prepare(cfg, q, k, v, m)
        bwd = kern.prepare_bwd(cfg, q, k, b)

        def compute(kv, carry):
            k_, v_, kpos, kseg = kv
            dq, (dk, dv) = carry
            ks = base.kv_side(cfg, kpos, kseg)
            dq, dk, dv = lax.cond(
                visible(cfg, qs, ks),
                lambda g: kern.bwd_pass(cfg, q_, k_, v_, bwd, qs, ks, g),
                lambda g: g,
                (dq, dk, dv),
            )
            return dq, (dk, dv)

        dq, dk, dv = kern.init_grads(cfg, q_, kv[0], kv[1])
        n = lax.axis_size(self.axis_name)
        carry = ring_loop(n, self.axis_name, self.plan, compute, kv, (dq, (dk, dv)), True)
        dq, (dk, dv) = carry
        return kern.finish_bwd(cfg, q, k, v, (dq, dk, dv))


def ring(fn, q, k, v, opts: inputs.Options, m: inputs.MaskArrays, sinks, *, axis_name, layout):
    """(out, lse) of checked arguments inside shard_map (what `ring_attention` and the hybrid
    strategy run); positions None in `m` are the layout's, and then the steps the mask needs
    are known before tracing (`plan_ring`)."""
    layouts.check_layout_name(fn, layout)
    n, t, s = lax.axis_size(axis_name), q.shape[1], k.shape[1]
    from_layout = m.q_pos is None and m.kv_pos is None
    m = layouts.local_masks(fn, m, layout, lax.axis_index(axis_name), n, t, s)
    cfg = make_config(fn, opts, q, k, v, m)
    plan = plan_ring(opts.spec, layout, n, t, s) if from_layout else RingPlan(0, n)
    q, k, v = (x.astype(cfg.dtype) for x in (q, k, v))
    return exact_attention(cfg, Ring(axis_name, plan), q, k, v, m, sinks)


# Called eagerly inside a user's shard_map, one compiled program instead of every op dispatched on
# every device; inside a jit it inlines.
_ring_jit = jax.jit(ring, static_argnums=(0, 4), static_argnames=("axis_name", "layout"))


@keywords.takes(keywords.AttentionKeywords)
def ring_attention(
    q,
    k,
    v,
    *,
    axis_name,
    layout="contiguous",
    return_lse=False,
    **attention: Unpack[keywords.AttentionKeywords],
):
    """Exact attention over a sequence sharded along the mesh axis `axis_name`.

    Call inside `jax.shard_map`; q/k/v, segment ids and positions are this device's shards, in
    `layout` order, `sinks` [H] the whole (replicated) vector. Positions not given are those
    `layout` assigns to this device. Returns the local output (and lse [B, H, T_local], f32),
    exactly as dense attention over the whole sequence. `tile_callback` as in
    `blockwise_attention`: it sees every tile every device computes. `kernel` as in
    `blockwise_attention`: the single-device kernel every step runs.
    """
    fn = "ring_attention"
    sharding.check_bound(fn, axis_name, "ringattn.context_parallel_attention")
    opts, m, sinks = inputs.check(fn, q, k, v, **attention, fill_positions=False)
    out, lse = _ring_jit(fn, q, k, v, opts, m, sinks, axis_name=axis_name, layout=layout)
    return (out, lse) if return_lse else out
