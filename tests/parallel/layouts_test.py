"""Token layouts: permutations, their inverses, per-shard positions and causal balance."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringattn import LAYOUTS, from_layout, to_layout
from ringattn.parallel import layouts


def test_layout_names():
    assert LAYOUTS == ("contiguous", "zigzag", "striped")


@pytest.mark.parametrize(
    "layout, want",
    [
        ("contiguous", [0, 1, 2, 3, 4, 5, 6, 7]),
        ("zigzag", [0, 7, 1, 6, 2, 5, 3, 4]),  # 2n = 8 chunks of one token: r and 7 - r
        ("striped", [0, 4, 1, 5, 2, 6, 3, 7]),
    ],
)
def test_known_orders(layout, want):
    x = np.arange(8)[None]
    np.testing.assert_array_equal(to_layout(x, layout, 4), [want])
    np.testing.assert_array_equal(layouts.layout_positions(layout, 8, 4), want)


def test_zigzag_chunks():
    """n = 2, 12 tokens: chunks of 3; device 0 holds chunks 0 and 3, device 1 chunks 1 and 2."""
    np.testing.assert_array_equal(
        layouts.layout_positions("zigzag", 12, 2), [0, 1, 2, 9, 10, 11, 3, 4, 5, 6, 7, 8]
    )


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    layout=st.sampled_from(LAYOUTS),
    n=st.sampled_from([1, 2, 3, 4, 8]),
    chunks=st.integers(1, 4),
    axis=st.sampled_from([0, 1, 2]),
)
def test_round_trip_and_positions(layout, n, chunks, axis):
    length = chunks * (2 * n if layout == "zigzag" else n)
    shape = [2, 3, 2]
    shape[axis] = length
    x = np.random.default_rng(0).standard_normal(shape)
    y = np.asarray(to_layout(x, layout, n, axis=axis))
    pos = layouts.layout_positions(layout, length, n)
    np.testing.assert_array_equal(np.sort(pos), np.arange(length))  # a permutation
    np.testing.assert_array_equal(y, np.take(x, pos, axis=axis))
    np.testing.assert_array_equal(np.asarray(from_layout(y, layout, n, axis=axis)), x)
    # Shard r of the layout order holds exactly the positions shard_positions gives device r,
    # for a Python int index and for a traced (array) one.
    local = length // n
    for r in range(n):
        want = pos[r * local : (r + 1) * local]
        np.testing.assert_array_equal(layouts.shard_positions(layout, local, r, n), want)
        np.testing.assert_array_equal(layouts.shard_positions(layout, local, jnp.int32(r), n), want)


def test_default_axis_is_one():
    x = np.arange(2 * 8).reshape(2, 8)
    np.testing.assert_array_equal(to_layout(x, "striped", 2), x[:, [0, 2, 4, 6, 1, 3, 5, 7]])


@pytest.mark.parametrize(
    "layout, length, n, parts",
    [("contiguous", 10, 4, 4), ("striped", 6, 4, 4), ("zigzag", 12, 4, 8), ("zigzag", 4, 4, 8)],
)
def test_unsplittable_lengths(layout, length, n, parts):
    x = np.zeros((1, length))
    for fn in (to_layout, from_layout):
        with pytest.raises(ValueError, match=f"multiple of {parts}, got {length}"):
            fn(x, layout, n)


def test_unknown_layout():
    with pytest.raises(ValueError, match="`layout`"):
        to_layout(np.zeros((1, 8)), "diagonal", 2)
    with pytest.raises(ValueError, match="`layout`"):
        layouts.shard_positions("diagonal", 4, 0, 2)


def causal_work(layout, length, n):
    """Visible causal (query, key) pairs per device over the whole sequence."""
    pos = layouts.layout_positions(layout, length, n).reshape(n, -1)
    return np.asarray([(p[:, None] >= np.arange(length)[None]).sum() for p in pos])


def test_causal_balance():
    """Zigzag gives every device the same causal work; striped nearly; contiguous does not."""
    n, length = 4, 64
    zigzag, striped = causal_work("zigzag", length, n), causal_work("striped", length, n)
    contiguous = causal_work("contiguous", length, n)
    assert zigzag.sum() == striped.sum() == contiguous.sum() == length * (length + 1) // 2
    assert np.all(zigzag == zigzag[0])
    assert striped.max() - striped.min() <= length  # one token more per row at most
    assert contiguous[-1] > 3 * contiguous[0]
