"""The sequence-sharded KV cache on 4 and 8 simulated devices: the same results as the
single-device cache, the cache never moves, argument checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ringattn.decode import attend as attend_lib
from ringattn.decode import cache as cache_lib
from ringattn.decode import sharded

B, H, K, D = 2, 4, 2, 8
AXIS = "context"


def rope(x, pos):
    """Rotary embedding (half-split) of x [B, L, N, D] at positions [B, L]."""
    half = x.shape[-1] // 2
    angle = pos[..., None, None].astype(x.dtype) * (0.5 ** np.arange(half)).astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


@functools.cache
def step_fn(mesh=None, **static):
    """jit(update then attend): on one device, or on the mesh with the cache sharded."""

    @jax.jit
    def step(cache, q, k_new, v_new, pos_new):
        if mesh is None:
            cache = cache_lib.update(cache, k_new, v_new, pos_new)
            return cache, attend_lib.attend(q, pos_new, cache, **static, return_lse=True)
        cache = sharded.update_on_mesh(cache, k_new, v_new, pos_new, mesh=mesh, axis_name=AXIS)
        out = sharded.attend_on_mesh(
            q, pos_new, cache, mesh=mesh, axis_name=AXIS, **static, return_lse=True
        )
        return cache, out

    return step


def run(cache, steps, mesh=None, **static):
    """[(out, lse)] of each (q, k, v, pos) step, and the final cache."""
    step = step_fn(mesh, **static)
    results = []
    for args in steps:
        cache, res = step(cache, *args)
        results.append(res)
    return results, cache


def make_steps(t, chunks, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, t, H, D)).astype(np.float32)
    k, v = rng.standard_normal((2, B, t, K, D)).astype(np.float32)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (B, t))
    bounds = np.cumsum([0, *chunks])
    return [
        tuple(x[:, a:b] for x in (q, k, v, pos))
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


CASES = {
    # A prompt filling shards 0-2 (of 4) or 0-5 (of 8), then decoding across shard boundaries.
    "full_int8": (dict(kind="full", max_len=16, quantize=True), [11, 1, 1, 1, 1]),
    "sink_window": (
        dict(kind="sink_window", max_len=None, num_sinks=2, window=6),
        [3, 1, 1, 1, 1, 1, 1, 1, 1],
    ),
}


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_cache_equals_single_device(helpers, case, n):
    init, chunks = CASES[case]
    mesh = helpers.ring_mesh(n, AXIS)
    static = dict(rope=rope) if init["kind"] != "full" else {}
    cache = cache_lib.init_cache(batch=B, num_kv_heads=K, head_dim=D, **init)
    steps = make_steps(sum(chunks), chunks)
    expected, cache_1 = run(cache, steps, **static)
    results, cache_n = run(sharded.shard_cache(cache, mesh, AXIS), steps, mesh, **static)
    assert cache_n.k.sharding.spec == P(None, AXIS)
    for x, y in zip(jax.tree.leaves(cache_n), jax.tree.leaves(cache_1), strict=True):
        np.testing.assert_array_equal(x, y)  # every token written once, in its slot
    for i, ((out, lse), (out_1, lse_1)) in enumerate(zip(results, expected, strict=True)):
        helpers.assert_close(out, out_1, 1e-6, f"out {i}")
        helpers.assert_close(lse, lse_1, 1e-6, f"lse {i}")


def test_sharded_variants_equal_single_device(helpers):
    """Sinks (added once, after the shards merge), a soft cap and a local window: the sharded
    cache gives the single device's results."""
    mesh = helpers.ring_mesh(4, AXIS)
    sinks = jnp.asarray(np.random.default_rng(1).standard_normal(H), jnp.float32)
    static = dict(logits_soft_cap=2.0, local_window_size=5, sinks=sinks, return_lse=True)

    @functools.partial(jax.jit, static_argnums=0)
    def step(on_mesh, cache, q, k, v, pos):
        if not on_mesh:
            cache = cache_lib.update(cache, k, v, pos)
            return cache, attend_lib.attend(q, pos, cache, **static)
        cache = sharded.update_on_mesh(cache, k, v, pos, mesh=mesh, axis_name=AXIS)
        return cache, sharded.attend_on_mesh(q, pos, cache, mesh=mesh, axis_name=AXIS, **static)

    cache_1 = cache_lib.init_cache("full", B, 16, K, D)
    cache_n = sharded.shard_cache(cache_1, mesh, AXIS)
    for args in make_steps(12, [9, 1, 1, 1]):
        cache_1, (out_1, lse_1) = step(False, cache_1, *args)
        cache_n, (out, lse) = step(True, cache_n, *args)
        helpers.assert_close(out, out_1, 1e-6, "out")
        helpers.assert_close(lse, lse_1, 1e-6, "lse")


def test_data_and_context_mesh(helpers):
    """Batch over "data" and sequence over "context": the same as the single-device cache;
    the cache created sharded with cache_sharding."""
    mesh = jax.sharding.Mesh(
        np.asarray(jax.devices("cpu")[:8]).reshape(2, 4),
        ("data", AXIS),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
    )
    init = functools.partial(cache_lib.init_cache, "full", B, 8, K, D)
    shardings = sharded.cache_sharding(jax.eval_shape(init), mesh, AXIS, batch_axis="data")
    cache = jax.jit(init, out_shardings=shardings)()
    assert cache.pos.sharding.spec == P("data", AXIS)
    on_mesh = dict(mesh=mesh, axis_name=AXIS, batch_axis="data")

    @jax.jit
    def step(cache, q, k, v, pos):
        cache = sharded.update_on_mesh(cache, k, v, pos, **on_mesh)
        return cache, sharded.attend_on_mesh(q, pos, cache, **on_mesh, return_lse=True)

    steps = make_steps(7, [5, 1, 1])
    expected, cache_1 = run(init(), steps)
    for args, (out_1, lse_1) in zip(steps, expected, strict=True):
        cache, (out, lse) = step(cache, *args)
        helpers.assert_close(out, out_1, 1e-6, "out")
        helpers.assert_close(lse, lse_1, 1e-6, "lse")
    assert cache.k.sharding.spec == P("data", AXIS)
    np.testing.assert_array_equal(cache.pos, cache_1.pos)


def test_full_cache_prefill_fills_shards_in_order(helpers):
    mesh = helpers.ring_mesh(4, AXIS)
    cache = cache_lib.init_cache("full", B, 16, K, D)
    ((q, k, v, pos),) = make_steps(6, [6])
    cache = step_fn(mesh)(sharded.shard_cache(cache, mesh, AXIS), q, k, v, pos)[0]
    held = [
        np.asarray(s.data)[0]
        for s in sorted(cache.pos.addressable_shards, key=lambda s: s.index[1].start)
    ]
    np.testing.assert_array_equal(held[0], [0, 1, 2, 3])
    np.testing.assert_array_equal(held[1], [4, 5, -1, -1])
    np.testing.assert_array_equal(held[2], -1)


@pytest.mark.parametrize("kind", ["full", "sink_window"])
def test_decode_step_is_one_all_gather_of_per_query_values(helpers, kind):
    """The compiled step's only collective is the merge's all-gather of [n, B, 1, H, D + 1]
    partials: the cache never moves, and a window cache's rotary positions cost nothing."""
    mesh = helpers.ring_mesh(8, AXIS)
    size = dict(max_len=96) if kind == "full" else dict(max_len=None, num_sinks=8, window=88)
    cache = cache_lib.init_cache(kind, B, num_kv_heads=K, head_dim=D, **size)
    cache = sharded.shard_cache(cache, mesh, AXIS)
    ((q, k, v, pos),) = make_steps(1, [1])
    static = dict(rope=rope) if kind != "full" else {}
    hlo = step_fn(mesh, **static).lower(cache, q, k, v, pos).compile().as_text()
    assert helpers.collectives(hlo) == [("all-gather", {(8, B, 1, H, D + 1)})]


def test_empty_sharded_cache_gives_zeros(helpers):
    mesh = helpers.ring_mesh(4, AXIS)
    cache = cache_lib.init_cache("sink_window", B, None, K, D, num_sinks=2, window=6)
    q = jnp.ones((B, 1, H, D))
    attend = functools.partial(sharded.attend_on_mesh, mesh=mesh, axis_name=AXIS, return_lse=True)
    out, lse = jax.jit(attend)(q, jnp.zeros((B, 1), jnp.int32), cache)
    np.testing.assert_array_equal(out, 0.0)
    assert np.all(np.isneginf(lse))


def test_sharded_rejects_bad_arguments(helpers):
    mesh = helpers.ring_mesh(4, AXIS)
    q, pos = jnp.ones((B, 1, H, D)), jnp.zeros((B, 1), jnp.int32)
    cache = cache_lib.init_cache("full", B, 16, K, D)
    with pytest.raises(ValueError, match="`axis_name`"):
        sharded.attend_on_mesh(q, pos, cache, mesh=mesh, axis_name="data")
    with pytest.raises(ValueError, match="`mesh`"):
        sharded.attend_on_mesh(q, pos, cache, mesh=None)
    with pytest.raises(ValueError, match="`batch_axis`"):
        sharded.shard_cache(cache, mesh, AXIS, batch_axis="data")
    odd = cache_lib.init_cache("window", B, None, K, D, window=6)
    with pytest.raises(ValueError, match="`axis_name`"):
        sharded.update_on_mesh(odd, q[..., :K, :], q[..., :K, :], pos, mesh=mesh, axis_name=AXIS)
    # Inside shard_map with the whole (unsharded) cache instead of the local shard.
    whole = jax.shard_map(
        lambda q, pos, c: sharded.sharded_attend(q, pos, c, axis_name=AXIS),
        mesh=mesh,
        in_specs=(P(), P(), P()),
        out_specs=P(),
    )
    with pytest.raises(ValueError, match="`cache`"):
        whole(q, pos, cache)
