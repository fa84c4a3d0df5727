"""A cost model for context-parallel attention: per device compute, communication, memory and an
estimated time for each strategy, from the tile schedules of `schedule.py` and named constants.

For one attention call, forward and (by default) backward, per device:
  flops     sum over steps of the busiest device's tile area (block_q x block_k per computed
            tile, masked or not) x batch x its heads x flops per (query, key) pair: 4 D forward
            (QK^T, PV) and 10 D backward (QK^T again, dV, dP, dQ, dK). Devices run in lockstep.
  bytes     what one device sends (narrow K/V in their dtype, dK/dV accumulators in f32).
  exposed   communication not hidden behind compute. ring: a hop overlaps the compute of its
            step, so only the first fetch (a shortened plan), the excess of a hop over its step's
            compute and, backward, the dK/dV hop that the next step waits for are exposed.
            allgather (gather, re-gather and reduce-scatter) and ulysses (2 all-to-alls each
            way) expose all of theirs. With `Hardware(overlap=False)` (XLA:CPU's simulated
            devices, which run collectives between computations) every hop is exposed too.
  time      flops / flops_per_s + exposed; each collective or hop also costs `step_latency_s`.
  memory    peak extra bytes beyond the local inputs and outputs (buffers, f32 accumulators).
The constants are order-of-magnitude defaults (`Hardware`); pass measured ones to compare
strategies on a given machine. Segment ids are unknown here: the mask is the worst case over them.

With `cached_len`, the estimates are those of chunked prefill instead (prefill_costs.py): a chunk
of q_len new tokens against a cache already holding cached_len, strategies pass_kv, pass_q and
decode, forward only.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
from typing import NamedTuple

import numpy as np

from ringattn.attention.masks import SKIP
from ringattn.parallel import layouts, prefill_costs, ring, schedule


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Per-device constants of the time estimate."""

    flops_per_s: float = 400e12  # sustained attention-kernel FLOP/s of one device (bf16, H100-ish)
    link_bytes_per_s: float = 100e9  # bytes/s one device sends (NVLink ~450e9, TPU ICI ~50e9)
    step_latency_s: float = 10e-6  # fixed cost of each hop or collective
    # Whether a ring hop runs while its step computes (asynchronous collectives: GPUs, TPUs).
    # False: every byte moved is exposed, as between the simulated devices of XLA:CPU.
    overlap: bool = True


class Estimate(NamedTuple):
    strategy: str
    feasible: bool
    reason: str  # why it is infeasible, else ""
    flops: float  # on the busiest device
    bytes_moved: float  # sent per device
    comm_steps: int  # hops / collectives, in sequence
    exposed_comm_s: float
    peak_extra_bytes: float
    time_s: float
    balance: float  # total tile area / (n * sum of per-step maxima): 1 = nobody waits
    why: str


_MAX_TILES = 1 << 22  # larger tile grids: coarser blocks (more of a partial tile is charged)


@functools.lru_cache(maxsize=256)
def _areas(kind, spec, layout, n, groups, q_len, kv_len, block_q, block_k):
    """(per-step max tile area, balance, plan) of a ring over n // groups chunks (kind "ring")
    or one step with each device's queries against the gathered sequence ("allgather"), or the
    whole sequence's tiles ("ulysses")."""
    qpos = schedule.shard_positions(layout, q_len, n, n if kind == "ulysses" else groups)
    kpos = schedule.shard_positions(layout, kv_len, n, groups if kind == "ring" else n)
    bq, bk = min(block_q, qpos.shape[1]), min(block_k, kpos.shape[1])
    while qpos.size // bq * kpos.size // bk > _MAX_TILES:
        bq, bk = min(2 * bq, qpos.shape[1]), min(2 * bk, kpos.shape[1])
    st, shard = schedule.states(spec, qpos, kpos, bq, bk)
    tiles = (st != SKIP).sum(axis=(1, 3)) * (shard != SKIP) * bq * bk  # [Mq, Mk]
    m = qpos.shape[0]
    if kind == "ring":
        # hybrid passes positions to its ring, which then runs every step
        plan = ring.plan_ring(spec, layout, n, q_len // n, kv_len // n)
        plan = plan if groups == 1 else ring.RingPlan(0, m)
        steps = [(plan.first + i) % m for i in range(plan.steps)]
        area = np.asarray([[tiles[r, (r - s) % m] for r in range(m)] for s in steps])
    else:
        plan, area = ring.RingPlan(0, 1), tiles.T  # one step
    crit = area.max(axis=1)
    return tuple(crit.tolist()), float(area.sum() / (m * crit.sum())) if crit.sum() else 1.0, plan


def _axes(axis_name, sizes):
    names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
    for a in names:
        if a not in sizes:
            raise ValueError(f"estimate_costs: `axis_name` {a!r} is not in `mesh_axis_sizes`.")
    return names, [int(sizes[a]) for a in names]


def estimate_costs(
    *,
    batch,
    q_len,
    kv_len,
    num_heads,
    num_kv_heads,
    head_dim,
    dtype,
    mesh_axis_sizes: dict,
    axis_name,
    causal,
    local_window_size,
    layout,
    block_q=512,
    block_k=512,
    backward=True,
    hardware: Hardware | None = None,
    cached_len=None,
    cache_layout="striped",
    cache_slots=None,
) -> dict[str, Estimate]:
    """Estimates for "ring", "allgather", "ulysses" over the axis (or axes) `axis_name`, and
    "hybrid" when `axis_name` is a pair (ulysses_axis, ring_axis), sharded ring-major like
    `context_parallel_attention`. Strategies it cannot run are marked infeasible.

    With `cached_len` (an int >= 0), those of chunked prefill (ringattn.decode.chunked): "pass_kv",
    "pass_q" and "decode" for a chunk of q_len tokens in `layout` order after cached_len cached
    ones, the cache laid out as `cache_layout` ("striped" or "contiguous") over `cache_slots`
    slots (default: cached_len + q_len, rounded up to the devices); forward only, kv_len and
    `backward` unused."""
    fn = "estimate_costs"
    hw = hardware or Hardware()
    ints = dict(batch=batch, q_len=q_len, kv_len=kv_len, num_heads=num_heads, head_dim=head_dim)
    ints.update({f"mesh_axis_sizes[{a!r}]": x for a, x in mesh_axis_sizes.items()})
    for name, x in dict(ints, num_kv_heads=num_kv_heads).items():
        schedule.check_int(fn, name, x)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"{fn}: `num_heads` ({num_heads}) must be a multiple of `num_kv_heads` "
            f"({num_kv_heads})."
        )
    spec = schedule.mask_spec(fn, causal, local_window_size)
    names, sizes = _axes(axis_name, mesh_axis_sizes)
    n, b, h, kh, d = math.prod(sizes), batch, num_heads, num_kv_heads, head_dim
    e, f32 = np.dtype(dtype).itemsize, 4
    pair_flops = 4 * d + (10 * d if backward else 0)
    lq, lk = q_len // n, kv_len // n
    bw, lat = hw.link_bytes_per_s, hw.step_latency_s
    if cached_len is not None:
        return _prefill(
            fn, b, q_len, h, kh, d, np.dtype(dtype).itemsize, names, n, spec, layout,
            (block_q, block_k), hw, cached_len, cache_layout, cache_slots,
        )  # fmt: skip
    out = {}
    try:
        layouts.check_layout(fn, layout, q_len, n, "`q_len`")
        layouts.check_layout(fn, layout, kv_len, n, "`kv_len`")
        bad_layout = ""
    except ValueError as err:
        bad_layout = str(err)

    def infeasible(name, reason):
        nan = float("nan")
        return Estimate(name, False, reason, nan, nan, 0, nan, nan, float("inf"), nan, reason)

    def ulysses_part(u):
        """Bytes, all-to-alls, exposed seconds, extra memory of Ulysses over u devices."""
        kr = math.lcm(kh, u)  # KV heads after `ulysses.repeat_kv`
        q_b, kv_b = b * lq * h * d * e, b * lk * 2 * kr * d * e
        fwd = (2 * q_b + kv_b) * (u - 1) / u  # q, k, v in; out back
        bwd = (3 * q_b + 2 * kv_b) * (u - 1) / u if backward else 0.0  # do in; dq, dk, dv back
        a2a = 4 if backward else 2
        return fwd + bwd, a2a, (fwd + bwd) / bw + a2a * lat, 2 * q_b + kv_b, kr // u

    def ring_part(m, groups, heads, kvh):
        crit, bal, plan = _areas("ring", spec, layout, n, groups, q_len, kv_len, block_q, block_k)
        c = [a * b * heads * 4 * d / hw.flops_per_s for a in crit]
        cb = [a * b * heads * 10 * d / hw.flops_per_s for a in crit]
        kv_b = b * (kv_len // m) * 2 * kvh * d * e
        dkv_b = kv_b / e * f32
        hop, dhop = kv_b / bw + lat, dkv_b / bw + lat
        hops = plan.steps - 1 + (plan.first != 0)
        hidden = lambda x: x if hw.overlap else 0.0  # noqa: E731
        exposed = hop * (plan.first != 0) + sum(max(0.0, hop - hidden(x)) for x in c[:-1])
        moved, steps = hops * kv_b, hops
        home = -(plan.first + plan.steps - 1) % m != 0
        if backward:
            exposed += hop * (plan.first != 0) + sum(max(0.0, hop - hidden(x)) for x in cb[:-1])
            exposed += dhop * (plan.steps - 1 + home)
            moved += hops * kv_b + (plan.steps - 1 + home) * dkv_b
            steps += hops + plan.steps - 1 + home
        mem = kv_b + b * (q_len // m) * heads * d * f32 + (2 * dkv_b if backward else 0)
        flops = sum(crit) * b * heads * pair_flops
        why = f"{plan.steps} of {m} ring steps, tile balance {bal:.2f}"
        return flops, moved, steps, exposed, mem, bal, why

    def finish(name, flops, moved, steps, exposed, mem, bal, why):
        t = flops / hw.flops_per_s + exposed
        why = f"{name}: {why}; {exposed / t if t else 0:.0%} of {t:.3g} s is exposed communication"
        out[name] = Estimate(name, True, "", flops, moved, steps, exposed, mem, t, bal, why)

    single = len(names) == 1
    for name in ("ring", "allgather", "ulysses"):
        if bad_layout:
            out[name] = infeasible(name, bad_layout)
            continue
        if name == "ring":
            est = ring_part(n, 1, h, kh)
        elif name == "allgather":
            crit, bal, _ = _areas("allgather", spec, layout, n, 1, q_len, kv_len, block_q, block_k)
            kv_b, dkv_b = b * lk * 2 * kh * d * e, b * lk * 2 * kh * d * f32
            colls = 3 if backward else 1  # gather; re-gather and reduce-scatter dK/dV
            moved = (n - 1) * (kv_b * (2 if backward else 1) + (dkv_b if backward else 0))
            mem = n * kv_b + (n * dkv_b if backward else 0) + b * lq * h * d * f32
            flops = crit[0] * b * h * pair_flops
            est = (flops, moved, colls, moved / bw + colls * lat, mem, bal, "one step")
        else:
            if h % n:
                out[name] = infeasible(name, f"ulysses: {h} heads not divisible by {n} devices")
                continue
            crit, bal, _ = _areas("ulysses", spec, layout, n, 1, q_len, kv_len, block_q, block_k)
            moved, a2a, exposed, mem, _ = ulysses_part(n)
            mem += b * q_len * (h // n) * d * f32
            flops = crit[0] * b * (h / n) * pair_flops
            est = (flops, moved, a2a, exposed, mem, bal, f"{a2a} all-to-alls")
        finish(name, *est)
        if not single:  # context_parallel_attention runs a pair of axes with hybrid only
            reason = f"{name} over the pair {names} is not run by context_parallel_attention"
            out[name] = out[name]._replace(feasible=False, reason=reason)
    if not single:
        u, r = sizes
        if bad_layout or h % u:
            reason = bad_layout or f"hybrid: {h} heads not divisible by the {u} Ulysses devices"
            out["hybrid"] = infeasible("hybrid", reason)
        else:
            moved_u, a2a, exp_u, mem_u, kvh = ulysses_part(u)
            fl, moved, steps, exposed, mem, bal, why = ring_part(r, u, h // u, kvh)
            why = f"{a2a} all-to-alls over {u}, then {why}"
            finish(
                "hybrid", fl, moved + moved_u, steps + a2a, exposed + exp_u, mem + mem_u, bal, why
            )
    return out


def _prefill(fn, b, q_len, h, kh, d, e, names, n, spec, layout, blocks, hw, cached, cl, slots):
    """estimate_costs of chunked prefill (prefill_costs.py) as Estimates."""
    schedule.check_int(fn, "cached_len", cached, minimum=0)
    if cl not in ("contiguous", "striped"):
        raise ValueError(f"{fn}: `cache_layout` must be 'contiguous' or 'striped', got {cl!r}.")
    slots = -(-(cached + q_len) // n) * n if slots is None else slots
    schedule.check_int(fn, "cache_slots", slots)
    if slots % n or slots < cached:
        raise ValueError(
            f"{fn}: `cache_slots` must be a multiple of the {n} devices holding the "
            f"`cached_len` ({cached}) tokens, got {slots}."
        )
    nan = float("nan")
    if len(names) != 1:
        reason = f"chunked prefill runs over one mesh axis, got {names}"
        return {
            k: Estimate(k, False, reason, nan, nan, 0, nan, nan, float("inf"), nan, reason)
            for k in prefill_costs.STRATEGIES
        }
    parts = prefill_costs.estimate(
        b=b, q_len=q_len, cached_len=cached, h=h, kh=kh, d=d, e=e, n=n, spec=spec, layout=layout,
        cache_layout=cl, cache_slots=slots, bq=blocks[0], bk=blocks[1], hw=hw,
    )  # fmt: skip
    out = {}
    for name, part in parts.items():
        if isinstance(part, str):
            out[name] = Estimate(name, False, part, nan, nan, 0, nan, nan, float("inf"), nan, part)
            continue
        flops, moved, steps, exposed, mem, bal, why = part
        t = flops / hw.flops_per_s + exposed
        why = f"{name}: {why}; {exposed / t if t else 0:.0%} of {t:.3g} s is exposed communication"
        out[name] = Estimate(name, True, "", flops, moved, steps, exposed, mem, t, bal, why)
    return out


def choose_strategy(**problem) -> str:
    """The feasible strategy with the lowest estimated time (`estimate_costs`, default
    hardware constants unless `hardware` is given): one of ring/allgather/ulysses for one axis,
    "hybrid" for a pair; with `cached_len`, one of pass_kv/pass_q/decode (chunked prefill).
    Why it chose is logged (INFO, logger ringattn.parallel.costs: the winner's `Estimate.why`
    and the others' times). Takes `estimate_costs`'s keywords."""
    est = estimate_costs(**problem)
    ok = [e for e in est.values() if e.feasible]
    if not ok:
        reasons = "; ".join(f"{e.strategy}: {e.reason}" for e in est.values())
        raise ValueError(f"choose_strategy: no strategy can run this attention ({reasons}).")
    best = min(ok, key=lambda e: e.time_s)
    others = ", ".join(f"{e.strategy} {e.time_s:.3g} s" for e in ok if e is not best)
    logging.getLogger(__name__).info("choose_strategy: %s (others: %s)", best.why, others or "none")
    return best.strategy


choose_strategy.__signature__ = inspect.signature(estimate_costs).replace(return_annotation=str)


class LayoutChoice(NamedTuple):
    layout: str
    reason: str
    times: dict  # layout -> estimated seconds (inf where the lengths do not fit it)


def choose_layout(
    *,
    q_len,
    num_shards,
    causal=False,
    local_window_size=None,
    kv_len=None,
    strategy="ring",
    batch=1,
    num_heads=8,
    num_kv_heads=8,
    head_dim=128,
    dtype="bfloat16",
    block_q=512,
    block_k=512,
    hardware=None,
) -> LayoutChoice:
    """The layout under which `strategy` is estimated fastest, with the reason. Layouts within 2%
    of the best count as ties, broken towards contiguous (no reordering), then zigzag."""
    kv_len = q_len if kv_len is None else kv_len
    args = dict(batch=batch, q_len=q_len, kv_len=kv_len, num_heads=num_heads, head_dim=head_dim)
    args.update(num_kv_heads=num_kv_heads, dtype=dtype, causal=causal, block_q=block_q)
    args.update(local_window_size=local_window_size, block_k=block_k, hardware=hardware)
    ests = {
        layout: estimate_costs(
            **args, mesh_axis_sizes={"x": num_shards}, axis_name="x", layout=layout
        )[strategy]
        for layout in layouts.LAYOUTS
    }
    times = {k: e.time_s for k, e in ests.items()}
    best = min(times.values())
    if best == float("inf"):
        raise ValueError(f"choose_layout: no layout fits: {ests['contiguous'].reason}")
    layout = next(k for k in layouts.LAYOUTS if times[k] <= best * 1.02)
    others = ", ".join(f"{k} {times[k]:.3g} s" for k in layouts.LAYOUTS if k != layout)
    reason = f"{layout}: {ests[layout].why} (others: {others})"
    return LayoutChoice(layout, reason, times)
