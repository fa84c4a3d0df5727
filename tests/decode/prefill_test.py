"""Chunked prefill (decode/chunked.py, decode/prefill.py) against a float64 dense reference over
cache + chunk: every strategy, chunk layout and cache layout, with sinks, soft cap, windows, int8,
ragged rows and packed segments, on 1, 4 and 8 devices; in a user's own shard_map; the chunk
lands in the cache; argument checks; the cost model's prefill estimates."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ringattn
from ringattn.decode import cache as cache_lib
from ringattn.decode import prefill
from ringattn.parallel import prefill_costs
from ringattn.parallel.layouts import from_layout, layout_positions

B, H, K, D, S = 2, 4, 2, 8, 64
LENGTHS = np.array([48, 37])  # the second row's stream ends inside the last chunk


def reference(q, k, v, pos, seg, cache, causal=True, window=None, cap=None, sinks=None):
    """Dense float64 attention of the chunk to (cached tokens, then the chunk): a query sees a
    held cached token by the rule, a chunk token also only within its segment."""
    ck, cv = (np.asarray(x, np.float64) for x in cache_lib.cache_kv(cache, jnp.float64))
    keys, vals = np.concatenate([ck, k], 1), np.concatenate([cv, v], 1)
    kpos = np.concatenate([np.asarray(cache.pos), pos], 1)
    in_chunk = np.arange(kpos.shape[1]) >= ck.shape[1]
    kseg = np.concatenate([np.zeros_like(cache.pos), seg], 1)
    vis = kpos[:, None] >= 0
    vis = vis & (pos[:, :, None] >= 0)
    if causal:
        vis &= kpos[:, None] <= pos[:, :, None]
    if window is not None:
        vis &= pos[:, :, None] - kpos[:, None] <= window
    vis &= ~in_chunk | (kseg[:, None] == seg[:, :, None])  # [B, t, S + t]
    kv = np.repeat(np.arange(K), H // K)
    s = np.einsum("bthd,bshd->bhts", q, keys[:, :, kv]) / np.sqrt(D)
    if cap is not None:
        s = cap * np.tanh(s / cap)
    s = np.where(vis[:, None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    if sinks is not None:
        m = np.maximum(m, sinks[None, :, None, None])
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    den = p.sum(-1, keepdims=True)
    if sinks is not None:
        den = den + np.exp(sinks[None, :, None, None] - m)
    out = np.einsum("bhts,bshd->bthd", p / np.where(den > 0, den, 1.0), vals[:, :, kv])
    return out


def stream(chunks, seed=0):
    """(q, k, v, pos, seg) of each chunk, float64, natural order: rows at positions 0, 1 ...
    (padding past LENGTHS), two packed documents per chunk."""
    rng = np.random.default_rng(seed)
    start = 0
    for c in chunks:
        q = rng.standard_normal((B, c, H, D))
        k, v = rng.standard_normal((2, B, c, K, D))
        pos = start + np.arange(c)[None].repeat(B, 0)
        pos = np.where(pos < LENGTHS[:, None], pos, -1).astype(np.int32)
        seg = (np.arange(c)[None] >= c // 3).astype(np.int32).repeat(B, 0) + 3
        yield q, k, v, pos, seg
        start += c


def check_stream(call, n, chunks, layout="contiguous", cache_layout="striped", quantize=False,
                 bounds=None, num_shards=None, **variants):  # fmt: skip
    """Run `call(q, k, v, pos, cache, seg, bound)` (layout order) over the stream's chunks and
    compare every output with the reference; then the cache holds the whole stream. The cache
    is made for `num_shards` shards (default n)."""
    cache = cache_lib.init_cache(
        "full", B, S, K, D, jnp.float64, cache_layout=cache_layout, num_shards=num_shards or n,
        quantize=quantize,
    )  # fmt: skip
    start, worst = 0, 0.0
    for i, (q, k, v, pos, seg) in enumerate(stream(chunks)):
        want = reference(q, k, v, pos, seg, cache, **variants)
        perm = layout_positions(layout, q.shape[1], n)
        bound = start if bounds is None else bounds[i]
        out, cache = call(*(x[:, perm] for x in (q, k, v, pos)), cache, seg[:, perm], bound)
        got = np.asarray(from_layout(out, layout, n))
        worst = max(worst, np.abs(got - want).max() / np.abs(want).max())
        start += q.shape[1]
    assert worst <= (2e-2 if quantize else 1e-12), worst
    held = np.asarray(cache.pos)
    for b in range(B):
        np.testing.assert_array_equal(np.sort(held[b][held[b] >= 0]), np.arange(LENGTHS[b]))
    return cache


def on_mesh(mesh, strategy, layout, **kw):
    def call(q, k, v, pos, cache, seg, bound):
        return prefill.prefill_on_mesh(
            q, k, v, pos, cache, mesh=mesh, layout=layout, strategy=strategy, segment_ids=seg,
            cache_bound=bound, **kw,
        )  # fmt: skip

    return call


CASES = [  # (strategy, chunk layout, cache layout, variants): each strategy on both caches
    ("pass_kv", "zigzag", "striped", dict(sinks=True)),
    ("pass_kv", "contiguous", "contiguous", dict(window=5, cap=3.0)),
    ("pass_q", "striped", "contiguous", dict(sinks=True, cap=3.0)),
    ("pass_q", "contiguous", "striped", dict(window=20)),
    ("decode", "striped", "striped", dict(window=5, sinks=True)),
    ("decode", "zigzag", "contiguous", dict()),
]


@pytest.mark.parametrize("strategy, layout, cache_layout, variants", CASES)
def test_chunks_equal_dense_attention_over_cache_and_chunk(
    strategy, layout, cache_layout, variants
):
    n = 8
    mesh = jax.make_mesh((n,), ("context",))
    sinks = np.linspace(-1.0, 1.0, H) if variants.pop("sinks", False) else None
    ref = dict(sinks=sinks, **variants)
    window, cap = variants.get("window"), variants.get("cap")
    kw = dict(
        sinks=None if sinks is None else jnp.asarray(sinks),
        logits_soft_cap=cap,
        local_window_size=None if window is None else (window, 0),
        block_q=4,
        block_k=4,
    )
    chunks = (16, 16, 32) if layout == "zigzag" else (16, 8, 24)
    # The second chunk gives no bound: the whole cache may hold tokens.
    bounds = (0, None, sum(chunks[:2]))
    call = on_mesh(mesh, strategy, layout, **kw)
    check_stream(call, n, chunks, layout, cache_layout, bounds=bounds, **ref)


def test_natural_order_chunks():
    """Chunks handed over in natural order with input_layout='natural': laid out in zigzag inside
    (pass_kv) and striped (decode), results in natural order."""
    mesh = jax.make_mesh((4,), ("context",), devices=jax.devices()[:4])
    for strategy, layout in (("pass_kv", "zigzag"), ("decode", "striped")):
        call = on_mesh(mesh, strategy, layout, input_layout="natural", block_q=4, block_k=4)
        check_stream(call, 4, (16, 16, 32), bounds=(0, None, 32))


def test_one_device_reads_a_striped_cache_with_a_bound():
    """A cache striped over 8 shards, prefilled on one device with bounds: each stripe's prefix
    is read (a plain prefix of the slots would miss most of the tokens)."""

    def call(q, k, v, pos, cache, seg, bound):
        return prefill.prefill(q, k, v, pos, cache, segment_ids=seg, cache_bound=bound)

    check_stream(call, 1, (8, 8, 16, 16), num_shards=8, bounds=(0, 13, 16, 32))


def test_one_device_and_int8_cache():
    def call(q, k, v, pos, cache, seg, bound):
        return prefill.prefill(
            q, k, v, pos, cache, segment_ids=seg, cache_bound=bound, block_q=8, block_k=8
        )

    check_stream(call, 1, (16, 8, 24), cache_layout="contiguous")
    check_stream(call, 1, (16, 8, 24), cache_layout="contiguous", quantize=True)


def test_four_devices_inside_a_users_shard_map():
    """sharded_prefill in the user's own jitted shard_map (check_vma on, an Auto-axes
    mesh), 4 of the 8 devices, pass_q, the cache laid out striped over those 4."""
    n = 4
    auto = (jax.sharding.AxisType.Auto,)
    mesh = jax.make_mesh((n,), ("context",), devices=jax.devices()[:n], axis_types=auto)
    spec = P(None, "context")

    @jax.jit
    def call(q, k, v, pos, cache, seg):
        def local(q, k, v, pos, cache, seg):
            return prefill.sharded_prefill(
                q, k, v, pos, cache, axis_name="context", strategy="pass_q", segment_ids=seg,
                block_q=4, block_k=4,
            )  # fmt: skip

        return jax.shard_map(
            local, mesh=mesh, in_specs=(spec,) * 6, out_specs=(spec, spec), check_vma=True
        )(q, k, v, pos, cache, seg)

    check_stream(lambda *a: call(*a[:6]), n, (16, 8, 24))


def test_pass_kv_sends_only_the_bounded_prefix():
    """With cache_bound, pass_kv's hops carry ceil(bound / n) slots of each striped shard, not
    the whole shard: the compiled program's collective-permutes say so."""
    n, f32 = 8, jnp.float32
    mesh = jax.make_mesh((n,), ("context",))
    cache = cache_lib.init_cache("full", 1, n * 64, K, D, f32, cache_layout="striped", num_shards=n)
    q, k = jnp.zeros((1, 16, H, D), f32), jnp.zeros((1, 16, K, D), f32)
    pos = jnp.arange(16, dtype=jnp.int32)[None] + 40

    def sent(bound):  # shapes of the f32 arrays the hops carry
        f = jax.jit(
            lambda *a: prefill.prefill_on_mesh(*a, mesh=mesh, strategy="pass_kv", cache_bound=bound)
        )
        text = f.lower(q, k, k, pos, cache).compile().as_text()
        hops = [line for line in text.splitlines() if "collective-permute(" in line]
        return {m for line in hops for m in re.findall(r"f32\[[0-9,]+\]", line.split("=")[1])}

    assert "f32[1,5,2,8]" in sent(40)  # ceil(40 / 8) = 5 cached slots a hop
    assert "f32[1,64,2,8]" in sent(None) and "f32[1,5,2,8]" not in sent(None)


@pytest.mark.parametrize("strategy", ["decode", "pass_q"])
def test_collectives_of_decode_and_pass_q(helpers, strategy):
    """decode: one all-gather (the queries with their positions and segments, and the chunk's
    K/V to write, packed together) and one all-to-all (each device's rows of every device's
    partial (out, lse)): the fewest, since queries must reach every source and results come
    back. pass_q: its n - 1 hops of the queries and their state, one hop home, and one
    all-gather of the chunk to write."""
    n, f32 = 8, jnp.float32
    mesh = jax.make_mesh((n,), ("context",))
    cache = cache_lib.init_cache("full", 1, n * 8, K, D, f32, cache_layout="striped", num_shards=n)
    q, k = jnp.zeros((1, 16, H, D), f32), jnp.zeros((1, 16, K, D), f32)
    pos = jnp.arange(16, dtype=jnp.int32)[None] + 40
    f = jax.jit(lambda *a: prefill.prefill_on_mesh(*a, mesh=mesh, strategy=strategy))
    ops = [op for op, _ in helpers.collectives(f.lower(q, k, k, pos, cache).compile().as_text())]
    if strategy == "decode":
        assert sorted(ops) == ["all-gather", "all-to-all"]
    else:
        assert ops.count("all-gather") == 1 and set(ops) == {"all-gather", "collective-permute"}


def test_bad_arguments():
    full = cache_lib.init_cache("full", B, S, K, D, jnp.float32)
    window = cache_lib.init_cache("window", B, None, K, D, jnp.float32, window=8)
    q, k = jnp.zeros((B, 8, H, D)), jnp.zeros((B, 8, K, D))
    pos = jnp.zeros((B, 8), jnp.int32)
    with pytest.raises(ValueError, match="needs a 'full' cache"):
        prefill.prefill(q, k, k, pos, window)
    with pytest.raises(ValueError, match="`cache_bound` must be None or an int >= 0"):
        prefill.prefill(q, k, k, pos, full, cache_bound=-1)
    with pytest.raises(ValueError, match="`k` must have shape"):
        prefill.prefill(q, k[..., :4], k, pos, full)
    with pytest.raises(ValueError, match="`q_pos` must have shape"):
        prefill.prefill(q, k, k, pos[:, :4], full)
    mesh = jax.make_mesh((8,), ("context",))
    with pytest.raises(ValueError, match="`strategy` must be one of"):
        prefill.prefill_on_mesh(q, k, k, pos, full, mesh=mesh, strategy="ring")
    with pytest.raises(ValueError, match="needs the chunk length to be a multiple of 16"):
        prefill.prefill_on_mesh(q, k, k, pos, full, mesh=mesh, layout="zigzag")
    striped4 = cache_lib.init_cache("full", B, S, K, D, jnp.float32, num_shards=4)
    with pytest.raises(ValueError, match="made for 4 shards is sharded over the 8"):
        prefill.prefill_on_mesh(q, k, k, pos, striped4, mesh=mesh)
    with pytest.raises(ValueError, match="only a 'full' cache can be 'striped'"):
        cache_lib.init_cache("window", B, None, K, D, window=8, cache_layout="striped")


def estimates(q_len, cached_len, **kw):
    args = dict(batch=1, q_len=q_len, kv_len=q_len, num_heads=32, num_kv_heads=8, head_dim=128)
    args.update(dtype="bfloat16", mesh_axis_sizes={"x": 8}, axis_name="x", causal=True)
    args.update(local_window_size=None, layout="striped", cached_len=cached_len, **kw)
    return ringattn.estimate_costs(**args)


def test_cost_model_areas_count_the_visible_pairs():
    """With 1 x 1 tiles the areas are the visible (query, key) pairs: each query sees every
    cached token and the chunk causally; a contiguous cache puts them on the first shards."""
    spec = prefill_costs.schedule.mask_spec("t", True, None)
    for cache_layout in ("striped", "contiguous"):
        area = prefill_costs.areas(spec, "striped", 4, 8, 12, cache_layout, 16, 1, 1)
        assert area.sum() == 8 * 12 + 8 * 9 / 2
    filled = prefill_costs.cached_per_shard(12, 4, "contiguous", 16)
    np.testing.assert_array_equal(filled, [4, 4, 4, 0])
    np.testing.assert_array_equal(
        prefill_costs.cached_per_shard(10, 4, "striped", 16), [3, 3, 2, 2]
    )


def test_cost_model_picks_by_the_ratio_of_chunk_to_cache(caplog):
    def best(q_len, cached_len, **kw):
        est = estimates(q_len, cached_len, **kw)
        return min(est.values(), key=lambda e: e.time_s).strategy

    assert best(8192, 8192) == "pass_kv"  # a long chunk: its K/V hops hide behind compute
    assert best(8, 131072) == "decode"  # a few tokens: the fewest collectives
    assert best(2048, 131072) == "pass_q"  # short against a long cache: the cache stays
    est = estimates(1024, 131072)
    assert est["pass_kv"].bytes_moved > 10 * est["pass_q"].bytes_moved  # the cache stays
    assert "exposed communication" in est["pass_q"].why
    caplog.set_level("INFO", logger="ringattn.parallel.costs")
    assert ringattn.choose_strategy(**{
        k: v for k, v in dict(
            batch=1, q_len=2048, kv_len=2048, num_heads=32, num_kv_heads=8, head_dim=128,
            dtype="bfloat16", mesh_axis_sizes={"x": 8}, axis_name="x", causal=True,
            local_window_size=None, layout="striped", cached_len=131072,
        ).items()
    }) == "pass_q"  # fmt: skip
    assert "choose_strategy: pass_q: 8 steps" in caplog.text and "decode" in caplog.text
    pair = estimates(1024, 4096, mesh_axis_sizes={"x": 2, "y": 4}, axis_name=("x", "y"))
    assert not any(e.feasible for e in pair.values())
    with pytest.raises(ValueError, match="`cache_slots` must be a multiple of the 8"):
        estimates(1024, 4096, cache_slots=4100)


@pytest.mark.parametrize("platform, kernel, calls", [
    ("cuda", "pallas_gpu", {"ringattn_fwd"}),
    ("tpu", "pallas_tpu", {"splash_mqa_fwd_segmented_residuals"}),
])  # fmt: skip
@pytest.mark.parametrize("strategy", ["pass_kv", "pass_q"])
def test_lowers_with_the_fused_kernels(helpers, platform, kernel, calls, strategy):
    """Chunked prefill on 8 devices lowered for CUDA / TPU (ringattn.target_platform): the
    cached and chunk passes run the platform's fused kernel, nothing falls back."""
    mesh = jax.make_mesh((8,), ("context",))
    bf16 = jnp.bfloat16
    cache = cache_lib.init_cache("full", 1, 8 * 128, 2, 128, bf16, num_shards=8)
    q, k = jnp.zeros((1, 1024, 8, 128), bf16), jnp.zeros((1, 1024, 2, 128), bf16)
    pos = 512 + jnp.arange(1024, dtype=jnp.int32)[None]

    def f(q, k, pos, cache):
        return prefill.prefill_on_mesh(
            q, k, k, pos, cache, mesh=mesh, strategy=strategy, kernel=kernel, cache_bound=512
        )

    got = helpers.lowered_calls(platform, f, q, k, pos, cache)
    assert calls <= {c.kernel for c in got}, got


def test_cost_model_without_overlap_exposes_every_hop():
    """Hardware(overlap=False): pass_kv's hops no longer hide behind compute, so a long chunk
    pays for all of them; the compute is the same."""
    hw = ringattn.Hardware(overlap=False)
    with_overlap, without = estimates(8192, 8192), estimates(8192, 8192, hardware=hw)
    kv, kv_no = with_overlap["pass_kv"], without["pass_kv"]
    assert kv_no.flops == kv.flops and kv_no.exposed_comm_s > 4 * kv.exposed_comm_s
    hop_s = kv.bytes_moved / 7 / hw.link_bytes_per_s + hw.step_latency_s
    assert kv_no.exposed_comm_s == pytest.approx(7 * hop_s)
