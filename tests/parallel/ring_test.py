"""Ring attention against the float64 reference: ring_attention inside jax.shard_map, and
context_parallel_attention on global arrays, over ring sizes 1-8, every layout and mask kind.

Each compiled ring program takes positions and segment ids as arguments, so one program per
(mask kind, ring size) serves every layout: the data are permuted into the layout's order on the
host, with the matching positions, and the results permuted back.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ringattn
from ringattn import LAYOUTS
from ringattn.attention.inputs import normalize_window
from ringattn.attention.masks import MaskSpec
from ringattn.parallel import layouts, ring

B, T, H, D = 2, 48, 4, 8
# Local blocks that do not divide the local length (T / n), so every shard is padded.
BLOCKS = {
    1: dict(block_q=32, block_k=20),
    2: dict(block_q=16, block_k=10),
    4: dict(block_q=8, block_k=5),
    8: dict(block_q=4, block_k=5),
}


def _segments():
    # Documents of 13, 20 and 15 tokens (row 0), 5, 30, 13 (row 1): boundaries inside shards
    # and blocks for every ring size, and documents spanning several shards.
    return np.asarray([[0] * 13 + [1] * 20 + [2] * 15, [4] * 5 + [5] * 30 + [6] * 13], np.int32)


def _masks(name):
    """Natural-order mask arrays of a case, and the query length (data only)."""
    seg = _segments()
    if name == "segments":
        return dict(segment_ids=seg), T
    if name == "segments_kv":
        return dict(segment_ids=seg, kv_segment_ids=seg.copy()), T
    if name == "cross":  # 32 queries: the last tokens of the 48 keys
        return dict(
            segment_ids=seg[:, 16:],
            kv_segment_ids=seg,
            q_positions=np.arange(16, T, dtype=np.int32),
        ), 32
    return {}, T


# name: (static arguments, masks name, KV heads)
CASES = {
    "dense_gqa": (dict(), None, 2),
    "causal_gqa": (dict(causal=True), None, 2),
    "window_int": (dict(local_window_size=5), None, 2),
    "window_pair_mqa": (dict(local_window_size=(7, 2)), None, 1),
    "causal_window_mha": (dict(causal=True, local_window_size=(9, 3)), "segments", 4),
    "segments_causal_gqa": (dict(causal=True), "segments", 2),
    "segments_kv_mqa": (dict(), "segments_kv", 1),
    "cross_lengths_causal": (dict(causal=True, scale=0.3), "cross", 2),
}
# The full matrix at n = 8, a reduced one at n = 4 and 2, one case at n = 1.
RING_CASES = [(name, 8) for name in CASES] + [
    ("segments_causal_gqa", 4),
    ("window_pair_mqa", 4),
    ("cross_lengths_causal", 4),
    ("causal_gqa", 2),
    ("causal_window_mha", 2),
    ("segments_causal_gqa", 1),
]


def natural_case(helpers, name, dtype=np.float32, seed=0):
    static, masks_name, kh = CASES[name]
    rng = np.random.default_rng(seed)
    masks, t = _masks(masks_name)
    data = helpers.random_inputs(rng, B, t, T, H, kh, D, dtype)
    want = helpers.reference_f64(*data, masks, **static)
    return static, masks, data, want


def permute(x, layout, n, axis=1):
    return np.take(np.asarray(x), layouts.layout_positions(layout, x.shape[axis], n), axis=axis)


def unpermute(x, layout, n, axis=1):
    inv = np.argsort(layouts.layout_positions(layout, x.shape[axis], n))
    return np.take(np.asarray(x), inv, axis=axis)


def run_ring(helpers, n, layout, static, masks, data, positions=None, blocks=None):
    """ring_attention inside shard_map on data in `layout` order; results in natural order.

    Positions are always passed, as [B, L] in layout order, so the program is shared by all
    layouts; `positions` overrides the natural-order (q, kv) positions.
    """
    q, k, v, do, dlse = data
    t, s = q.shape[1], k.shape[1]
    masks = dict(masks)
    q_pos, kv_pos = positions or (masks.pop("q_positions", np.arange(t)), np.arange(s))
    masks["q_positions"], masks["kv_positions"] = q_pos, kv_pos
    b = q.shape[0]
    masks = {
        name: permute(np.broadcast_to(x, (b, x.shape[-1])).astype(np.int32), layout, n)
        for name, x in masks.items()
    }
    blocks = BLOCKS[n] if blocks is None else blocks
    fn = helpers.ring_grads_fn(helpers.ring_mesh(n), "ring", **static, **blocks)
    names = ("segment_ids", "kv_segment_ids", "q_positions", "kv_positions")
    out, lse, dq, dk, dv = fn(
        *(permute(x, layout, n) for x in (q, k, v, do)),
        permute(dlse, layout, n, axis=2),
        {name: masks.get(name) for name in names},
    )
    return (
        unpermute(out, layout, n),
        unpermute(lse, layout, n, axis=2),
        unpermute(dq, layout, n),
        unpermute(dk, layout, n),
        unpermute(dv, layout, n),
    )


@pytest.mark.parametrize("name, n", RING_CASES, ids=[f"{c}-n{n}" for c, n in RING_CASES])
def test_ring_matches_reference(helpers, name, n):
    static, masks, data, want = natural_case(helpers, name)
    for layout in LAYOUTS:
        got = run_ring(helpers, n, layout, static, masks, data)
        try:
            helpers.assert_all_close(got, want, np.float32)
        except AssertionError as e:
            raise AssertionError(f"layout {layout}: {e}") from None


def test_ring_bf16(helpers):
    static, masks, data, want = natural_case(helpers, "segments_causal_gqa", jnp.bfloat16)
    for layout in LAYOUTS:
        got = run_ring(helpers, 4, layout, static, masks, data)
        assert got[0].dtype == got[2].dtype == jnp.bfloat16 and got[1].dtype == np.float32
        helpers.assert_all_close(got, want, jnp.bfloat16)


def test_ring_tiny_shards_default_blocks(helpers):
    """Two tokens per device (zigzag: two chunks of one), blocks clipped to the shard."""
    n, t = 8, 16
    rng = np.random.default_rng(2)
    data = helpers.random_inputs(rng, 1, t, t, H, 2, D)
    masks = dict(segment_ids=np.asarray([[0] * 5 + [1] * 11], np.int32))
    want = helpers.reference_f64(*data, masks, causal=True)
    for layout in LAYOUTS:
        got = run_ring(helpers, n, layout, dict(causal=True), masks, data, blocks={})
        helpers.assert_all_close(got, want, np.float32)


def test_ring_arbitrary_positions(helpers):
    """Positions that are no layout at all (random permutations, different for q and kv): the
    ring and its tile rule read positions only, so the result is still exact."""
    static, masks, data, _ = natural_case(helpers, "causal_window_mha")
    rng = np.random.default_rng(1)
    q_pos, kv_pos = rng.permutation(T).astype(np.int32), rng.permutation(T).astype(np.int32)
    got = run_ring(helpers, 8, "contiguous", static, masks, data, positions=(q_pos, kv_pos))
    want = helpers.reference_f64(
        *data, dict(masks, q_positions=q_pos, kv_positions=kv_pos), **static
    )
    helpers.assert_all_close(got, want, np.float32)


@pytest.mark.parametrize("n", [8, 4])
def test_ring_fully_masked_rows(helpers, n):
    """Query documents absent from every kv shard, and kv documents no query sees: out 0,
    lse -inf, zero gradients, no NaN, on every layout."""
    static, _, data, _ = natural_case(helpers, "segments_kv_mqa")
    seg = _segments()
    kv_seg = np.where(seg == 1, 9, seg)  # document 1 (13 tokens, spans shards) loses its keys
    masks = dict(segment_ids=seg, kv_segment_ids=kv_seg)
    want = helpers.reference_f64(*data, masks, **static)
    lost = seg == 1
    for layout in LAYOUTS:
        got = run_ring(helpers, n, layout, static, masks, data)
        helpers.assert_all_close(got, want, np.float32)
        out, lse, dq, dk, dv = got
        np.testing.assert_array_equal(out[lost], 0.0)
        np.testing.assert_array_equal(lse.transpose(0, 2, 1)[lost], -np.inf)
        for g in (dq, dk, dv):
            np.testing.assert_array_equal(g[lost], 0.0)
    # Everything masked: kv ids disjoint from q ids.
    masks = dict(segment_ids=seg, kv_segment_ids=seg + 100)
    out, lse, dq, dk, dv = run_ring(helpers, n, "zigzag", static, masks, data)
    for x in (out, dq, dk, dv):
        np.testing.assert_array_equal(x, 0.0)
    np.testing.assert_array_equal(lse, -np.inf)


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_ring_derives_positions_from_layout(helpers, layout):
    """Without positions, ring_attention derives each shard's positions from `layout`."""
    n = 4
    static, masks, data, want = natural_case(helpers, "causal_gqa")
    q, k, v, do, dlse = data
    fn = helpers.ring_grads_fn(helpers.ring_mesh(n), "ring", layout=layout, **static, **BLOCKS[n])
    none = dict.fromkeys(("segment_ids", "kv_segment_ids", "q_positions", "kv_positions"))
    got = fn(
        *(permute(x, layout, n) for x in (q, k, v, do)), permute(dlse, layout, n, axis=2), none
    )
    axes = (1, 2, 1, 1, 1)
    got = tuple(unpermute(x, layout, n, axis=a) for x, a in zip(got, axes, strict=True))
    helpers.assert_all_close(got, want, np.float32)


# ---------------------------------------------------------------------------------------------
# context_parallel_attention: global arrays on a mesh.


@pytest.mark.parametrize("layout", LAYOUTS)
def test_context_parallel_layouts(helpers, layout):
    """jax.make_mesh (Explicit axes), positions derived from the layout, packed causal batch."""
    n = 8
    mesh = jax.make_mesh((n,), ("context",), devices=jax.devices("cpu")[:n])
    static, masks, data, want = natural_case(helpers, "segments_causal_gqa")
    q, k, v, do = (ringattn.to_layout(x, layout, n) for x in data[:4])
    dlse = ringattn.to_layout(data[4], layout, n, axis=2)
    seg = ringattn.to_layout(masks["segment_ids"], layout, n)
    got = helpers.run_attention(
        ringattn.context_parallel_attention,
        q,
        k,
        v,
        do,
        dlse,
        dict(segment_ids=seg),
        mesh=mesh,
        layout=layout,
        input_layout=layout,
        **static,
        **BLOCKS[n],
    )
    axes = (1, 2, 1, 1, 1)
    got = tuple(
        np.asarray(ringattn.from_layout(x, layout, n, axis=a))
        for x, a in zip(got, axes, strict=True)
    )
    helpers.assert_all_close(got, want, np.float32)


def test_context_parallel_2d_mesh_without_lse(helpers):
    """An Auto 2-D mesh whose other axis holds replicas; return_lse=False under jax.grad; T != S
    with explicit 1-D query positions in layout order (kv positions derived from the layout)."""
    n, layout = 4, "zigzag"
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.sharding.Mesh(
        np.asarray(jax.devices("cpu")[: 2 * n]).reshape(2, n), ("data", "seq"), axis_types=auto
    )
    static, masks, data, want = natural_case(helpers, "cross_lengths_causal")
    q, k, v, do = (ringattn.to_layout(x, layout, n) for x in data[:4])
    seg = ringattn.to_layout(masks["segment_ids"], layout, n)
    kv_seg = ringattn.to_layout(masks["kv_segment_ids"], layout, n)
    q_pos = ringattn.to_layout(masks["q_positions"], layout, n, axis=0)

    @jax.jit
    def run(q, k, v):
        def loss(q, k, v):
            out = ringattn.context_parallel_attention(
                q,
                k,
                v,
                mesh=mesh,
                axis_name="seq",
                layout=layout,
                input_layout=layout,
                segment_ids=seg,
                kv_segment_ids=kv_seg,
                q_positions=q_pos,
                **static,
                **BLOCKS[n],
            )
            return jnp.sum(out * do), out

        return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (dq, dk, dv), out = run(q, k, v)
    got = tuple(
        np.asarray(ringattn.from_layout(np.asarray(x), layout, n)) for x in (out, dq, dk, dv)
    )
    # The reference's lse cotangent was random: redo it with none.
    want = helpers.reference_f64(*data[:4], np.zeros_like(data[4]), masks, **static)
    helpers.assert_all_close(got, want[:1] + want[2:], np.float32, ("out", "dq", "dk", "dv"))


def test_context_parallel_no_t_by_s_buffer(helpers):
    """Per device, the compiled ring gradient holds no local T x S score matrix (let alone a
    global one), only tiles of a block's size (or strips of one block by a local length)."""
    n, t, h, d, block = 4, 8192, 2, 16, 128  # long, so a score matrix dwarfs O(T) buffers
    mesh = helpers.ring_mesh(n, "context")
    x = jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)

    def loss(q, k, v):
        out = ringattn.context_parallel_attention(
            q, k, v, mesh=mesh, causal=True, layout="zigzag", input_layout="zigzag",
            block_q=block, block_k=block,
        )  # fmt: skip
        return jnp.sum(out)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    text = compiled.as_text()
    local = t // n
    local_scores = h * local * local  # elements of one device's T_local x S_local matrix
    assert compiled.memory_analysis().temp_size_in_bytes < local_scores * 4 / 4
    assert not helpers.square_buffers(text, local) and not helpers.square_buffers(text, t)
    assert helpers.largest_buffer(text) < local_scores / 8
    assert (1, local, h, d) in helpers.hlo_shapes(text)  # the text is the per-device program


# ---------------------------------------------------------------------------------------------
# Bad input.


def _qkv(t=16, s=16, h=4, kh=2, d=4):
    return (
        np.zeros((1, t, h, d), np.float32),
        np.zeros((1, s, kh, d), np.float32),
        np.zeros((1, s, kh, d), np.float32),
    )


@pytest.mark.parametrize(
    "kwargs, qkv, exc, pattern",
    [
        (dict(strategy="usp"), {}, ValueError, "`strategy`"),
        (dict(layout="diagonal"), {}, ValueError, "`layout`"),
        (dict(axis_name="sequence"), {}, ValueError, "`axis_name`"),
        (dict(mesh="mesh"), {}, TypeError, "`mesh`"),
        (dict(), dict(t=12), ValueError, "query length to be a multiple of 8, got 12"),
        (dict(), dict(s=20), ValueError, "key length to be a multiple of 8, got 20"),
        (dict(layout="zigzag"), dict(t=24, s=24), ValueError, "multiple of 16, got 24"),
        (dict(layout="zigzag"), {}, ValueError, "input_layout='natural' .* input_layout='zigzag'"),
        (dict(layout="striped", input_layout="zigzag"), {}, ValueError, "`input_layout` must be"),
        (
            dict(layout="striped", input_layout="natural"),
            dict(t=24, s=24),
            ValueError,
            "multiple of 64",
        ),
        (dict(), dict(kh=3), ValueError, "key/value heads"),
        (dict(segment_ids=np.zeros((1, 8), np.int32)), {}, ValueError, "`segment_ids`"),
        (dict(q_positions=np.zeros(16)), {}, TypeError, "`q_positions`"),
        (dict(local_window_size=-1), {}, ValueError, "`local_window_size`"),
        (dict(block_k=0), {}, ValueError, "`block_k`"),
    ],
)
def test_context_parallel_bad_input(kwargs, qkv, exc, pattern):
    mesh = jax.make_mesh((8,), ("context",), devices=jax.devices("cpu"))
    kwargs = {"mesh": mesh, **kwargs}
    with pytest.raises(exc, match=pattern):
        ringattn.context_parallel_attention(*_qkv(**qkv), **kwargs)


@pytest.mark.parametrize(
    "kwargs, local_len, exc, pattern",
    [
        (dict(layout="diagonal"), 4, ValueError, "`layout`"),
        (dict(layout="zigzag"), 3, ValueError, "global query length to be a multiple of 8"),
        (dict(causal=1), 4, TypeError, "`causal`"),
        (dict(block_q=-1), 4, ValueError, "`block_q`"),
        (dict(segment_ids=np.zeros((1, 5), np.int32)), 4, ValueError, "`segment_ids`"),
    ],
)
def test_ring_bad_input(helpers, kwargs, local_len, exc, pattern):
    n = 4
    f = jax.shard_map(
        lambda q, k, v: ringattn.ring_attention(q, k, v, axis_name="ring", **kwargs),
        mesh=helpers.ring_mesh(n),
        in_specs=P(None, "ring"),
        out_specs=P(None, "ring"),
    )
    with pytest.raises(exc, match=pattern):
        jax.eval_shape(f, *_qkv(t=local_len * n, s=local_len * n))


def test_ring_without_lse_shapes(helpers):
    f = jax.shard_map(
        lambda q, k, v: ringattn.ring_attention(q, k, v, axis_name="ring", causal=True),
        mesh=helpers.ring_mesh(4),
        in_specs=P(None, "ring"),
        out_specs=P(None, "ring"),
    )
    q, k, v = _qkv()
    out = jax.eval_shape(f, q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype


# ---------------------------------------------------------------------------------------------
# Window-aware ring: only the steps the mask needs run.


@pytest.mark.parametrize(
    "static, plan",
    [
        (dict(causal=True, local_window_size=(4, 0)), ring.RingPlan(0, 2)),  # 2 of 8 steps
        (dict(local_window_size=(3, 9)), ring.RingPlan(6, 4)),  # one shard back, two ahead
        (dict(causal=True), ring.RingPlan(0, 8)),
    ],
)
def test_window_ring_runs_only_needed_steps(helpers, static, plan):
    """Contiguous layout, 8 tokens per shard: the plan is as short as the window allows, and the
    shortened ring (its first shifted fetch and its dK/dV trip home) is still exact."""
    n, t = 8, 64
    spec = MaskSpec(
        static.get("causal", False),
        normalize_window("test", static.get("local_window_size")),
    )
    assert ring.plan_ring(spec, "contiguous", n, t // n, t // n) == plan
    data = helpers.random_inputs(np.random.default_rng(1), 1, t, t, 2, 1, 8)
    want = helpers.reference_f64(*data, **static)
    mesh = jax.make_mesh((n,), ("context",), devices=jax.devices("cpu")[:n])
    got = helpers.run_attention(
        ringattn.context_parallel_attention, *data, mesh=mesh, block_q=4, block_k=4, **static
    )
    helpers.assert_all_close(got, want, np.float32)
