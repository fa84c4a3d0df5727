"""Decode attention through KV caches against the float64 reference, step by step.

Each case jits one prefill and one decode step (update then attend) and runs the step token by
token: the step's program is compiled once per case.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ringattn
from ringattn.decode import attend as attend_lib
from ringattn.decode import cache as cache_lib

B, T, D = 2, 12, 8
TOL = {np.float32: 2e-6, np.float64: 1e-12}
# Jitted once per static configuration: eager calls would compile every operation on its own.
update = jax.jit(cache_lib.update)
attend = jax.jit(attend_lib.attend, static_argnames=("scale", "causal", "rope", "return_lse"))
reference = jax.jit(ringattn.reference_attention, static_argnames=("causal", "scale", "return_lse"))


def rope(x, pos):
    """Rotary embedding (half-split) of x [B, L, N, D] at positions [B, L], linear in x."""
    half = x.shape[-1] // 2
    freq = 1.0 / 100.0 ** (np.arange(half) / half)
    angle = pos[..., None, None].astype(x.dtype) * freq.astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def step_fn(**static):
    return _step_fn(**{n: tuple(x) if isinstance(x, np.ndarray) else x for n, x in static.items()})


@functools.cache
def _step_fn(sinks=None, **static):
    """One jitted decode step per static configuration (sinks: a tuple, baked in)."""

    @jax.jit
    def step(cache, q, k_new, v_new, pos_new):
        cache = cache_lib.update(cache, k_new, v_new, pos_new)
        s = None if sinks is None else jnp.asarray(sinks, q.dtype)
        return cache, attend_lib.attend(q, pos_new, cache, **static, sinks=s, return_lse=True)

    return step


def data(h, kh, dtype, t=T, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, t, h, D))
    k, v = rng.standard_normal((2, B, t, kh, D))
    return tuple(x.astype(dtype) for x in (q, k, v))


def positions(t):
    return np.broadcast_to(np.arange(t, dtype=np.int32), (B, t))


def decode(cache, q, k, v, pos, prefill, **static):
    """Prefill `prefill` tokens in one update, then one token at a time: (out, lse) of every
    query, concatenated along t."""
    step = step_fn(**static)
    cache, (out, lse) = step(
        cache, q[:, :prefill], k[:, :prefill], v[:, :prefill], pos[:, :prefill]
    )
    outs, lses = [out], [lse]
    for i in range(prefill, q.shape[1]):
        s = slice(i, i + 1)
        cache, (out, lse) = step(cache, q[:, s], k[:, s], v[:, s], pos[:, s])
        outs.append(out)
        lses.append(lse)
    return np.concatenate(outs, axis=1), np.concatenate(lses, axis=2), cache


@pytest.mark.parametrize(
    "h, kh, dtype",
    [(4, 2, np.float32), (4, 2, np.float64), (4, 1, np.float32)],
    ids=["GQA-f32", "GQA-f64", "MQA-f32"],
)
def test_full_cache_decoding_equals_causal_reference(helpers, h, kh, dtype):
    q, k, v = data(h, kh, dtype)
    cache = cache_lib.init_cache("full", B, T + 4, kh, D, dtype)
    out, lse, _ = decode(cache, q, k, v, positions(T), prefill=5)
    f64 = lambda x: x.astype(np.float64)  # noqa: E731
    ref, ref_lse = reference(f64(q), f64(k), f64(v), causal=True, return_lse=True)
    helpers.assert_close(out, ref, TOL[dtype], "out")
    helpers.assert_close(lse, ref_lse, TOL[dtype], "lse")


def test_ragged_batch_with_padding(helpers):
    """Row 0 has a 6-token prompt, row 1 a 3-token one right-padded (position -1: not written,
    output 0); each row then decodes at its own positions."""
    q, k, v = data(4, 2, np.float64)
    lengths = (6, 3)
    cache = cache_lib.init_cache("full", B, T, 2, D, np.float64)
    pos_prompt = np.asarray([[i if i < n else -1 for i in range(6)] for n in lengths], np.int32)
    step = step_fn()
    cache, (out, _) = step(cache, q[:, :6], k[:, :6], v[:, :6], pos_prompt)
    np.testing.assert_array_equal(np.asarray(out)[1, 3:], 0.0)
    np.testing.assert_array_equal(np.asarray(cache.pos)[1], [0, 1, 2] + [-1] * (T - 3))
    ref = reference(q, k, v, causal=True)
    helpers.assert_close(out[0], ref[0, :6], 1e-12, "row 0 prompt")
    helpers.assert_close(out[1, :3], ref[1, :3], 1e-12, "row 1 prompt")
    # Decode 3 more tokens: row r's token i is the data's token lengths[r] + i.
    for i in range(3):
        idx = np.asarray([n + i for n in lengths])
        q_i, k_i, v_i = (x[np.arange(B), idx][:, None] for x in (q, k, v))
        cache, (out, _) = step(cache, q_i, k_i, v_i, idx[:, None].astype(np.int32))
        for r in range(B):
            helpers.assert_close(out[r, 0], ref[r, idx[r]], 1e-12, f"row {r} step {i}")


@jax.jit
def _rotated_reference(q, k, v, q_pos, kv_pos, visible):
    """reference_attention of rotated q, k; keys with visible = 0 masked through segment ids."""
    seg = jnp.ones(q.shape[:2], jnp.int32)
    kv_seg = jnp.broadcast_to(visible, k.shape[:2])
    return ringattn.reference_attention(
        rope(q, q_pos),
        rope(k, kv_pos),
        v,
        segment_ids=seg,
        kv_segment_ids=kv_seg,
        return_lse=True,
    )


def window_reference(q_i, k, v, p_i, length, ns, w, first_visible):
    """Reference attention of one query row q_i [B, 1, H, D] at text position p_i, when the
    cache holds `length` tokens: keys j <= p_i that are sinks or >= first_visible, rotated at
    StreamingLLM positions (sinks, then the window in order)."""
    start = max(ns, length - w)
    j = np.arange(k.shape[1])
    rel = np.where(j < ns, j, ns + j - start).astype(np.int32)
    visible = ((j <= p_i) & ((j < ns) | (j >= first_visible))).astype(np.int32)
    kv_pos = np.broadcast_to(rel, k.shape[:2])
    q_pos = np.full((B, 1), rel[p_i], np.int32)
    return _rotated_reference(q_i, k, v, q_pos, kv_pos, visible)


@pytest.mark.parametrize("kind, ns, w", [("sink_window", 2, 4), ("window", 0, 5)])
def test_window_cache_decoding_equals_sink_window_reference(helpers, kind, ns, w):
    """One token at a time, a window cache with RoPE at cache positions is exactly attention to
    the sinks and the last w tokens, rotated at StreamingLLM positions."""
    t = 14
    q, k, v = data(4, 2, np.float64, t=t)
    cache = cache_lib.init_cache(kind, B, None, 2, D, np.float64, num_sinks=ns, window=w)
    out, lse, cache = decode(cache, q, k, v, positions(t), prefill=1, rope=rope)
    for i in range(t):
        ref, ref_lse = window_reference(q[:, i : i + 1], k, v, i, i + 1, ns, w, i + 1 - w)
        helpers.assert_close(out[:, i : i + 1], ref, 1e-12, f"out {i}")
        helpers.assert_close(lse[..., i : i + 1], ref_lse, 1e-12, f"lse {i}")
    # The cache holds the sinks and the last w tokens, at positions 0 .. ns + w - 1.
    held = np.sort(np.asarray(cache.pos), axis=1)
    np.testing.assert_array_equal(held[0], list(range(ns)) + list(range(t - w, t)))
    kv_pos, q_pos = cache_lib.cache_positions(cache, positions(t)[:, -1:])
    np.testing.assert_array_equal(np.sort(np.asarray(kv_pos)[0]), np.arange(ns + w))
    np.testing.assert_array_equal(np.asarray(q_pos), ns + w - 1)


def test_window_cache_chunk_sees_documented_keys(helpers):
    """A chunk of t tokens is written, then attended: query i of the chunk sees the sinks and
    the keys from length - w on (the last window - (t - 1 - i) tokens)."""
    ns, w, first, t = 2, 5, 9, 3
    q, k, v = data(4, 2, np.float64, t=first + t)
    cache = cache_lib.init_cache("sink_window", B, None, 2, D, np.float64, num_sinks=ns, window=w)
    pos = positions(first + t)
    cache = update(cache, k[:, :first], v[:, :first], pos[:, :first])  # longer than w
    step = step_fn(rope=rope)
    s = slice(first, first + t)
    _, (out, _) = step(cache, q[:, s], k[:, s], v[:, s], pos[:, s])
    length = first + t
    for i in range(t):
        p = first + i
        ref, _ = window_reference(q[:, p : p + 1], k, v, p, length, ns, w, length - w)
        helpers.assert_close(out[:, i : i + 1], ref, 1e-12, f"chunk query {i}")


def test_int8_cache_close_to_unquantised():
    """int8 K/V with per-token, per-head scales: outputs within 2e-2 of the output scale (a sink
    window cache with RoPE, so the rotation of int8 keys before their scale is covered too)."""
    q, k, v = data(4, 2, np.float32, t=T)
    q = q * 2.0  # sharper softmax: quantisation error in the scores matters more
    results = []
    for quantize in (False, True):
        cache = cache_lib.init_cache(
            "sink_window", B, None, 2, D, np.float32, num_sinks=2, window=6, quantize=quantize
        )
        results.append(decode(cache, q, k, v, positions(T), prefill=4, rope=rope)[:2])
    (out, lse), (out8, lse8) = results
    err = np.max(np.abs(out8 - out)) / np.max(np.abs(out))
    assert err < 2e-2, err
    assert np.max(np.abs(lse8 - lse)) < 5e-2


def test_bf16_cache_close_to_f32(helpers):
    q, k, v = data(4, 2, np.float32)
    cache = cache_lib.init_cache("full", B, T, 2, D, jnp.bfloat16)
    assert cache.k.dtype == jnp.bfloat16
    out, _, _ = decode(cache, q, k, v, positions(T), prefill=4)
    assert out.dtype == np.float32
    ref = reference(q.astype(np.float64), k, v, causal=True)
    helpers.assert_close(out, ref, 2e-2, "out")


def test_empty_cache_and_padding_queries_give_zeros():
    q, _, _ = data(4, 2, np.float32, t=3)
    for quantize in (False, True):
        cache = cache_lib.init_cache("full", B, 8, 2, D, np.float32, quantize=quantize)
        out, lse = attend(q, positions(3), cache, return_lse=True)
        np.testing.assert_array_equal(out, 0.0)
        assert np.all(np.isneginf(lse))
    k = jnp.ones((B, 3, 2, D))
    cache = update(cache, k, k, positions(3))
    out, lse = attend(q, jnp.full((B, 3), -1, jnp.int32), cache, return_lse=True)
    np.testing.assert_array_equal(out, 0.0)
    assert np.all(np.isneginf(lse)) and not np.isnan(out).any()


def test_non_causal_sees_every_token(helpers):
    q, k, v = data(4, 2, np.float64, t=6)
    cache = cache_lib.init_cache("full", B, 10, 2, D, np.float64)
    cache = update(cache, k, v, positions(6))
    out = attend(q[:, :2], positions(2), cache, causal=False, scale=0.3)
    ref = reference(q[:, :2], k, v, scale=0.3)
    helpers.assert_close(out, ref, 1e-12, "out")


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(q=jnp.zeros((B, 1, 3, D))), "q"),
        (dict(q=jnp.zeros((B, 1, 4, D + 1))), "q"),
        (dict(q=jnp.zeros((B, 1, 4, D), jnp.int32)), "q"),
        (dict(q_pos=jnp.zeros((B, 2), jnp.int32)), "q_pos"),
        (dict(q_pos=jnp.zeros((B, 1))), "q_pos"),
        (dict(rope="rope"), "rope"),
        (dict(scale="0.1"), "scale"),
        (dict(causal=1), "causal"),
    ],
)
def test_attend_rejects_bad_inputs(change, name):
    cache = cache_lib.init_cache("full", B, 8, 2, D, np.float32)
    args = dict(q=jnp.zeros((B, 1, 4, D)), q_pos=jnp.zeros((B, 1), jnp.int32)) | change
    q, q_pos = args.pop("q"), args.pop("q_pos")
    with pytest.raises(ValueError, match=f"`{name}`"):
        attend_lib.attend(q, q_pos, cache, **args)


def test_variants_decode_like_the_reference(helpers):
    """Soft cap, sinks, a layer's local window and a v head dim of its own, decoded token by
    token through a full cache, against reference_attention with the same variants."""
    h, kh, dv, window, cap = 4, 2, 6, 4, 2.0
    q, k, _ = data(h, kh, np.float64)
    v = np.random.default_rng(5).standard_normal((B, T, kh, dv))
    sinks = np.random.default_rng(6).standard_normal(h)
    cache = cache_lib.init_cache("full", B, T, kh, D, np.float64, v_head_dim=dv)
    out, lse, _ = decode(
        cache, q, k, v, positions(T), prefill=3, logits_soft_cap=cap, local_window_size=window,
        sinks=sinks,
    )  # fmt: skip
    ref, ref_lse = ringattn.reference_attention(
        q, k, v, causal=True, local_window_size=(window, 0), logits_soft_cap=cap, sinks=sinks,
        return_lse=True,
    )  # fmt: skip
    helpers.assert_close(out, ref, 1e-12, "out")
    helpers.assert_close(lse, ref_lse, 1e-12, "lse")


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(logits_soft_cap=0.0), "logits_soft_cap"),
        (dict(sinks=np.zeros(3)), "sinks"),
        (dict(local_window_size=-1), "local_window_size"),
    ],
)
def test_attend_rejects_bad_variants(change, name):
    cache = cache_lib.init_cache("full", B, 8, 2, D, np.float32)
    q, q_pos = jnp.zeros((B, 1, 4, D)), jnp.zeros((B, 1), jnp.int32)
    with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
        attend_lib.attend(q, q_pos, cache, **change)


def test_window_pairs_and_the_old_keyword(helpers):
    """local_window_size as everywhere: (left, right) without causality, against the reference;
    the old keyword `local_window` still works, with a DeprecationWarning."""
    q, k, v = data(4, 2, np.float64)
    cache = cache_lib.init_cache("full", B, T, 2, D, np.float64)
    cache = cache_lib.update(cache, k, v, positions(T))
    pos = positions(T)
    out = attend_lib.attend(q, pos, cache, causal=False, local_window_size=(3, 2))
    ref = ringattn.reference_attention(q, k, v, local_window_size=(3, 2))
    helpers.assert_close(out, ref, 1e-12, "out")
    with pytest.warns(DeprecationWarning, match="local_window_size"):
        old = attend_lib.attend(q, pos, cache, local_window=3)
    helpers.assert_close(old, attend_lib.attend(q, pos, cache, local_window_size=3), 0, "old")
