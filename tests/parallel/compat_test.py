"""The drop-in for the original Ring Attention JAX API, against the original itself (same inputs,
same shard_map, outputs and gradients) and against the float64 reference."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ringattn.parallel.compat import ring_attention_original_api

N, B, T, H, D = 4, 2, 32, 2, 8  # 8 tokens a device, chunks of 4


@functools.cache
def _original():
    """ringattention.ringattention_jax, or None when the package is not installed."""
    import jax._src.xla_bridge as xb

    patched = not hasattr(jax.lib, "xla_bridge")
    if patched:  # the package reads jax.lib.xla_bridge at import, which newer JAX dropped
        jax.lib.xla_bridge = xb
    try:
        return importlib.import_module("ringattention.ringattention_jax")
    except ImportError:
        return None
    finally:
        if patched:
            del jax.lib.xla_bridge


def _kwargs(causal_block_size, chunk=4, **over):
    return (
        dict(
            causal_block_size=causal_block_size,
            query_chunk_size=chunk,
            key_chunk_size=chunk,
            deterministic=True,
            dropout_rng=None,
            attn_pdrop=0.0,
            dtype=jnp.float32,
            policy=jax.checkpoint_policies.nothing_saveable,
            precision=None,
            prevent_cse=True,
        )
        | over
    )


@functools.cache
def _both_fn(mesh, causal_block_size, with_segments):
    """jit: (q, k, v, do, seg) -> outputs and (dq, dk, dv) of the original and of ours, in one
    shard_map; with segments also ours given local segment ids (output only). Segment ids go in
    global, replicated along the axis, as the original indexes them."""
    orig, kw = _original(), _kwargs(causal_block_size)
    seq = P(None, "ring")

    def local(q, k, v, seg, seg_local):
        seg = seg if with_segments else None
        args = (None, seg, None, "ring", True, kw)
        outs = (orig.ring_attention(q, k, v, *args), ring_attention_original_api(q, k, v, *args))
        if with_segments:
            args = (None, seg_local, None, "ring", True, kw)
            outs += (jax.lax.stop_gradient(ring_attention_original_api(q, k, v, *args)),)
        return outs

    n_out = 3 if with_segments else 2
    f = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(seq, seq, seq, P(), seq),
        out_specs=(seq,) * n_out,
        check_vma=False,  # the original's scan carries are not typed for shard_map's checks
    )

    @jax.jit
    def run(q, k, v, do, seg):
        outs, vjp = jax.vjp(lambda q, k, v: f(q, k, v, seg, seg), q, k, v)
        zero = jnp.zeros_like(do)
        return outs, vjp((do, zero, zero)[:n_out]), vjp((zero, do, zero)[:n_out])

    return run


# (causal_block_size, segment ids): no mask, causal, block-causal with blocks of two shards.
CASES = [(None, True), (1, True), (16, False)]


@pytest.mark.parametrize("causal_block_size, with_segments", CASES)
def test_matches_original_and_reference(helpers, causal_block_size, with_segments):
    if _original() is None:
        pytest.skip("the original ringattention package is not installed")
    rng = np.random.default_rng(0)
    q, k, v, do, _ = helpers.random_inputs(rng, B, T, T, H, H, D)
    seg = helpers.packed_segments(rng, B, T, 3)  # boundaries inside chunks and shards
    fn = _both_fn(helpers.ring_mesh(N), causal_block_size, with_segments)
    outs, grads_orig, grads = fn(q, k, v, do, seg)
    out_orig, out = outs[:2]
    for name, a, b in zip(
        "out dq dk dv".split(), (out, *grads), (out_orig, *grads_orig), strict=True
    ):
        helpers.assert_close(a, b, 1e-5, f"{name} vs the original")
    if with_segments:  # local segment ids: the same result
        np.testing.assert_allclose(outs[2], out, rtol=0, atol=1e-6)
    static = {}
    if causal_block_size is not None:  # block-causal = causal on block indices
        pos = np.arange(T, dtype=np.int32) // causal_block_size
        static = dict(causal=True, q_positions=pos, kv_positions=pos)
    masks = dict(segment_ids=seg) if with_segments else {}
    masks |= {name: static.pop(name) for name in ("q_positions", "kv_positions") if name in static}
    ref = helpers.reference_f64(q, k, v, do, np.zeros((B, H, T), np.float32), masks, **static)
    helpers.assert_all_close(
        (out, *grads), ref[:1] + ref[2:], np.float32, ("out", "dq", "dk", "dv")
    )


def _call(helpers, *, bias=None, seg=None, cache_idx=None, kw=None, local_len=8, kv_len=None):
    f = jax.shard_map(
        lambda q, k, v: ring_attention_original_api(
            q, k, v, bias, seg, cache_idx, "ring", False, _kwargs(1) if kw is None else kw
        ),
        mesh=helpers.ring_mesh(N),
        in_specs=P(None, "ring"),
        out_specs=P(None, "ring"),
    )
    q = jax.ShapeDtypeStruct((1, local_len * N, 2, 4), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, (kv_len or local_len) * N, 2, 4), jnp.bfloat16)
    return jax.eval_shape(f, q, k, k)


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(bias=np.zeros((1, 1, 1, 32))), NotImplementedError, "`attn_bias`"),
        (dict(cache_idx=0), NotImplementedError, "`cache_idx`.*decode"),
        (dict(kw=_kwargs(1, deterministic=False, attn_pdrop=0.1)), NotImplementedError, "dropout"),
        (dict(kw={"query_chunk_size": 4}), TypeError, "missing.*causal_block_size"),
        (dict(kw=_kwargs(1, window=3)), TypeError, r"unknown \['window'\]"),
        (dict(kw=_kwargs(0)), ValueError, "causal_block_size"),
        (dict(kw=_kwargs(1, chunk=0)), ValueError, "query_chunk_size"),
        (dict(seg=np.zeros((1, 12), np.int32)), ValueError, r"\[batch, 32\].*\[batch, 8\]"),
        (dict(seg=np.zeros((1, 32), np.int32), kv_len=4), ValueError, "same length"),
    ],
)
def test_unsupported_options_fail_clearly(helpers, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call(helpers, **kwargs)


def test_dtypes_and_options_accepted(helpers):
    """bf16 in, bf16 out; dropout off by deterministic=True or attn_pdrop=0; minimal kwargs."""
    assert _call(helpers).dtype == jnp.bfloat16
    kw = dict(causal_block_size=None, query_chunk_size=3, key_chunk_size=8)
    assert _call(helpers, kw=kw).shape == (1, 32, 2, 4)  # chunks need not divide the shard
    assert _call(helpers, kw=_kwargs(1, deterministic=False, attn_pdrop=0.0)).shape[1] == 32
