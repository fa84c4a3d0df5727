"""Caches refuse what they cannot hold, promises are checked, local functions called outside
shard_map say so: every natural wrong call gives a clear error, never a quietly wrong number."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import ringattn
from ringattn.decode import cache as cache_lib
from ringattn.decode import prefill, sharded
from ringattn.decode.attend import attend

B, K, D, S = 1, 2, 8, 16


def _kv(t, start=0):
    rng = np.random.default_rng(start)
    k, v = (jnp.asarray(rng.standard_normal((B, t, K, D)), jnp.float32) for _ in range(2))
    return k, v, jnp.arange(start, start + t, dtype=jnp.int32)[None]


def _cache():
    return cache_lib.init_cache("full", B, S, K, D, jnp.float32)


def test_a_chunk_longer_than_the_cache_is_refused_at_trace_time():
    k, v, pos = _kv(S + 1)
    for f in (
        lambda: cache_lib.update(_cache(), k, v, pos),
        lambda: jax.eval_shape(cache_lib.update, _cache(), k, v, pos),
        lambda: prefill.prefill(jnp.zeros((B, S + 1, 4, D)), k, v, pos, _cache()),
    ):
        with pytest.raises(ValueError, match="17 new tokens cannot fit a 'full' cache of max_len"):
            f()


def test_positions_past_the_end():
    """Eagerly: refused. Under jit: checked with the debug switch (checkify), not without."""
    k, v, pos = _kv(4, start=14)  # positions 14..17 of a 16-slot cache
    with pytest.raises(ValueError, match=r"reaches position 17, past the end .*\(max_len 16\)"):
        cache_lib.update(_cache(), k, v, pos)
    with pytest.raises(ValueError, match="reaches position 17"):
        prefill.prefill(jnp.zeros((B, 4, 4, D)), k, v, pos, _cache())
    jitted = jax.jit(cache_lib.update)
    jitted(_cache(), k, v, pos)  # no switch: the program carries no check
    with ringattn.debug_checks():
        err, _ = checkify.checkify(jitted)(_cache(), k, v, pos)
    with pytest.raises(Exception, match="reaches position 17, past the end"):
        err.throw()
    k, v, ok = _kv(4, start=2)
    with ringattn.debug_checks():
        err, _ = checkify.checkify(jitted)(_cache(), k, v, ok)
    err.throw()  # a kept promise raises nothing


def test_a_cache_bound_below_what_the_cache_holds():
    k, v, pos = _kv(8)
    _, cache = prefill.prefill(jnp.zeros((B, 8, 4, D)), k, v, pos, _cache(), cache_bound=0)
    k2, v2, pos2 = _kv(4, start=8)
    q2 = jnp.zeros((B, 4, 4, D))
    with pytest.raises(ValueError, match="`cache_bound`=5 promises .* holds position 7"):
        prefill.prefill(q2, k2, v2, pos2, cache, cache_bound=5)
    run = jax.jit(lambda q, k, v, p, c: prefill.prefill(q, k, v, p, c, cache_bound=5))
    with ringattn.debug_checks():
        err, _ = checkify.checkify(run)(q2, k2, v2, pos2, cache)
    with pytest.raises(Exception, match="holds position 7"):
        err.throw()
    prefill.prefill(q2, k2, v2, pos2, cache, cache_bound=8)  # a true promise


def test_generate_refuses_a_prompt_and_tokens_the_caches_cannot_hold():
    from ringattn.evals import generate as gen
    from ringattn.nn.config import ModelConfig

    cfg = ModelConfig(num_layers=1, d_model=16, num_heads=2, num_kv_heads=2, head_dim=8)
    model = gen.decoding_model(dataclass_dense(cfg))
    caches = gen.init_caches(model.cfg, gen.CacheSpec("full", max_len=12), 1)
    batch = gen.prompt_batch([np.arange(10, dtype=np.int32)])
    with pytest.raises(ValueError, match="needs 13 cache positions .* the full .*caches hold 12"):
        gen.generate(model, None, batch, caches, 4)


def dataclass_dense(cfg):
    import dataclasses

    return dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, impl="dense"))


@pytest.mark.parametrize(
    "call",
    [
        lambda q: ringattn.ring_attention(q, q, q, axis_name="context"),
        lambda q: ringattn.allgather_attention(q, q, q, axis_name="context"),
        lambda q: ringattn.ulysses_attention(q, q, q, axis_name="context"),
        lambda q: ringattn.hybrid_attention(q, q, q, axis_name=("u", "context")),
        lambda q: sharded.sharded_attend(
            q, jnp.zeros((1, 8), jnp.int32), _wide(), axis_name="context"
        ),
        lambda q: sharded.sharded_update(
            _wide(), q, q, jnp.zeros((1, 8), jnp.int32), axis_name="context"
        ),
        lambda q: prefill.sharded_prefill(
            q, q, q, jnp.zeros((1, 8), jnp.int32), _wide(), axis_name="context"
        ),
    ],
    ids=["ring", "allgather", "ulysses", "hybrid", "sharded_attend", "sharded_update", "prefill"],
)
def test_local_functions_outside_shard_map(call):
    q = jnp.zeros((1, 8, 4, 4))
    with pytest.raises(
        ValueError, match="is not bound here.* inside `jax.shard_map`.* global arrays"
    ):
        call(q)


def _pos():
    return jnp.zeros((1, 8), jnp.int32)


def _wide():
    return cache_lib.init_cache("full", 1, 16, 4, 4, jnp.float32)


def test_target_platform_gpu_is_cuda():
    with ringattn.target_platform("gpu") as name:
        assert name == "cuda"
    with pytest.raises(ValueError, match="'gpu'"):
        with ringattn.target_platform("npu"):
            pass


def test_attend_and_decode_steps_past_the_end():
    """A decode step (attend after update) at the last slot is fine; one past it is refused."""
    k, v, pos = _kv(S)
    cache = cache_lib.update(_cache(), k, v, pos)
    out = attend(jnp.ones((B, 1, 4, D)), pos[:, -1:], cache)
    assert np.isfinite(np.asarray(out)).all()
    k1, v1, _ = _kv(1)
    with pytest.raises(ValueError, match="reaches position 16"):
        cache_lib.update(cache, k1, v1, jnp.full((B, 1), S, jnp.int32))


def test_a_window_cache_attended_before_its_queries_were_written(helpers):
    """A sharded window cache takes its StreamingLLM positions from the newest query (no
    collective): queries older than what the cache holds break that promise, which the debug
    switch catches; queries just written keep it."""
    mesh = helpers.ring_mesh(4, "context")
    cache = cache_lib.init_cache("window", B, None, K, D, jnp.float32, window=8)
    cache = sharded.shard_cache(cache, mesh, "context")
    k, v, pos = _kv(6)
    cache = sharded.update_on_mesh(cache, k, v, pos, mesh=mesh, axis_name="context")
    rope = lambda x, p: x * jnp.cos(p[..., None, None] * 0.1).astype(x.dtype)  # noqa: E731
    attend = jax.jit(
        lambda q, p, c: sharded.attend_on_mesh(q, p, c, mesh=mesh, axis_name="context", rope=rope)
    )
    q = jnp.ones((B, 1, 4, D))
    with ringattn.debug_checks():
        err, _ = checkify.checkify(attend)(q, jnp.full((B, 1), 3, jnp.int32), cache)
    with pytest.raises(Exception, match="newest query position .3. is not the newest .* .5."):
        err.throw()
    with ringattn.debug_checks():
        err, _ = checkify.checkify(attend)(q, pos[:, -1:], cache)
    err.throw()
