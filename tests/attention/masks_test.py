"""The mask algebra: per-token visibility against a brute-force rule, per-tile states against it."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringattn.attention import masks
from ringattn.attention.masks import FULL, PARTIAL, SKIP, MaskSpec, Ranges

SPECS = [
    MaskSpec(),
    MaskSpec(causal=True),
    MaskSpec(window=(2, 1)),
    MaskSpec(window=(0, 3)),
    MaskSpec(causal=True, window=(3, 3)),
]


def brute_visible(spec, qp, kp, qs=None, ks=None):
    """The documented rule, one pair at a time: [Tq, Tk] for 1-D inputs."""
    out = np.zeros((len(qp), len(kp)), bool)
    for i, j in itertools.product(range(len(qp)), range(len(kp))):
        ok = True
        if spec.causal:
            ok &= kp[j] <= qp[i]
        if spec.window is not None:
            ok &= qp[i] - spec.window[0] <= kp[j] <= qp[i] + spec.window[1]
        if qs is not None:
            ok &= qs[i] == ks[j]
        out[i, j] = ok
    return out


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("with_segments", [False, True])
def test_token_visible_matches_rule(spec, with_segments):
    rng = np.random.default_rng(0)
    b, tq, tk = 2, 6, 7
    qp = rng.integers(0, 10, (b, tq)).astype(np.int32)
    kp = rng.integers(0, 10, (b, tk)).astype(np.int32)
    qs = rng.integers(0, 2, (b, tq)).astype(np.int32) if with_segments else None
    ks = rng.integers(0, 2, (b, tk)).astype(np.int32) if with_segments else None
    got = np.asarray(masks.token_visible(spec, qp, kp, qs, ks))
    assert got.shape == (b, tq, tk) and got.dtype == bool
    for i in range(b):
        want = brute_visible(
            spec, qp[i], kp[i], None if qs is None else qs[i], None if ks is None else ks[i]
        )
        np.testing.assert_array_equal(got[i], want)


def test_token_visible_broadcasts_positions_over_batch():
    """Positions [1, T] with segments [B, T] give [B, Tq, Tk]."""
    pos = np.arange(5, dtype=np.int32)[None]
    seg = np.asarray([[0, 0, 1, 1, 1], [0, 1, 1, 1, 2]], np.int32)
    got = np.asarray(masks.token_visible(MaskSpec(causal=True), pos, pos, seg, seg))
    assert got.shape == (2, 5, 5)
    for i in range(2):
        np.testing.assert_array_equal(
            got[i], brute_visible(MaskSpec(causal=True), pos[0], pos[0], seg[i], seg[i])
        )


def _ranges(pos, seg=None):
    return Ranges(
        pos.min(), pos.max(), *((seg.min(), seg.max()) if seg is not None else (None,) * 2)
    )


@pytest.mark.parametrize(
    "spec, q_pos, kv_pos, want",
    [
        (MaskSpec(causal=True), [8, 11], [0, 3], FULL),  # keys all before the queries
        (MaskSpec(causal=True), [4, 7], [4, 7], PARTIAL),  # the diagonal
        (MaskSpec(causal=True), [0, 3], [4, 7], SKIP),  # the future
        (MaskSpec(causal=True), [4, 7], [4, 4], FULL),  # key 4 is visible to queries 4..7
        (MaskSpec(window=(2, 1)), [10, 11], [9, 11], FULL),
        (MaskSpec(window=(2, 1)), [10, 11], [9, 12], PARTIAL),  # 12 is right of 10's window
        (MaskSpec(window=(2, 1)), [10, 11], [13, 20], SKIP),
        (MaskSpec(window=(2, 1)), [10, 11], [0, 7], SKIP),
        (MaskSpec(window=(2, 1)), [10, 11], [8, 12], PARTIAL),
        (MaskSpec(causal=True, window=(3, 0)), [10, 11], [8, 10], FULL),
        (MaskSpec(), [0, 100], [0, 100], FULL),
    ],
)
def test_tile_state_positions(spec, q_pos, kv_pos, want):
    state = masks.tile_state(spec, _ranges(np.asarray(q_pos)), _ranges(np.asarray(kv_pos)))
    assert int(state) == want


@pytest.mark.parametrize(
    "q_seg, kv_seg, want",
    [
        ([3, 3], [3, 3], FULL),
        ([1, 2], [3, 4], SKIP),
        ([3, 4], [1, 2], SKIP),
        ([1, 2], [2, 2], PARTIAL),
    ],
)
def test_tile_state_segments(q_seg, kv_seg, want):
    pos = np.asarray([0, 3])
    spec = MaskSpec()
    state = masks.tile_state(
        spec, _ranges(pos, np.asarray(q_seg)), _ranges(pos, np.asarray(kv_seg))
    )
    assert int(state) == want


def test_block_ranges_and_reductions():
    pos = np.asarray([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]], np.int32)  # [P=2, L=6]
    seg = np.asarray([[0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1]], np.int32)
    r = masks.block_ranges(pos, seg, 3)
    np.testing.assert_array_equal(r.pos_lo, [0, 0])
    np.testing.assert_array_equal(r.pos_hi, [5, 5])
    np.testing.assert_array_equal(r.seg_lo, [0, 1])
    np.testing.assert_array_equal(r.seg_hi, [1, 2])
    r = masks.block_ranges(pos[:1], None, 2)
    np.testing.assert_array_equal(r.pos_lo, [0, 2, 4])
    np.testing.assert_array_equal(r.pos_hi, [1, 3, 5])
    assert r.seg_lo is None and r.seg_hi is None
    whole = masks.reduce_ranges(r)
    assert (int(whole.pos_lo), int(whole.pos_hi), whole.seg_lo) == (0, 5, None)
    one = masks.index_ranges(r, 1)
    assert (int(one.pos_lo), int(one.pos_hi), one.seg_hi) == (2, 3, None)


# ---------------------------------------------------------------------------------------------
# Property: the tile rule is conservative. SKIP means no visible pair, FULL means every pair.
# All tiles of a fixed-size grid are decided in one broadcast call (tile_state is elementwise).

NQ, NK, BQ, BK = 3, 4, 4, 3


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    spec=st.sampled_from(SPECS),
    seed=st.integers(0, 2**16),
    sorted_positions=st.booleans(),
    segments=st.sampled_from([None, "sorted", "random"]),
)
def test_tile_state_is_conservative(spec, seed, sorted_positions, segments):
    rng = np.random.default_rng(seed)
    qp = rng.integers(0, 16, (1, NQ * BQ)).astype(np.int32)
    kp = rng.integers(0, 16, (1, NK * BK)).astype(np.int32)
    if sorted_positions:
        qp, kp = np.sort(qp), np.sort(kp)
    qs = ks = None
    if segments is not None:
        qs = rng.integers(0, 3, (1, NQ * BQ)).astype(np.int32)
        ks = rng.integers(0, 3, (1, NK * BK)).astype(np.int32)
        if segments == "sorted":
            qs, ks = np.sort(qs), np.sort(ks)
    qr, kr = masks.block_ranges(qp, qs, BQ), masks.block_ranges(kp, ks, BK)
    col = lambda r: Ranges(*(None if x is None else x[:, None] for x in r))  # noqa: E731
    row = lambda r: Ranges(*(None if x is None else x[None, :] for x in r))  # noqa: E731
    # A spec with no rule at all gives one scalar FULL: broadcast it over the grid.
    states = np.broadcast_to(masks.tile_state(spec, col(qr), row(kr)), (NQ, NK))
    vis = brute_visible(
        spec, qp[0], kp[0], None if qs is None else qs[0], None if ks is None else ks[0]
    )
    for i, j in itertools.product(range(NQ), range(NK)):
        tile = vis[i * BQ : (i + 1) * BQ, j * BK : (j + 1) * BK]
        if states[i, j] == SKIP:
            assert not tile.any(), (i, j)
        elif states[i, j] == FULL:
            assert tile.all(), (i, j)
        else:
            assert states[i, j] == PARTIAL


def test_tile_state_is_exact_for_contiguous_causal_blocks():
    """With sorted positions and no segments, causal tiles are decided exactly, so the kernel
    skips every future tile and unmasks every past one."""
    pos = np.arange(12, dtype=np.int32)[None]
    r = masks.block_ranges(pos, None, 4)
    col = Ranges(r.pos_lo[:, None], r.pos_hi[:, None], None, None)
    row = Ranges(r.pos_lo[None], r.pos_hi[None], None, None)
    states = np.asarray(masks.tile_state(MaskSpec(causal=True), col, row))
    want = np.full((3, 3), PARTIAL)
    want[np.tril_indices(3, -1)] = FULL
    want[np.triu_indices(3, 1)] = SKIP
    np.testing.assert_array_equal(states, want)


def test_huge_window_sees_everything():
    """A window of int32 max on each side (a natural "unbounded") must hide nothing. Computing
    pos + right in int32 wraps around and hides every key."""
    big = np.iinfo(np.int32).max
    spec = MaskSpec(window=(big, big))
    pos = np.arange(6, dtype=np.int32)[None]
    assert np.asarray(masks.token_visible(spec, pos, pos)).all()
    r = masks.block_ranges(pos, None, 3)
    assert np.all(np.asarray(masks.tile_state(spec, r, r)) == FULL)
