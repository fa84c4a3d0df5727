"""Tile schedules against brute force and the kernels themselves; balance; the cost model.

Brute force: visibility of every (query, key) pair from the layout's positions
(`masks.token_visible`), tile states from `masks.tile_state` on the ranges `base.make_side`
builds, and the tiles the ring kernel reports through its tile callback.
"""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ringattn
from ringattn.attention import masks
from ringattn.attention.kernels import base
from ringattn.attention.masks import FULL, PARTIAL, SKIP
from ringattn.parallel import costs, layouts, ring, schedule

# ---------------------------------------------------------------------------------------------
# Balance.


def _balance(layout, block, n=8, t=8192):
    return schedule.tile_schedule(
        seq_len=t, num_shards=n, layout=layout, causal=True, block_q=block, block_k=block
    )


def test_causal_balance_n8():
    """Causal, n = 8, T = 8192 (1024 tokens a device), blocks of a quarter shard."""
    n, t, local = 8, 8192, 1024
    got = {layout: _balance(layout, local // 4) for layout in ringattn.LAYOUTS}
    for s in got.values():
        assert s.total_work == t * (t + 1) // 2  # every visible pair, once
        assert s.steps == tuple(range(n))
    # Contiguous: device r attends to r + 1 shards while the ring runs in lockstep. Exactly: the
    # step-0 diagonal shard is half a shard of work, every other step a whole one.
    contiguous = got["contiguous"].balance_efficiency
    exact = t * (t + 1) / 2 / (n * (local * (local + 1) / 2 + (n - 1) * local**2))
    assert contiguous == pytest.approx(exact, rel=1e-12)
    assert abs(contiguous - (n + 1) / (2 * n)) < 0.035  # ~0.56 when the diagonal counts whole
    assert got["zigzag"].balance_efficiency >= 0.95
    assert got["striped"].balance_efficiency >= 0.9
    assert got["zigzag"].compute_efficiency >= 0.95
    assert got["contiguous"].compute_efficiency < 0.53


def test_compute_efficiency_grows_as_blocks_shrink():
    """Visible-pair balance does not depend on the blocks; tile area does: a striped shard's
    diagonal tiles are all PARTIAL, nb / (nb + 1) of the computed area is needed."""
    eff = {b: _balance("striped", b) for b in (1024, 256, 64)}
    assert len({round(s.balance_efficiency, 12) for s in eff.values()}) == 1
    got = [eff[b].compute_efficiency for b in (1024, 256, 64)]
    assert got == sorted(got) and got[0] < 0.51 and got[-1] >= 0.9
    assert got[1] == pytest.approx(0.8, abs=0.01)  # 4 blocks a shard: 4 / 5


# ---------------------------------------------------------------------------------------------
# Against brute force.

CASES = [
    # (layout, n, seq_len, kv_len, block_q, block_k, causal, window)
    ("contiguous", 4, 48, 48, 5, 3, True, None),  # blocks divide nothing: padded tiles
    ("zigzag", 4, 48, 48, 4, 6, True, None),
    ("striped", 4, 48, 48, 4, 4, True, (5, 2)),
    ("contiguous", 4, 48, 48, 4, 4, False, (3, 9)),  # a shortened, shifted ring plan
    ("contiguous", 8, 64, 64, 4, 8, True, (4, 0)),  # 2 of 8 steps
    ("zigzag", 2, 32, 64, 4, 8, True, (6, 1)),  # cross lengths
    ("striped", 4, 32, 32, 16, 16, False, None),  # dense: every tile FULL
]


def _spec(causal, window):
    return masks.MaskSpec(causal, window)


@functools.cache
def _ranges_of(pos_bytes, block):
    pos = np.frombuffer(pos_bytes, np.int32)
    ranges = base.make_side(jnp.asarray(pos[None]), None, block).ranges
    return masks.Ranges(*(None if x is None else np.asarray(x) for x in ranges))


def _ranges(pos, block):
    """The kernel's block ranges of one shard's positions (numpy, cached)."""
    return _ranges_of(np.asarray(pos, np.int32).tobytes(), block)


def _kernel_state(spec, qpos, kpos, bq, bk, i, b, kv_len):
    """The kernel's state of tile (i, b) (xla._state, from its public parts)."""
    st = int(
        masks.tile_state(
            spec,
            masks.index_ranges(_ranges(qpos, bq), i),
            masks.index_ranges(_ranges(kpos, bk), b),
        )
    )
    last = b == -(-kv_len // bk) - 1
    return PARTIAL if st == FULL and last and kv_len % bk else st


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-n{c[1]}-{c[2]}x{c[3]}" for c in CASES])
def test_ring_schedule_is_exactly_the_visible_tiles(case):
    layout, n, t, s, bq, bk, causal, window = case
    spec = _spec(causal, window)
    sched = schedule.tile_schedule(
        seq_len=t,
        num_shards=n,
        layout=layout,
        causal=causal,
        local_window_size=window,
        block_q=bq,
        block_k=bk,
        kv_len=s,
    )
    lq, lk = t // n, s // n
    bq, bk = min(bq, lq), min(bk, lk)  # as the kernel clips them
    assert (sched.block_q, sched.block_k) == (bq, bk)
    qpos = [layouts.shard_positions(layout, lq, r, n) for r in range(n)]
    kpos = [layouts.shard_positions(layout, lk, r, n) for r in range(n)]
    plan = ring.plan_ring(spec, layout, n, lq, lk)
    assert sched.steps == tuple((plan.first + i) % n for i in range(plan.steps))
    total = 0
    for step in range(n):
        for r in range(n):
            j = (r - step) % n
            vis = np.asarray(masks.token_visible(spec, qpos[r], kpos[j]), bool)
            vis = np.broadcast_to(vis, (lq, lk))
            if step not in sched.steps:  # outside the plan: nothing visible
                assert not vis.any(), (step, r)
                continue
            listed = {(x.q_block, x.kv_block): x for x in sched.tiles[sched.steps.index(step)][r]}
            shard = masks.tile_state(
                spec,
                masks.reduce_ranges(_ranges(qpos[r], bq)),
                masks.reduce_ranges(_ranges(kpos[j], bk)),
            )
            for i in range(-(-lq // bq)):
                for b in range(-(-lk // bk)):
                    sub = vis[i * bq : (i + 1) * bq, b * bk : (b + 1) * bk]
                    st = _kernel_state(spec, qpos[r], kpos[j], bq, bk, i, b, lk)
                    if int(shard) == SKIP:
                        st = SKIP
                    if st == SKIP:
                        assert (i, b) not in listed and not sub.any()
                        continue
                    tile = listed.pop((i, b))
                    assert tile.state == st and tile.work == sub.sum()
                    if st == FULL:
                        assert sub.all()
                    total += tile.work
            assert not listed  # no tile outside the grid
    pairs = np.asarray(masks.token_visible(spec, np.concatenate(qpos), np.concatenate(kpos)), bool)
    assert total == np.broadcast_to(pairs, (t, s)).sum() == sched.total_work


@pytest.mark.parametrize("strategy", ["allgather", "ulysses"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_one_step_schedules(strategy, layout):
    """One step: device r's queries (allgather) or the whole sequence on 1 / n of the heads
    (ulysses) against every key in layout order; the total work is every visible pair once."""
    n, t, b = 4, 64, 4
    spec = _spec(True, None)
    sched = schedule.tile_schedule(
        strategy, seq_len=t, num_shards=n, layout=layout, causal=True, block_q=b, block_k=b
    )
    assert sched.steps == (0,) and len(sched.tiles) == 1 and len(sched.tiles[0]) == n
    kpos = layouts.layout_positions(layout, t, n)
    qs = [kpos] * n if strategy == "ulysses" else np.split(kpos, n)
    for r, q in enumerate(qs):
        vis = np.asarray(masks.token_visible(spec, q, kpos), bool)
        counts = vis.reshape(len(q) // b, b, t // b, b).sum(axis=(1, 3))
        listed = {(x.q_block, x.kv_block): x.work for x in sched.tiles[0][r]}
        assert {k: counts[k] for k in zip(*np.nonzero(counts), strict=True)}.items() <= (
            listed.items()
        )
        assert sum(listed.values()) == vis.sum()
    assert sched.total_work == t * (t + 1) / 2
    if strategy == "ulysses":
        assert sched.head_fraction == 1 / n and sched.balance_efficiency == 1.0


def test_block_ranges_match_make_side():
    pos = np.random.default_rng(0).permutation(40).reshape(2, 20).astype(np.int32)
    lo, hi = schedule.block_ranges(pos, 6)
    for m in range(2):
        want = _ranges(pos[m], 6)
        np.testing.assert_array_equal(lo[m], want.pos_lo)
        np.testing.assert_array_equal(hi[m], want.pos_hi)


@pytest.mark.parametrize(
    "layout, static",
    [("zigzag", dict(causal=True)), ("contiguous", dict(local_window_size=(5, 3)))],
)
def test_kernel_computes_the_scheduled_tiles(helpers, layout, static):
    """The tiles the ring kernel reports (tile callback) in both passes are the schedule's,
    with the same masking."""
    n, t, b = 4, 32, 4
    log = collections.Counter()

    def cb(which, q0, k0, masked):
        log[str(which), int(q0), int(k0), bool(masked)] += 1

    f = jax.shard_map(
        lambda q: ringattn.ring_attention(
            q,
            q,
            q,
            axis_name="ring",
            layout=layout,
            block_q=b,
            block_k=b,
            tile_callback=cb,
            **static,
        ),
        mesh=helpers.ring_mesh(n),
        in_specs=P(None, "ring"),
        out_specs=P(None, "ring"),
    )
    q = jnp.ones((1, t, 1, 4), jnp.float32)
    jax.block_until_ready(jax.jit(jax.grad(lambda q: f(q).sum()))(q))
    sched = schedule.tile_schedule(
        seq_len=t, num_shards=n, layout=layout, block_q=b, block_k=b, **static
    )
    pos = lambda r: layouts.shard_positions(layout, t // n, r, n)  # noqa: E731
    want = collections.Counter()
    for s, row in zip(sched.steps, sched.tiles, strict=True):
        for r, tiles in enumerate(row):
            for x in tiles:
                key = (int(pos(r)[x.q_block * b]), int(pos((r - s) % n)[x.kv_block * b]))
                for which in ("fwd", "bwd"):
                    want[which, *key, x.state == PARTIAL] += 1
    assert log == want


def test_format_schedule():
    sched = schedule.tile_schedule(
        seq_len=64, num_shards=4, layout="contiguous", causal=True, block_q=4, block_k=4
    )
    text = schedule.format_schedule(sched)
    lines = text.splitlines()
    assert "ring, contiguous layout, 4 devices" in lines[0] and "causal" in lines[0]
    assert lines[1].split() == ["step", "|", "d0", "d1", "d2", "d3"]
    rows = [line.split("|")[1].split() for line in lines[3:7]]
    # Step 0: every device its diagonal shard, 10 of 16 tiles, 136 of the 256 pairs of the
    # busiest cell; at step s devices r < s have nothing to do.
    assert rows[0] == ["10t", "53%"] * 4
    assert rows[3] == [".", ".", ".", "16t", "100%"]
    assert lines[-1].startswith("balance efficiency 0.575")  # 2080 / (4 * (136 + 3 * 256))
    tiles = schedule.format_schedule(sched, cell="tiles").splitlines()
    assert tiles[4].split("|")[1].split() == [".", "16t", "16t", "16t"]
    with pytest.raises(ValueError, match="`cell`"):
        schedule.format_schedule(sched, cell="x")


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(strategy="hybrid"), ValueError, "`strategy`"),
        (dict(layout="zigzag", seq_len=36), ValueError, "multiple of 8, got 36"),
        (dict(layout="spiral"), ValueError, "`layout`"),
        (dict(block_q=0), ValueError, "`block_q`"),
        (dict(num_shards=0), ValueError, "`num_shards`"),
        (dict(causal=1), TypeError, "`causal`"),
        (dict(local_window_size=-2), ValueError, "`local_window_size`"),
    ],
)
def test_tile_schedule_bad_input(kwargs, exc, pattern):
    args = dict(seq_len=32, num_shards=4, layout="contiguous") | kwargs
    with pytest.raises(exc, match=pattern):
        schedule.tile_schedule(**args)


# ---------------------------------------------------------------------------------------------
# Cost model.

MODEL = dict(batch=1, head_dim=128, dtype=jnp.bfloat16)


def _costs(axis=("context",), sizes=None, heads=(32, 8), **kw):
    args = dict(q_len=65536, kv_len=65536, causal=True, local_window_size=None, layout="zigzag")
    args |= kw
    return costs.estimate_costs(
        **MODEL,
        **args,
        num_heads=heads[0],
        num_kv_heads=heads[1],
        mesh_axis_sizes=sizes or {"data": 2, "context": 8},
        axis_name=axis[0] if len(axis) == 1 else axis,
    )


def test_costs_ulysses_needs_divisible_heads():
    est = _costs(heads=(4, 4))
    assert set(est) == {"ring", "allgather", "ulysses"}
    assert not est["ulysses"].feasible and "4 heads" in est["ulysses"].reason
    assert est["ring"].feasible and est["allgather"].feasible
    args = dict(MODEL, q_len=65536, kv_len=65536, num_heads=4, num_kv_heads=4)
    args |= dict(mesh_axis_sizes={"context": 8}, axis_name="context", causal=True)
    choice = costs.choose_strategy(**args, local_window_size=None, layout="zigzag")
    assert choice in ("ring", "allgather")


def test_costs_window_runs_few_ring_steps():
    """A causal window of T / 2n in the contiguous layout: 2 of 8 ring steps, 1 hop forward."""
    est = _costs(layout="contiguous", local_window_size=(4096, 0), backward=False)
    ring_est = est["ring"]
    assert "2 of 8 ring steps" in ring_est.why and ring_est.comm_steps == 1
    kv_shard = 8192 * 2 * 8 * 128 * 2  # tokens x (k, v) x KV heads x D x bf16
    assert ring_est.bytes_moved == kv_shard
    assert est["allgather"].bytes_moved == 7 * kv_shard
    assert ring_est.time_s < est["allgather"].time_s


def test_costs_follow_the_balance():
    """The busiest device's flops follow the schedule: contiguous causal ~ 2x zigzag."""
    zig, con = _costs()["ring"], _costs(layout="contiguous")["ring"]
    assert zig.balance > 0.95 and con.balance < 0.55
    assert 1.8 < con.flops / zig.flops < 1.9
    dense = _costs(causal=False, backward=False)["ring"]
    assert dense.flops == 8192 * 65536 * 32 * 4 * 128  # every pair: (T / n) x S x H x 4D
    assert dense.comm_steps == 7 and dense.exposed_comm_s >= 0


def test_costs_exposed_communication():
    est = _costs(backward=False)
    hw = costs.Hardware()
    ag = est["allgather"]
    assert ag.exposed_comm_s == pytest.approx(ag.bytes_moved / hw.link_bytes_per_s + 10e-6)
    assert est["ulysses"].comm_steps == 2
    assert est["ring"].exposed_comm_s == 0  # each hop hides behind its step's compute
    slow = costs.Hardware(link_bytes_per_s=1e9)  # ... unless the link is slow
    ring_slow = _costs(backward=False, hardware=slow)["ring"]
    assert ring_slow.exposed_comm_s > 0.1 and ring_slow.time_s > est["ring"].time_s + 0.1


def test_costs_hybrid_only_for_a_pair():
    est = _costs(axis=("ulysses", "ring"), sizes={"ulysses": 2, "ring": 4})
    assert set(est) == {"ring", "allgather", "ulysses", "hybrid"}
    assert est["hybrid"].feasible and not est["ring"].feasible
    assert "all-to-alls over 2" in est["hybrid"].why and "4 of 4 ring steps" in est["hybrid"].why
    args = dict(MODEL, q_len=65536, kv_len=65536, num_heads=32, num_kv_heads=8, causal=True)
    args |= dict(mesh_axis_sizes={"u": 2, "r": 4}, axis_name=("u", "r"), local_window_size=None)
    assert costs.choose_strategy(**args, layout="zigzag") == "hybrid"
    assert not _costs(axis=("u", "r"), sizes={"u": 3, "r": 2}, q_len=6144, kv_len=6144)[
        "hybrid"
    ].feasible  # 32 heads over 3


def test_choose_strategy_rejects_unfit_lengths():
    args = dict(MODEL, q_len=1000, kv_len=1000, num_heads=32, num_kv_heads=8, causal=True)
    args |= dict(mesh_axis_sizes={"c": 8}, axis_name="c", local_window_size=None)
    with pytest.raises(ValueError, match="no strategy"):
        costs.choose_strategy(**args, layout="zigzag")


@pytest.mark.parametrize(
    "kwargs, want",
    [
        (dict(causal=True), "zigzag"),
        (dict(causal=True, local_window_size=(2048, 0)), "contiguous"),
        (dict(local_window_size=1024), "contiguous"),
        (dict(), "contiguous"),
    ],
)
def test_choose_layout(kwargs, want):
    choice = costs.choose_layout(q_len=65536, num_shards=8, **kwargs)
    assert choice.layout == want and choice.reason.startswith(want)
    assert choice.times[want] == min(choice.times.values()) or kwargs == {}
