"""context_parallel_attention with every strategy (allgather, ulysses, hybrid; ring in
ring_test.py) against the float64 reference, forward and all gradients, on every layout.

Compilation dominates, so every compiled program is shared: segment ids are always passed (zeros
for one document), so "causal" and "packed" differ in data only, and the matrix passes positions
explicitly in layout order, so one program serves all three layouts. The full matrix (layouts x
mask kinds x GQA/MQA) runs at one mesh per strategy; the other meshes run a reduced set with
positions derived from `layout`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ringattn
from ringattn import LAYOUTS
from ringattn.parallel import hybrid, layouts, ulysses

B, T, D = 2, 32, 8
BLOCKS = dict(block_q=8, block_k=6)  # blocks that do not divide the lengths: padded tiles
MASKS = {  # kind: (static arguments, documents per row)
    "causal": (dict(causal=True), 1),
    "packed": (dict(causal=True), 3),
    "window": (dict(local_window_size=(5, 2)), 1),
}


@functools.cache
def make_mesh(shape):
    """Explicit axes: ("context",) for 1-D, ("ulysses", "ring") for 2-D."""
    names = ("context",) if len(shape) == 1 else ("ulysses", "ring")
    return jax.make_mesh(shape, names, devices=jax.devices("cpu")[: math.prod(shape)])


def axis_for(shape):
    return "context" if len(shape) == 1 else ("ulysses", "ring")


def case(helpers, kind, h, kh, seed=0, dtype=np.float32):
    """Natural-order data, masks and the float64 reference of one mask kind."""
    static, docs = MASKS[kind]
    rng = np.random.default_rng(seed)
    data = helpers.random_inputs(rng, B, T, T, h, kh, D, dtype)
    seg = helpers.packed_segments(rng, B, T, docs) if docs > 1 else np.zeros((B, T), np.int32)
    masks = dict(segment_ids=seg)
    return static, masks, data, helpers.reference_f64(*data, masks, **static)


def run_cp(helpers, strategy, shape, layout, static, masks, data, explicit=True, **kw):
    """context_parallel_attention on the data in `layout` order; results in natural order.

    `explicit`: pass the layout's positions (and leave `layout` at its default, which then only
    checks lengths); otherwise let `layout` derive them.
    """
    n = math.prod(shape)
    to = lambda x, axis=1: ringattn.to_layout(x, layout, n, axis=axis)  # noqa: E731
    q, k, v, do, dlse = data
    masks = {name: to(x) for name, x in masks.items()}
    if explicit:
        for name, length in (("q_positions", q.shape[1]), ("kv_positions", k.shape[1])):
            masks[name] = layouts.layout_positions(layout, length, n).astype(np.int32)
    else:
        kw.update(layout=layout, input_layout=layout)
    got = helpers.run_attention(
        ringattn.context_parallel_attention,
        *(to(x) for x in (q, k, v, do)),
        to(dlse, 2),
        masks,
        mesh=make_mesh(shape),
        axis_name=axis_for(shape),
        strategy=strategy,
        **static,
        **BLOCKS,
        **kw,
    )
    axes = (1, 2, 1, 1, 1)
    return tuple(
        np.asarray(ringattn.from_layout(x, layout, n, axis=a))
        for x, a in zip(got, axes, strict=True)
    )


def assert_matches(helpers, got, want, what, dtype=np.float32):
    try:
        helpers.assert_all_close(got, want, dtype)
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from None


# ---------------------------------------------------------------------------------------------
# The full matrix: every layout x mask kind x {GQA, MQA}, one mesh per strategy.

FULL = [
    ("allgather", (4,), 4),
    ("ulysses", (4,), 4),
    ("hybrid", (2, 4), 4),  # 2-way Ulysses, 4-way ring
]


@pytest.mark.parametrize("kh", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("strategy, shape, h", FULL, ids=[f"{s}-{m}" for s, m, _ in FULL])
def test_full_matrix(helpers, strategy, shape, h, kh):
    for kind in MASKS:
        static, masks, data, want = case(helpers, kind, h, kh)
        for layout in LAYOUTS:
            got = run_cp(helpers, strategy, shape, layout, static, masks, data)
            assert_matches(helpers, got, want, f"{kind}, {layout}")


# ---------------------------------------------------------------------------------------------
# Other sizes: a reduced set, positions derived from the layout.

REDUCED = [  # strategy, mesh, heads, KV heads, mask kind, layout, extra arguments
    ("allgather", (8,), 8, 8, "packed", "zigzag", dict(head_chunks=4)),
    ("allgather", (8,), 8, 2, "window", "contiguous", dict(head_chunks=2)),
    ("ulysses", (2,), 4, 1, "packed", "zigzag", {}),  # K < n: KV repeated n / K times
    ("ulysses", (8,), 8, 8, "causal", "striped", {}),  # K == n: no repeat
    ("ulysses", (8,), 8, 2, "packed", "zigzag", {}),
    ("ulysses", (8,), 8, 1, "window", "contiguous", {}),
    ("hybrid", (4, 2), 4, 2, "packed", "zigzag", {}),  # 4-way Ulysses, 2-way ring
    ("hybrid", (4, 2), 4, 1, "window", "striped", {}),
]


@pytest.mark.parametrize(
    "strategy, shape, h, kh, kind, layout, kw",
    REDUCED,
    ids=[f"{c[0]}-{c[1]}-h{c[2]}k{c[3]}-{c[4]}-{c[5]}" for c in REDUCED],
)
def test_reduced(helpers, strategy, shape, h, kh, kind, layout, kw):
    static, masks, data, want = case(helpers, kind, h, kh, seed=1)
    got = run_cp(helpers, strategy, shape, layout, static, masks, data, explicit=False, **kw)
    assert_matches(helpers, got, want, kind)


def test_allgather_bf16(helpers):
    """bf16 inputs travel and are gathered as bits; dK/dV are reduce-scattered in f32."""
    static, masks, data, want = case(helpers, "window", 4, 1, seed=2, dtype=jnp.bfloat16)
    got = run_cp(helpers, "allgather", (2,), "striped", static, masks, data, explicit=False)
    assert got[0].dtype == got[3].dtype == jnp.bfloat16 and got[1].dtype == np.float32
    assert_matches(helpers, got, want, "bf16", jnp.bfloat16)


def test_auto_equals_the_strategy_it_picks(helpers):
    from ringattn.parallel import costs

    shape, layout = (4,), "zigzag"
    static, masks, data, _ = case(helpers, "packed", 4, 2)
    q, k = data[:2]
    picked = costs.choose_strategy(
        batch=B,
        q_len=T,
        kv_len=T,
        num_heads=4,
        num_kv_heads=2,
        head_dim=D,
        dtype=q.dtype,
        mesh_axis_sizes=dict(make_mesh(shape).shape),
        axis_name="context",
        causal=True,
        local_window_size=None,
        layout=layout,
    )
    assert picked in ("ring", "allgather", "ulysses")
    auto = run_cp(helpers, "auto", shape, layout, static, masks, data, explicit=False)
    want = run_cp(helpers, picked, shape, layout, static, masks, data, explicit=False)
    for a, w in zip(auto, want, strict=True):
        np.testing.assert_array_equal(a, w)


# ---------------------------------------------------------------------------------------------
# Communication and memory.


def test_allgather_backward_reduce_scatters_one_chunk_at_a_time(helpers):
    """The forward all-gathers K/V and never reduce-scatters; the backward reduce-scatters dK/dV.
    With head_chunks=2 no device ever holds all KV heads of the whole sequence."""
    n, s, h, kh = 4, 64, 4, 2
    mesh = make_mesh((n,))
    qx = jax.ShapeDtypeStruct((1, s, h, D), np.float32)
    kx = jax.ShapeDtypeStruct((1, s, kh, D), np.float32)

    def attend(q, k, v):
        return ringattn.context_parallel_attention(
            q, k, v, mesh=mesh, strategy="allgather", causal=True, head_chunks=2
        )

    fwd = jax.jit(attend).lower(qx, kx, kx).compile().as_text()
    loss = lambda q, k, v: attend(q, k, v).sum()  # noqa: E731
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(qx, kx, kx).compile().as_text()
    assert "all-gather" in fwd and "reduce-scatter" not in fwd
    assert "reduce-scatter" in bwd and "all-reduce" not in bwd
    shapes = helpers.hlo_shapes(fwd) | helpers.hlo_shapes(bwd)
    assert (1, s, kh // 2, D) in shapes  # one gathered chunk
    assert (1, s, kh, D) not in shapes  # never the whole K/V


def test_repeat_kv_hands_each_device_its_kv_heads():
    """After `repeat_kv` and a split of the heads into n device chunks, the query heads of device r
    (grouped as in the kernel) read the KV heads they use: h // (H / K)."""
    for h, kh, n in [(8, 1, 8), (8, 2, 8), (4, 2, 4), (8, 8, 4), (12, 6, 4), (12, 4, 6)]:
        heads = np.asarray(ulysses.repeat_kv(np.arange(kh)[None, None, :, None], n))[0, 0, :, 0]
        assert len(heads) % n == 0
        per_q, per_kv = h // n, len(heads) // n
        for r in range(n):
            local = heads[r * per_kv : (r + 1) * per_kv]
            for j in range(per_q):  # local query head j uses local KV head j // (per_q / per_kv)
                assert local[j // (per_q // per_kv)] == (r * per_q + j) // (h // kh), (h, kh, n)


# ---------------------------------------------------------------------------------------------
# Bad input: raised before any heavy work, naming the argument, what was expected and got.


def _qkv(t=16, h=4, kh=2):
    return (np.zeros((1, t, h, 4), np.float32), *np.zeros((2, 1, t, kh, 4), np.float32))


@pytest.mark.parametrize(
    "shape, kwargs, qkv, pattern",
    [
        ((8,), dict(strategy="usp"), {}, r"`strategy` must be one of \('ring', 'allgather', "),
        ((8,), dict(strategy="ulysses", axis_name="seq"), {}, "`axis_name` 'seq' is not an axis"),
        ((2, 4), dict(axis_name=("ulysses", "x")), {}, "`axis_name` 'x' is not an axis"),
        ((2, 4), dict(strategy="allgather"), {}, "single mesh axis for strategy 'allgather'"),
        ((2, 4), dict(strategy="hybrid", axis_name="ring"), {}, "must be a pair"),
        ((2, 4), dict(strategy="hybrid", axis_name=("ring", "ring")), {}, "must be a pair"),
        ((8,), dict(strategy="allgather"), dict(t=12), "query length to be a multiple of 8"),
        ((2, 4), dict(layout="zigzag"), dict(t=24), "multiple of 16, got 24"),
        ((8,), dict(strategy="ulysses"), {}, r"heads of `q` \(4\) over the 8 devices"),
        ((4, 2), dict(), dict(h=6, kh=2), r"heads of `q` \(6\) over the 4 devices.*'ring'"),
        ((8,), dict(strategy="allgather", head_chunks=3), {}, "`head_chunks` must divide"),
        ((8,), dict(strategy="allgather", head_chunks=0), {}, "`head_chunks` must be a positive"),
        ((8,), dict(strategy="ring", head_chunks=2), {}, "'allgather' only"),
    ],
)
def test_bad_input(shape, kwargs, qkv, pattern):
    kwargs = dict(mesh=make_mesh(shape), axis_name=axis_for(shape), strategy="hybrid") | kwargs
    with pytest.raises(ValueError, match=pattern):
        ringattn.context_parallel_attention(*_qkv(**qkv), **kwargs)


@pytest.mark.parametrize(
    "fn, axis_name, pattern",
    [
        (ulysses.ulysses_attention, "context", r"heads of `q` \(4\) over the 8 devices"),
        (hybrid.hybrid_attention, "context", "must be a pair"),
    ],
)
def test_local_bad_input(helpers, fn, axis_name, pattern):
    f = jax.shard_map(
        lambda q, k, v: fn(q, k, v, axis_name=axis_name),
        mesh=helpers.ring_mesh(8, "context"),
        in_specs=P(None, "context"),
        out_specs=P(None, "context"),
    )
    with pytest.raises(ValueError, match=pattern):
        jax.eval_shape(f, *_qkv())


@pytest.mark.parametrize("strategy", ["ring", "ulysses", "allgather"])
def test_batch_and_head_axes(helpers, strategy):
    """A (data, tensor, context) mesh as a model uses it: batch over `data`, heads over
    `tensor`, sequence over `context`; forward and gradients equal the float64 reference."""
    static, masks, data, want = case(helpers, "packed", 4, 2)
    mesh = jax.make_mesh((2, 2, 2), ("data", "tensor", "context"), devices=jax.devices()[:8])
    got = helpers.run_attention(
        ringattn.context_parallel_attention,
        *data,
        masks,
        mesh=mesh,
        strategy=strategy,
        batch_axis="data",
        head_axis="tensor",
        **static,
        **BLOCKS,
    )
    assert_matches(helpers, got, want, strategy)


def test_batch_and_head_axes_bad_input(helpers):
    q = jnp.zeros((2, 32, 4, 8))
    mesh = jax.make_mesh((2, 2, 2), ("data", "tensor", "context"), devices=jax.devices()[:8])
    with pytest.raises(ValueError, match=r"`head_axis` \('tensor', 'data'\) has size 4.*KV heads"):
        ringattn.context_parallel_attention(
            q, q[:, :, :2], q[:, :, :2], mesh=mesh, head_axis=("tensor", "data")
        )
    with pytest.raises(ValueError, match="`batch_axis` must name mesh axes other than"):
        ringattn.context_parallel_attention(q, q, q, mesh=mesh, batch_axis="context")
