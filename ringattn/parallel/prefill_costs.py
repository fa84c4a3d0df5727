"""The cost model of chunked prefill (decode/chunked.py): a chunk of c new tokens against a cache
already holding P, over n devices, for the strategies pass_kv, pass_q and decode (forward only).

Compute is the kernel's tile area, as for training (costs.py): device r's queries against source
j (the cached tokens of cache shard j and chunk shard j) cover `area[r, j]` (query, key) pairs,
counted from the positions the chunk layout and the cache layout give each shard
(schedule.states; an empty slot is never computed). The three strategies compute the same tiles
in different orders:

  pass_kv  step s: device r, queries r, source r - s. n - 1 hops of a source (the cache shard's
           prefix that may hold tokens plus the chunk shard), each overlapping a step's compute.
  pass_q   step s: device r, queries r - s, source r. n - 1 hops of the queries (overlapping)
           and of their f32 (out, lse) state (exposed: the next step needs it), one hop home, and
           an all-gather of the chunk's K/V to write it.
  decode   one step: device r, every query, source r. One all-gather of the queries and the
           chunk's K/V together, one all-to-all of each device's rows of the partial (out, lse):
           both exposed, 2 collectives.

Per hop pass_kv moves (P + c) / n tokens' K/V (2 K D bytes each with GQA's K heads), pass_q
c / n queries' H D bytes plus their 4 H D bytes of state: pass_q wins when the chunk is short
against the cache (about c / (P + c) < K / (3 H) in bf16, Meta's rule of thumb, arXiv
2411.01783), pass_kv when it is long, decode when the whole chunk costs less than the hops'
latency.
"""

from __future__ import annotations

import numpy as np

from ringattn.attention.masks import SKIP
from ringattn.parallel import layouts, schedule

STRATEGIES = ("pass_kv", "pass_q", "decode")
_BIG = 1 << 40  # position of an empty slot: after every query (never seen under causal)


def cached_per_shard(cached_len, n, cache_layout, cache_slots):
    """Tokens each of the n cache shards holds when positions 0 .. cached_len - 1 are cached."""
    r = np.arange(n)
    if cache_layout == "striped":
        return np.maximum(0, -(-(cached_len - r) // n))
    per = cache_slots // n
    return np.clip(cached_len - r * per, 0, per)


def prefix_len(cached_len, n, cache_layout, cache_slots):
    """The slots of every shard that may hold one of positions < cached_len (what a pass reads
    and pass_kv sends): striped ceil(P / n), contiguous min(P, S / n)."""
    if cache_layout == "striped":
        return -(-cached_len // n)
    return min(cached_len, cache_slots // n)


def _cached_positions(j, filled, n, cache_layout, cache_slots):
    i = np.arange(filled)
    return j + n * i if cache_layout == "striped" else j * (cache_slots // n) + i


def areas(spec, layout, n, q_len, cached_len, cache_layout, cache_slots, block_q, block_k):
    """area [n, n] of (query shard, source) tiles: block_q x block_k per computed tile, the
    chunk at positions cached_len ... cached_len + q_len - 1 in `layout` order."""
    qpos = cached_len + schedule.shard_positions(layout, q_len, n)
    bq, bk = min(block_q, qpos.shape[1]), min(block_k, qpos.shape[1])
    st, shard = schedule.states(spec, qpos, qpos, bq, bk)
    area = ((st != SKIP).sum(axis=(1, 3)) * (shard != SKIP) * bq * bk).astype(np.float64)
    filled = cached_per_shard(cached_len, n, cache_layout, cache_slots)
    for j in range(n):
        if filled[j] == 0:
            continue
        kpos = _cached_positions(j, filled[j], n, cache_layout, cache_slots)[None]
        bkc = min(block_k, kpos.shape[1])
        st, shard = schedule.states(spec, qpos, kpos, bq, bkc)
        area[:, j] += (st != SKIP).sum(axis=(1, 3))[:, 0] * (shard[:, 0] != SKIP) * bq * bkc
    return area


def estimate(
    *, b, q_len, cached_len, h, kh, d, e, n, spec, layout, cache_layout, cache_slots, bq, bk, hw
):
    """{strategy: (flops, bytes moved, collectives, exposed s, peak extra bytes, balance, why)}
    on the busiest device; or {strategy: reason} where the chunk does not fit the layout."""
    try:
        layouts.check_layout("estimate_costs", layout, q_len, n, "`q_len` (the chunk)")
    except ValueError as err:
        return {name: str(err) for name in STRATEGIES}
    area = areas(spec, layout, n, q_len, cached_len, cache_layout, cache_slots, bq, bk)
    flops_per_pair = b * h * 4 * d
    bw, lat, f32 = hw.link_bytes_per_s, hw.step_latency_s, 4
    c = q_len // n
    pre = prefix_len(cached_len, n, cache_layout, cache_slots)
    tok = kh * 2 * d * e + 4  # one token's K, V and position
    state_hop = b * c * h * (d + 1) * f32
    gather_kv = (n - 1) / n * b * q_len * tok
    rows = np.arange(n)
    by_step = [area[rows, (rows - s) % n].max() for s in range(n)]  # pass_kv; pass_q alike
    compute = [a * flops_per_pair / hw.flops_per_s for a in by_step]
    total = area.sum()
    balance = float(total / (n * sum(by_step))) if total else 1.0
    out = {}

    def overlap(hop):  # hops issued before the compute they overlap: n - 1 of them
        return sum(max(0.0, hop / bw + lat - (x if hw.overlap else 0.0)) for x in compute[:-1])

    src_hop = b * ((pre + c) * tok + c * 4)  # the chunk's tokens also carry segment ids
    out["pass_kv"] = (
        sum(by_step) * flops_per_pair,
        (n - 1) * src_hop,
        n - 1,
        overlap(src_hop),
        2 * src_hop + state_hop,
        balance,
        f"{n} steps, {pre + c} tokens' K/V a hop",
    )
    q_hop = b * c * (h * d * e + 8)
    out["pass_q"] = (
        sum(by_step) * flops_per_pair,
        (n - 1) * q_hop + n * state_hop + gather_kv,
        2 * (n - 1) + 2,
        overlap(q_hop) + (n * state_hop + gather_kv) / bw + (n + 1) * lat,
        2 * (q_hop + state_hop) + b * q_len * tok,
        balance,
        f"{n} steps, {c} queries and their state a hop",
    )
    gather_q = (n - 1) / n * b * q_len * (h * d * e + 8)
    # (out, lse) partials all-to-all: each device receives its own rows from the n - 1 others
    exchange = (n - 1) / n * b * q_len * h * (d + 1) * f32
    per_device = area.sum(axis=0)  # every query against its own source
    moved = gather_q + gather_kv + exchange
    out["decode"] = (
        per_device.max() * flops_per_pair,
        moved,
        2,
        moved / bw + 2 * lat,
        b * q_len * (h * d * e + 2 * h * (d + 1) * f32 + tok),
        float(total / (n * per_device.max())) if total else 1.0,
        "one step, every query on every device",
    )
    return out
