"""KV cache bookkeeping: where tokens go, what each kind keeps, StreamingLLM positions, int8
quantisation, bytes, and argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ringattn.decode import cache as cache_lib

update = jax.jit(cache_lib.update)
B, K, D = 2, 2, 4


def fill(cache, positions, seed=0):
    """Write tokens at `positions` [B, t]; k = v = the position (so slots can be read back)."""
    pos = np.asarray(positions, np.int32)
    k = np.broadcast_to(pos[..., None, None], pos.shape + (K, D)).astype(np.float32)
    return update(cache, k, k, pos)


def test_full_cache_slot_is_position():
    cache = cache_lib.init_cache("full", B, 8, K, D)
    np.testing.assert_array_equal(cache.pos, -1)
    # Row 1 is ragged: padding (-1) is not written; position 9 is past the end and dropped.
    cache = fill(cache, [[0, 1, 2, 3], [0, 1, -1, -1]])
    cache = fill(cache, [[4], [9]])
    np.testing.assert_array_equal(cache.pos[0], [0, 1, 2, 3, 4, -1, -1, -1])
    np.testing.assert_array_equal(cache.pos[1], [0, 1, -1, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(cache.k[0, :5, 0, 0], [0, 1, 2, 3, 4])
    kv_pos, q_pos = cache_lib.cache_positions(cache, jnp.asarray([[4], [1]], jnp.int32))
    np.testing.assert_array_equal(kv_pos, cache.pos)  # full cache: text positions
    np.testing.assert_array_equal(q_pos, [[4], [1]])


def test_sink_window_ring_buffer_and_streaming_positions():
    ns, w = 2, 4
    cache = cache_lib.init_cache("sink_window", B, None, K, D, num_sinks=ns, window=w)
    assert cache.pos.shape == (B, ns + w)
    cache = fill(cache, np.tile(np.arange(3), (B, 1)))
    np.testing.assert_array_equal(cache.pos[0], [0, 1, 2, -1, -1, -1])
    for p in range(3, 9):
        cache = fill(cache, np.full((B, 1), p))
    # Slots: sinks 0, 1; window slot ns + (p - ns) % w holds the newest p: 6, 7, 8, 5.
    np.testing.assert_array_equal(cache.pos[0], [0, 1, 6, 7, 8, 5])
    np.testing.assert_array_equal(cache.v[0, :, 0, 0], [0, 1, 6, 7, 8, 5])
    kv_pos, q_pos = cache_lib.cache_positions(cache, np.full((B, 1), 8, np.int32))
    # StreamingLLM: sinks at 0, 1, then the window 5..8 at 2..5; the query at the end.
    np.testing.assert_array_equal(kv_pos[0], [0, 1, 3, 4, 5, 2])
    np.testing.assert_array_equal(q_pos, 5)


def test_long_update_keeps_sinks_and_last_window():
    """A prompt longer than the window in one update: only the tokens that survive it are
    written (no two tokens of one update share a slot)."""
    cache = cache_lib.init_cache("sink_window", B, None, K, D, num_sinks=1, window=3)
    cache = fill(cache, np.tile(np.arange(10), (B, 1)))
    np.testing.assert_array_equal(np.sort(cache.pos[0]), [0, 7, 8, 9])
    np.testing.assert_array_equal(cache.k[0, :, 0, 0], cache.pos[0])
    kv_pos, _ = cache_lib.cache_positions(cache)
    np.testing.assert_array_equal(np.sort(kv_pos[0]), [0, 1, 2, 3])

    window = cache_lib.init_cache("window", B, None, K, D, window=3)
    window = fill(window, np.tile(np.arange(7), (B, 1)))
    np.testing.assert_array_equal(window.pos[0], [6, 4, 5])  # slot = pos % w
    kv_pos, _ = cache_lib.cache_positions(window)
    np.testing.assert_array_equal(kv_pos[0], [2, 0, 1])


def test_quantize_int8_round_trip():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 64)) * np.geomspace(1e-3, 1e3, 5)[:, None])
    x = x.at[0, 0].set(0.0)  # an all-zero vector: scale 0, no NaN
    q, scale = cache_lib.quantize_int8(x)
    assert q.dtype == jnp.int8 and scale.dtype == jnp.float32 and scale.shape == (3, 5)
    assert np.abs(np.asarray(q, np.int32)).max() == 127
    err = np.abs(np.asarray(q, np.float64) * np.asarray(scale)[..., None] - np.asarray(x))
    assert np.all(err <= 0.5 * np.asarray(scale)[..., None] * (1 + 1e-5) + 1e-30)
    np.testing.assert_array_equal(q[0, 0], 0)

    cache = cache_lib.init_cache("full", B, 4, K, D, quantize=True)
    cache = fill(cache, [[0, 1, 2, 3]] * B)
    k, _ = cache_lib.cache_kv(cache)
    np.testing.assert_allclose(k[0, :, 0, 0], [0, 1, 2, 3], rtol=1e-6)


def test_int8_cache_is_about_half_of_bf16():
    shapes = dict(kind="full", batch=4, max_len=4096, num_kv_heads=8, head_dim=128)
    nbytes = {
        name: cache_lib.cache_bytes(jax.eval_shape(lambda kw=kw: cache_lib.init_cache(**kw)))
        for name, kw in (
            ("bf16", dict(shapes, dtype=jnp.bfloat16)),
            ("int8", dict(shapes, dtype=jnp.bfloat16, quantize=True)),
        )
    }
    slots = 4 * 4096
    assert nbytes["bf16"] == slots * (2 * 8 * 128 * 2 + 4)  # k, v, pos
    assert nbytes["int8"] == slots * (2 * 8 * (128 + 4) + 4)  # + float32 scales
    assert nbytes["int8"] <= 0.55 * nbytes["bf16"]
    # cache_bytes reads arrays and shape structs alike.
    small = cache_lib.init_cache("window", 1, None, 1, 2, window=3)
    assert cache_lib.cache_bytes(small) == 2 * 3 * 2 * 4 + 3 * 4


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(kind="ring"), "kind"),
        (dict(batch=0), "batch"),
        (dict(head_dim=2.0), "head_dim"),
        (dict(dtype=jnp.int32), "dtype"),
        (dict(max_len=None), "max_len"),
        (dict(window=4), "window"),
        (dict(num_sinks=-1), "num_sinks"),
        (dict(quantize="yes"), "quantize"),
        (dict(kind="sink_window", max_len=None, num_sinks=2), "window"),
        (dict(kind="sink_window", num_sinks=2, window=4), "max_len"),
        (dict(kind="window", max_len=None, num_sinks=2, window=4), "num_sinks"),
    ],
)
def test_init_cache_rejects_bad_arguments(kwargs, name):
    args = dict(kind="full", batch=1, max_len=8, num_kv_heads=1, head_dim=4) | kwargs
    with pytest.raises(ValueError, match=f"`{name}`"):
        cache_lib.init_cache(**args)


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(k_new=np.zeros((B, 1, K + 1, D))), "k_new"),
        (dict(k_new=np.zeros((B + 1, 1, K, D))), "k_new"),
        (dict(v_new=np.zeros((B, 2, K, D))), "v_new"),
        (dict(v_new=np.zeros((B, 1, K, D), np.int32)), "v_new"),
        (dict(pos_new=np.zeros((B,), np.int32)), "pos_new"),
        (dict(pos_new=np.zeros((B, 1), np.float32)), "pos_new"),
    ],
)
def test_update_rejects_bad_arguments(change, name):
    cache = cache_lib.init_cache("full", B, 8, K, D)
    args = dict(
        k_new=np.zeros((B, 1, K, D)), v_new=np.zeros((B, 1, K, D)), pos_new=np.zeros((B, 1), int)
    )
    with pytest.raises(ValueError, match=f"`{name}`"):
        cache_lib.update(cache, **(args | change))
