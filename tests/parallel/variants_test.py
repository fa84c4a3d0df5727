"""The attention variants through every strategy and layout against the float64 reference:
logits soft cap (Gemma 2), learned sinks (gpt-oss; gradients included), a value head dim of its
own (MLA), and all three at once; out, lse and every gradient, f32 within 2e-5 relative.

Packed causal documents in every case (so tiles of every kind appear); one compiled program per
(strategy, variant) serves the three layouts, whose positions are passed explicitly.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ringattn
from ringattn import LAYOUTS
from ringattn.parallel import layouts

B, T, H, K, D = 2, 32, 4, 2, 8
BLOCKS = dict(block_q=8, block_k=6)
VARIANTS = {  # name: (soft cap, sinks, v head dim)
    "soft_cap": (2.0, False, D),
    "sinks": (None, True, D),
    "v_head_dim": (None, False, 2 * D),
    "all": (1.5, True, D // 2),
}
STRATEGIES = {  # name: mesh shape (None: blockwise_attention on one device)
    "blockwise": None,
    "ring": (4,),
    "allgather": (4,),
    "ulysses": (4,),
    "hybrid": (2, 2),
}


@functools.cache
def _mesh(shape):
    names = ("context",) if len(shape) == 1 else ("ulysses", "ring")
    return jax.make_mesh(shape, names, devices=jax.devices("cpu")[: math.prod(shape)])


def _attention(strategy, cap):
    """f(q, k, v, sinks, masks) -> (out, lse) for a strategy (or "reference"), variants static."""
    kw = dict(causal=True, logits_soft_cap=cap, return_lse=True)
    if strategy == "reference":
        return lambda q, k, v, s, m: ringattn.reference_attention(q, k, v, sinks=s, **kw, **m)
    kw.update(BLOCKS)
    if strategy == "blockwise":
        return lambda q, k, v, s, m: ringattn.blockwise_attention(q, k, v, sinks=s, **kw, **m)
    shape = STRATEGIES[strategy]
    axis = "context" if len(shape) == 1 else ("ulysses", "ring")
    kw.update(mesh=_mesh(shape), axis_name=axis, strategy=strategy)
    return lambda q, k, v, s, m: ringattn.context_parallel_attention(q, k, v, sinks=s, **kw, **m)


@functools.cache
def _program(strategy, variant):
    """jit((q, k, v, sinks, do, dlse, masks) -> (out, lse, dq, dk, dv[, dsinks]))."""
    cap, sinks, _ = VARIANTS[variant]
    f = _attention(strategy, cap)

    @jax.jit
    def run(q, k, v, s, do, dlse, masks):
        args = (q, k, v, s) if sinks else (q, k, v)
        fn = (lambda *a: f(*a, masks)) if sinks else (lambda *a: f(*a, None, masks))
        (out, lse), vjp = jax.vjp(fn, *args)
        return (out, lse, *vjp((do, dlse)))

    return run


def _case(variant, dtype):
    """Natural-order data (packed documents), sinks and cotangents of a variant."""
    _, _, dv = VARIANTS[variant]
    rng = np.random.default_rng(1)
    q = rng.standard_normal((B, T, H, D))
    k = rng.standard_normal((B, T, K, D))
    v = rng.standard_normal((B, T, K, dv))
    do = rng.standard_normal((B, T, H, dv))
    dlse = rng.standard_normal((B, H, T))
    sinks = rng.standard_normal(H)
    cuts = [np.sort(rng.choice(np.arange(1, T), 2, replace=False)) for _ in range(B)]
    seg = np.asarray([np.searchsorted(c, np.arange(T), "right") for c in cuts], np.int32)
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return tuple(cast(x) for x in (q, k, v, sinks, do)) + (cast(dlse), seg)


def _reference(variant):
    q, k, v, sinks, do, dlse, seg = _case(variant, np.float64)
    return _program("reference", variant)(q, k, v, sinks, do, dlse, dict(segment_ids=seg))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_variant(helpers, strategy, variant):
    want = [np.asarray(x) for x in _reference(variant)]
    q, k, v, sinks, do, dlse, seg = _case(variant, np.float32)
    run = _program(strategy, variant)
    shape = STRATEGIES[strategy]
    names = ("out", "lse", "dq", "dk", "dv", "dsinks")
    for layout in LAYOUTS if shape else ("contiguous",):
        n = math.prod(shape) if shape else 1
        to = lambda x, axis=1: ringattn.to_layout(x, layout, n, axis=axis)  # noqa: B023, E731
        back = lambda x, axis=1: np.asarray(ringattn.from_layout(x, layout, n, axis=axis))  # noqa: B023, E731
        masks = dict(segment_ids=to(seg))
        if shape:
            pos = layouts.layout_positions(layout, T, n).astype(np.int32)
            masks.update(q_positions=pos, kv_positions=pos)
        got = run(to(q), to(k), to(v), sinks, to(do), to(dlse, 2), masks)
        got = [back(got[0]), back(got[1], 2), *(back(g) for g in got[2:5]), *got[5:]]
        for name, a, w in zip(names, got, want, strict=False):
            helpers.assert_close(a, w, 2e-5, f"{strategy}/{variant}/{layout} {name}")


def test_sink_counted_once_and_queries_that_see_nothing(helpers):
    """Queries whose document has no key (kv segments differ) give 0 and lse = their sink,
    through the ring over 4 devices; the sink enters each row's denominator exactly once."""
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((1, T, h, D)), jnp.float32) for h in (H, K, K))
    sinks = jnp.asarray(rng.standard_normal(H), jnp.float32)
    seg = np.ones((1, T), np.int32)
    kv_seg = np.where(np.arange(T) < T // 2, 1, 2)[None].astype(np.int32)
    seg[:, T // 2 :] = 3  # the second half of the queries has no document among the keys
    out, lse = ringattn.context_parallel_attention(
        q, k, v, sinks=sinks, segment_ids=seg, kv_segment_ids=kv_seg, mesh=_mesh((4,)),
        causal=True, return_lse=True, **BLOCKS,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(out)[:, T // 2 :], 0.0)
    np.testing.assert_allclose(
        np.asarray(lse)[0, :, T // 2 :], np.broadcast_to(sinks[:, None], (H, T // 2)), rtol=1e-6
    )
    f64 = lambda x: jnp.asarray(x, jnp.float64)  # noqa: E731
    want = ringattn.reference_attention(
        f64(q), f64(k), f64(v), sinks=f64(sinks), segment_ids=seg, kv_segment_ids=kv_seg,
        causal=True,
    )  # fmt: skip
    helpers.assert_close(out, want, 2e-5, "out")
