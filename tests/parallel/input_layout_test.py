"""input_layout: arrays in natural order are laid out inside and come back in natural order;
arrays already laid out are not permuted (checked in the compiled program); a balanced layout
without a word about the order is refused."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ringattn
from ringattn.parallel import layouts

B, T, H, K, D = 1, 32, 4, 2, 8
STATIC = dict(causal=True, block_q=4, block_k=4)
CASES = [  # strategy, mesh shape, layout: each balanced layout on each strategy family
    ("ring", (4,), "zigzag"),
    ("ring", (4,), "striped"),
    ("allgather", (2,), "striped"),
    ("ulysses", (2,), "zigzag"),
    ("hybrid", (2, 2), "striped"),
    ("hybrid", (2, 2), "zigzag"),  # ppermute over two axes, not in the mesh's order
]


def _mesh(shape):
    names = ("context",) if len(shape) == 1 else ("ulysses", "ring")
    devices = jax.devices("cpu")[: int(np.prod(shape))]
    return jax.make_mesh(shape, names, devices=devices), names if len(shape) > 1 else names[0]


@functools.cache
def _data():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((B, T, h, D)) for h in (H, K, K))
    seg = (np.arange(T) >= 11).astype(np.int32)[None] + 1  # two documents, cut mid-shard
    return q, k, v, rng.standard_normal((B, T, H, D)), seg


@pytest.mark.parametrize("strategy, shape, layout", CASES)
def test_natural_order_in_natural_order_out(helpers, strategy, shape, layout):
    """Natural-order q, k, v and segment ids: out, lse and the gradients match the float64
    reference in natural order."""
    q, k, v, do, seg = _data()
    mesh, axis = _mesh(shape)
    dlse = np.zeros((B, H, T), np.float32)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    got = helpers.run_attention(
        ringattn.context_parallel_attention, f32(q), f32(k), f32(v), f32(do), dlse,
        dict(segment_ids=seg), mesh=mesh, axis_name=axis, strategy=strategy, layout=layout,
        input_layout="natural", **STATIC,
    )  # fmt: skip
    want = helpers.reference_f64(q, k, v, do, dlse, dict(segment_ids=seg), causal=True)
    helpers.assert_all_close(got, want, np.float32)


def _hlo(layout, input_layout):
    mesh, axis = _mesh((4,))
    x = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)
    f = functools.partial(
        ringattn.context_parallel_attention, mesh=mesh, layout=layout, input_layout=input_layout,
        **STATIC,
    )  # fmt: skip
    return jax.jit(f).lower(x, x, x).compile().as_text()


def test_laid_out_arrays_are_not_permuted():
    """input_layout == layout: the compiled program moves exactly what the contiguous ring moves
    (its K/V hops), no all-to-all and no extra permute; "natural" adds the layout's own."""

    def count(text, op):
        return text.count(f" {op}(") + text.count(f" {op}-start(")

    ring = _hlo("contiguous", None)
    # q, k, v in and out back (lse is not returned): zigzag two permutes each, striped one
    # all-to-all each; positions are derived from the layout, not moved.
    for layout, op, extra in (("zigzag", "collective-permute", 8), ("striped", "all-to-all", 4)):
        laid_out = _hlo(layout, layout)
        natural = _hlo(layout, "natural")
        assert count(laid_out, "all-to-all") == 0
        assert count(laid_out, "collective-permute") == count(ring, "collective-permute")
        moved = count(natural, op) - count(laid_out, op)
        assert moved == extra, (layout, moved)


def test_refused_without_the_order():
    q = jnp.zeros((B, T, H, D))
    mesh, _ = _mesh((4,))
    for layout in ("zigzag", "striped"):
        with pytest.raises(ValueError, match="input_layout='natural'"):
            ringattn.context_parallel_attention(q, q, q, mesh=mesh, layout=layout)
    # Explicit positions say where every token is: no question to ask.
    pos = layouts.layout_positions("zigzag", T, 4).astype(np.int32)
    out = ringattn.context_parallel_attention(
        q, q, q, mesh=mesh, layout="zigzag", q_positions=pos, kv_positions=pos
    )
    assert out.shape == q.shape
