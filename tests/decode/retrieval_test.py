"""The retrieval cache (ringattn/decode/retrieval.py) against float64 references: with every page
chosen it is the full cache; with fewer, its selection is NumPy's top-k of the Quest bound and
its output is exact attention over sinks + window + exactly those pages. On 1 and 8 devices,
decode steps and prompt chunks; the compiled step reads only the chosen pages.

A stream is fed in chunks (update, then attend); token data is indexed by position, and row 1
runs 3 positions behind row 0 (its first tokens are padding), so rows are ragged.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ringattn
from ringattn.bench import reads
from ringattn.decode import attend as attend_lib
from ringattn.decode import cache as cache_lib
from ringattn.decode import pages, retrieval

B, H, D, T = 2, 4, 8, 30
AXIS = "context"
LAG = (0, 3)  # row r's position at stream index i is i - LAG[r]


def stream(kh, dtype=np.float64, dv=D, seed=0):
    """q [B, T, H, D], k [B, T, kh, D], v [B, T, kh, dv], indexed by position."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, D)) * 1.5
    k = rng.standard_normal((B, T, kh, D))
    v = rng.standard_normal((B, T, kh, dv))
    return tuple(x.astype(dtype) for x in (q, k, v))


def chunk_args(data, start, stop):
    """(q, k, v, pos) of stream indices start..stop-1 for every row (padding: position -1)."""
    idx = np.arange(start, stop)
    pos = np.stack([idx - lag for lag in LAG]).astype(np.int32)
    pos = np.where(pos >= 0, pos, -1)
    picked = [np.stack([x[r, np.maximum(pos[r], 0)] for r in range(B)]) for x in data]
    return (*picked, pos)


@functools.cache
def step_fn(mesh=None, **static):
    """jit(update then attend, with the chosen pages on one device)."""
    static = dict(static)
    sinks = static.pop("sinks", None)

    @jax.jit
    def step(cache, q, k, v, pos):
        s = None if sinks is None else jnp.asarray(sinks, q.dtype)
        if mesh is None:
            cache = retrieval.update(cache, k, v, pos)
            out = retrieval.attend(q, pos, cache, sinks=s, return_lse=True, **static)
            return cache, out, retrieval.chosen_pages(q, pos, cache)
        on = dict(mesh=mesh, axis_name=AXIS)
        cache = retrieval.update_on_mesh(cache, k, v, pos, **on)
        out = retrieval.attend_on_mesh(q, pos, cache, **on, sinks=s, return_lse=True, **static)
        return cache, out

    return step


def run(cache, data, chunks, mesh=None, **static):
    """[(chunk args, out, lse, chosen pages)] of the stream fed in `chunks`, and the cache."""
    step, results, start = step_fn(mesh, **static), [], 0
    for c in chunks:
        args = chunk_args(data, start, start + c)
        cache, (out, lse), *chosen = step(cache, *args)
        results.append((args, np.asarray(out), np.asarray(lse), *map(np.asarray, chosen)))
        start += c
    return results, cache


# ---------------------------------------------------------------------------------------------
# The NumPy reference.


def seen_keys(k, quantize):
    """The keys and values attention sees: dequantised int8 when quantised."""
    if not quantize:
        return k
    q, s = cache_lib.quantize_int8(jnp.asarray(k))
    return np.asarray(q, np.float64) * np.asarray(s, np.float64)[..., None]


def np_select(q, k, q_pos, cfg, tb):
    """{(row, kv head, block): set of pages}: NumPy's top-k of the Quest bound, the max over
    the block's queries (tb consecutive positions from the row's lowest) and the head's group,
    among the pages holding a token older than the newest query's window and not a sink."""
    ns, w, p, top = cfg["num_sinks"], cfg["window"], cfg["page_size"], cfg["top_pages"]
    kh, g = k.shape[2], H // k.shape[2]
    chosen = {}
    for b in range(B):
        row_pos = q_pos[b]
        held = row_pos.max() + 1  # the stream is written in order up to the newest query
        first_q = row_pos[row_pos >= 0].min(initial=held)
        for blk in range(-(-len(row_pos) // tb)):
            qp = row_pos[(row_pos >= first_q + blk * tb) & (row_pos < first_q + (blk + 1) * tb)]
            for kk in range(kh):
                scores = {}
                for page in range(-(-held // p)) if len(qp) else []:
                    first = page * p
                    if first + p - 1 < ns or first > qp.max() - w:
                        continue
                    keys = k[b, max(first, ns) : min(first + p, held), kk]  # sinks: no bound
                    lo, hi = keys.min(0), keys.max(0)
                    qs = q[b][qp][:, kk * g : (kk + 1) * g].reshape(-1, q.shape[-1])
                    scores[page] = np.max(np.maximum(qs * lo, qs * hi).sum(-1))
                best = sorted(scores, key=lambda x: -scores[x])[:top]
                chosen[b, kk, blk] = set(best)
    return chosen


def np_attention(q, k, v, q_pos, chosen, cfg, tb, scale=None, cap=None, sinks=None, left=None):
    """(out [B, t, H, Dv], lse [B, H, t]) in float64: each query over sinks, its window and the
    `chosen` pages' older tokens (and the layer's `left` window)."""
    ns, w, p = cfg["num_sinks"], cfg["window"], cfg["page_size"]
    g = H // k.shape[2]
    scale = 1 / np.sqrt(D) if scale is None else scale
    t = q_pos.shape[1]
    out = np.zeros((B, t, H, v.shape[-1]))
    lse = np.full((B, H, t), -np.inf)
    for b in range(B):
        lo = q_pos[b][q_pos[b] >= 0].min(initial=T)  # blocks of tb positions from the lowest
        for i, pi in enumerate(q_pos[b]):
            if pi < 0:  # padding: out 0; lse the sink logit alone (as attend.finish gives)
                lse[b, :, i] = -np.inf if sinks is None else sinks
                continue
            for h in range(H):
                kk = h // g
                js = [
                    j for j in range(pi + 1)
                    if (left is None or pi - j <= left)
                    and (j < ns or pi - j < w or j // p in chosen[b, kk, (pi - lo) // tb])
                ]  # fmt: skip
                s = scale * k[b, js, kk] @ q[b, pi, h]
                if cap is not None:
                    s = cap * np.tanh(s / cap)
                m = s.max()
                e = np.exp(s - m)
                total = e.sum() + (0 if sinks is None else np.exp(sinks[h] - m))
                out[b, i, h] = e @ v[b, js, kk] / total
                lse[b, h, i] = m + np.log(total)
    return out, lse


def chosen_sets(chosen):
    """[B, K, nb, top] pages (-1: none) -> {(row, head, block): set}."""
    return {
        (b, kk, n): set(chosen[b, kk, n][chosen[b, kk, n] >= 0].tolist())
        for b, kk, n in np.ndindex(chosen.shape[:3])
    }


# ---------------------------------------------------------------------------------------------
# Every page chosen: the full cache.


def full_cache_run(data, chunks, kh, **static):
    step = jax.jit(
        lambda c, q, k, v, pos: (
            c := cache_lib.update(c, k, v, pos),
            attend_lib.attend(q, pos, c, return_lse=True, **static),
        )
    )
    cache, out, start = cache_lib.init_cache("full", B, 32, kh, D, np.float64), [], 0
    for c in chunks:
        cache, res = step(cache, *chunk_args(data, start, start + c))
        out.append(res)
        start += c
    return out


CHUNKS = {"decode": [7] + [1] * 23, "chunks": [6] * 5}  # one compilation per chunk length


@pytest.mark.parametrize("chunks", sorted(CHUNKS))
@pytest.mark.parametrize("n", [1, 8])
def test_every_page_chosen_is_the_full_cache(helpers, chunks, n):
    """top_pages covering every page: the full cache's out and lse to float64 rounding, with
    pages straddling the window's edge, a length that is no multiple of the page, ragged rows."""
    data = stream(2)
    cfg = dict(num_sinks=2, window=5, page_size=4, top_pages=8)
    cache = retrieval.init_cache(B, 32, 2, D, np.float64, **cfg, num_shards=n)
    mesh = None if n == 1 else helpers.ring_mesh(n, AXIS)
    if mesh is not None:
        cache = retrieval.shard_cache(cache, mesh, AXIS)
    results, _ = run(cache, data, CHUNKS[chunks], mesh)
    expected = full_cache_run(data, CHUNKS[chunks], 2)
    for i, (res, (out, lse)) in enumerate(zip(results, expected, strict=True)):
        helpers.assert_close(res[1], out, 1e-12, f"out {i}")
        helpers.assert_close(res[2], lse, 1e-12, f"lse {i}")


# ---------------------------------------------------------------------------------------------
# Fewer pages: NumPy's selection, exact attention over it.


def steps(*first):
    """Chunks `first`, then decode steps to the end of the stream."""
    return [*first] + [1] * (T - sum(first))


CASES = {
    # name: (kv heads, cache config, chunks, attention variants)
    "gqa_decode": (2, dict(num_sinks=2, window=5, page_size=4, top_pages=2), steps(9), {}),
    "gqa_chunks_blocks": (
        2,
        dict(num_sinks=1, window=3, page_size=4, top_pages=2, selection_block=2),
        [6] * 5,
        {},
    ),  # fmt: skip
    "mqa_int8": (
        1,
        dict(num_sinks=2, window=6, page_size=3, top_pages=3, quantize=True),
        steps(10),
        {},
    ),  # fmt: skip
    "cap_sinks_local_window": (
        2,
        dict(num_sinks=3, window=4, page_size=4, top_pages=1),
        steps(6),
        dict(logits_soft_cap=2.0, local_window_size=13, sinks=(0.5, -1.0, 0.2, 1.5)),
    ),  # fmt: skip
    "sinks_over_two_pages": (
        2,
        dict(num_sinks=5, window=3, page_size=3, top_pages=2),
        steps(8),
        {},
    ),
    "no_sinks": (2, dict(num_sinks=0, window=2, page_size=5, top_pages=2), [5] * 6, {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_selection_and_attention_equal_the_numpy_reference(helpers, case):
    kh, cfg, chunks, variants = CASES[case]
    data = stream(kh)
    cache = retrieval.init_cache(B, 32, kh, D, np.float64, **cfg)
    static = {k: tuple(v) if isinstance(v, tuple) else v for k, v in variants.items()}
    results, _ = run(cache, data, chunks, **static)
    q, k, v = data
    k_seen, v_seen = (seen_keys(x, cfg.get("quantize", False)) for x in (k, v))
    left = variants.get("local_window_size")
    sinks = None if "sinks" not in variants else np.asarray(variants["sinks"])
    for i, ((_, _, _, pos), out, lse, chosen) in enumerate(results):
        tb = cfg.get("selection_block") or pos.shape[1]
        expected = np_select(q, k_seen, pos, cfg, tb)
        assert chosen_sets(chosen) == expected, f"chunk {i}"
        ref, ref_lse = np_attention(
            q, k_seen, v_seen, pos, expected, cfg, tb, cap=variants.get("logits_soft_cap"),
            sinks=sinks, left=left,
        )  # fmt: skip
        helpers.assert_close(out, ref, 1e-12, f"out {i}")
        helpers.assert_close(lse, ref_lse, 1e-12, f"lse {i}")
    assert any(len(s) == cfg["top_pages"] for s in chosen_sets(results[-1][3]).values())


@pytest.mark.parametrize("chunks", sorted(CHUNKS))
def test_eight_devices_choose_the_global_top_pages(helpers, chunks):
    """Pages striped over 8 devices, 2 of 8 pages chosen: the one-device result (the same
    global top pages, found through one all-gather of scores)."""
    data = stream(2)
    cfg = dict(num_sinks=2, window=3, page_size=2, top_pages=3)
    one, _ = run(retrieval.init_cache(B, 32, 2, D, np.float64, **cfg), data, CHUNKS[chunks])
    mesh = helpers.ring_mesh(8, AXIS)
    cache = retrieval.init_cache(B, 32, 2, D, np.float64, **cfg, num_shards=8)
    many, cache = run(retrieval.shard_cache(cache, mesh, AXIS), data, CHUNKS[chunks], mesh)
    assert cache.k.sharding.spec == jax.sharding.PartitionSpec(None, AXIS)
    for i, (a, b) in enumerate(zip(one, many, strict=True)):
        helpers.assert_close(b[1], a[1], 1e-12, f"out {i}")
        helpers.assert_close(b[2], a[2], 1e-12, f"lse {i}")


def test_empty_cache_and_padding_give_zeros():
    cache = retrieval.init_cache(B, 16, 2, D, num_sinks=2, window=3, page_size=4, top_pages=2)
    q = jnp.ones((B, 2, H, D))
    attend = jax.jit(functools.partial(retrieval.attend, return_lse=True))
    out, lse = attend(q, jnp.asarray([[0, 1], [-1, -1]], jnp.int32), cache)
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out, 0.0)
    assert np.all(np.isneginf(lse))


# ---------------------------------------------------------------------------------------------
# What a step reads.


def _long_caches(s, kh=3, d=64):
    cfg = dict(num_sinks=4, window=252, page_size=64, top_pages=12)
    shape = lambda f, *a, **k: jax.eval_shape(functools.partial(f, *a, **k))  # noqa: E731
    full = shape(cache_lib.init_cache, "full", 1, s, kh, d)
    return full, shape(retrieval.init_cache, 1, s, kh, d, **cfg)


@pytest.mark.parametrize("length", [8192, 32768])
def test_step_reads_only_the_chosen_pages(helpers, length):
    """A decode step against 8K / 32K cached tokens (SmolLM2's 3 KV heads of 64): the compiled
    program gathers the 12 chosen pages per KV head ([K, 12 x 64, D]) and reads of the cache
    only those, the sinks, the window's pages and the page bounds: what pages.bytes_read
    predicts, under 1/4 (8K) and 1/16 (32K) of the full cache's step, which reads it all."""
    full, cache = _long_caches(length)
    q = jax.ShapeDtypeStruct((1, 1, 9, 64), jnp.float32)
    pos = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    hlo = jax.jit(retrieval.attend).trace(q, pos, cache).lower().compile().as_text()
    gathers = [line for line in hlo.splitlines() if " gather(" in line]
    shapes = {s for line in gathers for s in helpers.hlo_shapes(line.split(" gather(")[0])}
    assert (36, 1, 1, 64, 1, 64) in shapes, gathers  # 3 heads x 12 pages of [64, D]
    got = sum(reads.parameter_reads(hlo, "cache").values())
    assert got == pytest.approx(pages.bytes_read(cache), rel=0.01)
    full_hlo = jax.jit(attend_lib.attend).trace(q, pos, full).lower().compile().as_text()
    everything = sum(reads.parameter_reads(full_hlo, "cache").values())
    assert everything >= cache_lib.cache_bytes(full)  # all of it (pos in several passes)
    assert got < everything / (4 if length == 8192 else 16), (got, everything)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowers_for_accelerators(helpers, platform):
    """A decode step on 8 devices (pages striped), and one with the page store in host memory,
    lower for CUDA and TPU (ringattn.target_platform)."""
    mesh = jax.make_mesh((8,), (AXIS,))
    bf16 = jnp.bfloat16
    cfg = dict(num_sinks=4, window=60, page_size=16, top_pages=4)
    cache = retrieval.init_cache(1, 1024, 2, 64, bf16, **cfg, num_shards=8)
    q, k = jnp.zeros((1, 1, 8, 64), bf16), jnp.zeros((1, 1, 2, 64), bf16)
    pos = jnp.full((1, 1), 700, jnp.int32)

    def on_mesh(q, k, pos, cache):
        cache = retrieval.update_on_mesh(cache, k, k, pos, mesh=mesh, axis_name=AXIS)
        return retrieval.attend_on_mesh(q, pos, cache, mesh=mesh, axis_name=AXIS), cache

    helpers.lowered_calls(platform, on_mesh, q, k, pos, cache)
    host = retrieval.init_cache(1, 1024, 2, 64, bf16, **cfg, host_pages=True)

    def one(q, k, pos, cache):
        cache = retrieval.update(cache, k, k, pos)
        return retrieval.attend(q, pos, cache), cache

    with ringattn.target_platform(platform):
        text = jax.jit(one).trace(q, k, pos, host).lower(lowering_platforms=(platform,)).as_text()
    assert 'mhlo.memory_kind = "pinned_host"' in text


def test_sharded_step_moves_only_scores_and_results(helpers):
    """A decode step on 8 devices is two collectives, both all-gathers: each device's top page
    scores ([B, K, 1, 8 x top_pages]) and the merge's packed per-query partials ([8, B, t, H,
    D + 1], decode/merge.py); no page's K/V moves."""
    mesh = helpers.ring_mesh(8, AXIS)
    cache = retrieval.init_cache(
        1, 2048, 2, D, num_sinks=4, window=60, page_size=16, top_pages=4, num_shards=8
    )
    cache = retrieval.shard_cache(cache, mesh, AXIS)
    q, k = jnp.zeros((1, 1, H, D)), jnp.zeros((1, 1, 2, D))
    pos = jnp.full((1, 1), 700, jnp.int32)
    hlo = step_fn(mesh).lower(cache, q, k, k, pos).compile().as_text()
    collectives = [
        line
        for line in hlo.splitlines()
        if re.search(
            r" (all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)\(", line
        )
    ]
    assert len(collectives) == 2 and all(" all-gather(" in c for c in collectives), collectives
    shapes = sorted(
        tuple(s for s in helpers.hlo_shapes(c.split("=")[1].split(" all-gather(")[0]))
        for c in collectives
    )
    assert sorted([((1, 2, 1, 32),), ((8, 1, 1, H, D + 1),)]) == shapes, shapes


@pytest.mark.parametrize("n", [1, 8])
def test_pages_in_host_memory(helpers, n):
    """host_pages: the store stays in host memory ("pinned_host") through update and attend, on
    one device and striped over 8, the bounds on the device, and the results are the
    device-memory cache's exactly."""
    data = stream(2, np.float32)
    cfg = dict(num_sinks=2, window=3, page_size=4, top_pages=2, num_shards=n)
    mesh = None if n == 1 else helpers.ring_mesh(n, AXIS)
    results = []
    for host in (False, True):
        cache = retrieval.init_cache(B, 32, 2, D, **cfg, host_pages=host)
        if mesh is not None:
            cache = retrieval.shard_cache(cache, mesh, AXIS)
        out, cache = run(cache, data, CHUNKS["chunks"], mesh)
        results.append(out)
    assert cache.k.sharding.memory_kind == "pinned_host" == cache.pos.sharding.memory_kind
    assert cache.k_min.sharding.memory_kind == "device"
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a[1], b[1])


def test_rejects_bad_arguments(helpers):
    cache = retrieval.init_cache(B, 16, 2, D, num_sinks=2, window=3, page_size=4, top_pages=2)
    q, pos = jnp.zeros((B, 2, H, D)), jnp.asarray([[3, 4]] * B, jnp.int32)
    k = jnp.zeros((B, 2, 2, D))
    with pytest.raises(ValueError, match="`page_size`"):
        retrieval.init_cache(B, 16, 2, D, page_size=0)
    with pytest.raises(ValueError, match="`num_sinks`"):
        retrieval.init_cache(B, 16, 2, D, num_sinks=16)
    with pytest.raises(TypeError, match="`cache`"):
        retrieval.attend(q, pos, cache_lib.init_cache("full", B, 16, 2, D))
    with pytest.raises(ValueError, match="`causal`"):
        retrieval.attend(q, pos, cache, causal=False)
    with pytest.raises(TypeError, match="rope"):
        retrieval.attend(q, pos, cache, rope=lambda x, p: x)
    with pytest.raises(ValueError, match="`q`"):
        retrieval.attend(q[..., :3, :], pos, cache)
    with pytest.raises(ValueError, match="`k_new`"):
        retrieval.update(cache, k[..., :1], k, pos)
    with pytest.raises(ValueError, match="consecutive"):  # a promise, checked when eager
        retrieval.attend(q, jnp.asarray([[3, 5]] * B, jnp.int32), cache)
    with pytest.raises(ValueError, match="past the end"):
        retrieval.update(cache, k, k, jnp.asarray([[15, 16]] * B, jnp.int32))
    with pytest.raises(ValueError, match="num_shards=1"):
        striped = retrieval.init_cache(B, 64, 2, D, num_shards=4, page_size=4)
        retrieval.attend(q, pos, striped)
    mesh = helpers.ring_mesh(4, AXIS)
    with pytest.raises(ValueError, match="num_shards=4"):
        retrieval.attend_on_mesh(q, pos, cache, mesh=mesh, axis_name=AXIS)
