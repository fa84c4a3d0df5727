"""Our Pallas GPU kernel in interpret mode against the float64 reference: out, lse, dq, dk, dv
on every mask kind, its tile tables (the blocks it skips), and inside the ring over 4 devices.

Interpret mode is slow on CPU, so shapes are tiny (blocks of 16) and each case compiles one
program (grads_fn caches it per static configuration).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ringattn
from ringattn.attention.kernels import base, pallas_common
from ringattn.attention.kernels.pallas_gpu import PallasGpu
from ringattn.attention.masks import FULL, PARTIAL, SKIP, MaskSpec
from ringattn.parallel import layouts

B, T, H, D = 2, 64, 4, 16
KERNEL = PallasGpu(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16, interpret=True)


def _segments(length):
    """Three packed documents per row, boundaries inside blocks."""
    cut = [(13, 40), (5, 35)]
    return np.stack([np.searchsorted(c, np.arange(length), side="right") for c in cut]).astype(
        np.int32
    )


def _case(name, rng):
    """(static args, mask arrays, kv heads, query length) of a named case."""
    seg = _segments(T)
    perm = np.stack([rng.permutation(T) for _ in range(B)]).astype(np.int32)
    return {
        "dense_gqa": (dict(), {}, 2, T),
        "causal_mha": (dict(causal=True), {}, 4, T),
        "window_pair_mqa": (dict(local_window_size=(9, 3)), {}, 1, T),
        "segments_causal_gqa": (dict(causal=True), dict(segment_ids=seg), 2, T),
        # Random positions: the visible key blocks of a q block have holes.
        "positions_causal_window": (
            dict(causal=True, local_window_size=(20, 5), scale=0.3),
            dict(q_positions=perm, kv_positions=np.roll(perm, 1, axis=0)),
            2,
            T,
        ),
        # 40 queries (the last of the 64 keys, padded to whole blocks) and 56 keys: padding.
        "cross_padded": (
            dict(causal=True),
            dict(
                segment_ids=seg[:, 16:56],
                kv_segment_ids=seg[:, :56],
                q_positions=np.arange(16, 56, dtype=np.int32),
            ),
            2,
            40,
        ),
    }[name]


def _run(helpers, name, dtype=np.float32, kernel=KERNEL, seed=0):
    rng = np.random.default_rng(seed)
    static, masks, kh, t = _case(name, rng)
    s = masks["kv_segment_ids"].shape[1] if "kv_segment_ids" in masks else T
    data = helpers.random_inputs(rng, B, t, s, H, kh, D, dtype)
    got = helpers.run_attention(ringattn.blockwise_attention, *data, masks, kernel=kernel, **static)
    return got, helpers.reference_f64(*data, masks, **static)


@pytest.mark.parametrize(
    "name",
    [
        "dense_gqa",
        "causal_mha",
        "window_pair_mqa",
        "segments_causal_gqa",
        "positions_causal_window",
        "cross_padded",
    ],
)
def test_matches_reference_f32(helpers, name):
    got, want = _run(helpers, name)
    helpers.assert_all_close(got, want, np.float32)


def test_matches_reference_bf16(helpers):
    got, want = _run(helpers, "segments_causal_gqa", jnp.bfloat16)
    assert got[0].dtype == got[2].dtype == got[3].dtype == jnp.bfloat16
    assert got[1].dtype == np.float32
    helpers.assert_all_close(got, want, jnp.bfloat16)


def test_fully_masked_rows(helpers):
    """Queries whose document has no keys: out 0, lse -inf, zero gradients, never NaN."""
    rng = np.random.default_rng(3)
    seg = _segments(T)
    masks = dict(segment_ids=seg, kv_segment_ids=np.where(seg == 1, 7, seg))
    data = helpers.random_inputs(rng, B, T, T, H, 2, D)
    got = helpers.run_attention(
        ringattn.blockwise_attention, *data, masks, kernel=KERNEL, causal=True
    )
    helpers.assert_all_close(got, helpers.reference_f64(*data, masks, causal=True), np.float32)
    lost = seg == 1
    np.testing.assert_array_equal(got[0][lost], 0.0)
    np.testing.assert_array_equal(got[1].transpose(0, 2, 1)[lost], -np.inf)
    np.testing.assert_array_equal(got[2][lost], 0.0)


def _tables(spec, q_pos, kv_pos, block, kv_len=None):
    """(state, q_bounds, k_bounds) of the kernel's tile tables (one compiled program)."""
    kv_len = kv_len or kv_pos.shape[1]
    cfg = base.Config(spec, 1.0, None, block, block, kv_len, jnp.float32, PallasGpu())

    @jax.jit
    def run(q_pos, kv_pos):
        qs = base.make_side(q_pos, None, block)
        ks = base.make_side(kv_pos, None, block)
        tab = pallas_common.Tables(cfg, qs, ks, block, block, 1)
        return tab.state, tab.q_bounds, tab.k_bounds

    return run(q_pos, kv_pos)


def test_tables_skip_blocks():
    """Causal, 4 x 4 blocks: q block i visits key blocks [0, i] (the diagonal one masked, the
    others not), key block j is visited by q blocks [j, 4); a window of one block back visits
    two blocks; a padded last key block is masked even where it would be FULL."""
    pos = np.arange(64, dtype=np.int32)[None]
    state, q_bounds, k_bounds = _tables(MaskSpec(causal=True), pos, pos, 16)
    want = np.where(
        np.arange(4)[:, None] > np.arange(4), FULL, np.where(np.eye(4, dtype=bool), PARTIAL, SKIP)
    )
    np.testing.assert_array_equal(state[0], want)
    np.testing.assert_array_equal(q_bounds[0], [[0, 1], [0, 2], [0, 3], [0, 4]])
    np.testing.assert_array_equal(k_bounds[0], [[0, 4], [1, 4], [2, 4], [3, 4]])
    _, q_bounds, _ = _tables(MaskSpec(causal=True, window=(16, 0)), pos, pos, 16)
    np.testing.assert_array_equal(q_bounds[0], [[0, 1], [0, 2], [1, 3], [2, 4]])
    state, _, _ = _tables(MaskSpec(), pos[:, :48], pos, 16, kv_len=56)
    np.testing.assert_array_equal(state[0], [[FULL, FULL, FULL, PARTIAL]] * 3)


def test_kernel_validates_blocks():
    with pytest.raises(ValueError, match="`block_k` must be a power of 2"):
        PallasGpu(block_k=48)
    fitted = PallasGpu().fit(24, 1000)
    assert (fitted.block_q, fitted.block_k, fitted.block_q_bwd) == (32, 64, 32)


# ---------------------------------------------------------------------------------------------
# In the ring: kernel="pallas_gpu" (interpreted on CPU) over 4 devices, two layouts.


@functools.cache
def _ring_fn(n, **static):
    """jit((q, k, v, do, dlse, masks) -> (out, lse, dq, dk, dv)) of ring_attention inside a
    shard_map with check_vma=False, which the Pallas interpreter needs."""
    seq = P(None, "ring")

    def local(q, k, v, masks):
        kw = dict(static, **masks, return_lse=True)
        return ringattn.ring_attention(q, k, v, axis_name="ring", **kw)

    sharded = jax.shard_map(
        local,
        mesh=jax.sharding.Mesh(
            np.asarray(jax.devices("cpu")[:n]), ("ring",), axis_types=(jax.sharding.AxisType.Auto,)
        ),
        in_specs=(seq,) * 4,
        out_specs=(seq, P(None, None, "ring")),
        check_vma=False,
    )

    @jax.jit
    def run(q, k, v, do, dlse, masks):
        (out, lse), vjp = jax.vjp(lambda q, k, v: sharded(q, k, v, masks), q, k, v)
        return (out, lse, *vjp((do, dlse)))

    return run


@pytest.mark.filterwarnings("ignore:kernel='pallas_gpu' on platform")
def test_ring_pallas_gpu_4_devices(helpers):
    """kernel='pallas_gpu' (a string: tiles fitted to the 16-token shards) on a contiguous and
    a zigzag ring: positions in layout order, one compiled program for both."""
    n, name = 4, "segments_causal_gqa"
    rng = np.random.default_rng(1)
    static, masks, kh, t = _case(name, rng)
    data = helpers.random_inputs(rng, B, t, T, H, kh, D)
    want = helpers.reference_f64(*data, masks, **static)
    fn = _ring_fn(n, kernel="pallas_gpu", **static)
    for layout in ("contiguous", "zigzag"):
        perm = layouts.layout_positions(layout, T, n)
        q, k, v, do = (np.take(np.asarray(x), perm, axis=1) for x in data[:4])
        pos = np.broadcast_to(perm.astype(np.int32), (B, T))
        seg = masks["segment_ids"][:, perm]
        ring_masks = dict(segment_ids=seg, q_positions=pos, kv_positions=pos)
        got = fn(q, k, v, do, np.take(data[4], perm, axis=2), ring_masks)
        inv = np.argsort(perm)
        axes = (1, 2, 1, 1, 1)
        got = [np.take(np.asarray(x), inv, axis=a) for x, a in zip(got, axes, strict=True)]
        helpers.assert_all_close(got, want, np.float32)


def test_context_parallel_allgather(helpers):
    """context_parallel_attention hands the kernel to its strategy: all-gather over 2 devices
    (Ulysses and hybrid pass it on to blockwise_attention and ring_attention the same way)."""
    rng = np.random.default_rng(2)
    static, masks, kh, t = _case("causal_mha", rng)
    data = helpers.random_inputs(rng, B, t, T, H, kh, D)
    want = helpers.reference_f64(*data, masks, **static)
    mesh = jax.make_mesh((2,), ("context",), devices=jax.devices("cpu")[:2])
    got = helpers.run_attention(
        ringattn.context_parallel_attention,
        *data,
        masks,
        mesh=mesh,
        strategy="allgather",
        kernel=KERNEL,
        **static,
    )
    helpers.assert_all_close(got, want, np.float32)


# ---------------------------------------------------------------------------------------------
# Variants: soft cap (inside the kernels), a v head dim of its own, sinks (added after the
# kernel), on one device and over a ring (the kernels' continued passes).


def _variant_grads(fn, q, k, v, sinks, do, **kw):
    """(out, dq, dk, dv, dsinks) of fn(q, k, v, sinks=...) with cotangent do."""
    out, vjp = jax.vjp(lambda q, k, v, s: fn(q, k, v, sinks=s, **kw), q, k, v, sinks)
    return (out, *vjp(do))


@pytest.mark.filterwarnings("ignore:kernel='pallas_gpu' on platform")
@pytest.mark.parametrize("ring", [False, True], ids=["blockwise", "ring4"])
def test_variants(helpers, ring):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((B, T, H, D))
    k = rng.standard_normal((B, T, 2, D))
    v = rng.standard_normal((B, T, 2, 24))  # Dv = 24: padded to 32 inside the kernel
    do = rng.standard_normal((B, T, H, 24))
    sinks = rng.standard_normal(H)
    kw = dict(causal=True, logits_soft_cap=2.5)
    f64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v, sinks, do)]
    want = _variant_grads(ringattn.reference_attention, *f64, **kw)
    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v, sinks, do)]
    if ring:
        mesh = jax.make_mesh((4,), ("context",), devices=jax.devices("cpu")[:4])
        fn = functools.partial(ringattn.context_parallel_attention, mesh=mesh, kernel=KERNEL)
    else:
        fn = functools.partial(ringattn.blockwise_attention, kernel=KERNEL)
    got = jax.jit(lambda *a: _variant_grads(fn, *a, **kw))(*f32)
    for name, a, w in zip(("out", "dq", "dk", "dv", "dsinks"), got, want, strict=True):
        helpers.assert_close(a, w, 2e-5, name)


def test_output_types_carry_the_manual_axes():
    """Inside shard_map with check_vma=True a pallas_call needs every output's manual-axis type,
    also for an input that varies over no axis (positions shared by every device): point 5 of
    the GPU review, where the struct went without one and the call raised."""
    mesh = jax.make_mesh(
        (2,), ("context",), devices=jax.devices("cpu")[:2], axis_types=(jax.sharding.AxisType.Auto,)
    )
    seen = {}

    def local(x, shared):
        seen["varying"] = pallas_common.struct((4,), x).manual_axis_type
        seen["shared"] = pallas_common.struct((4,), shared).manual_axis_type
        return x

    f = jax.shard_map(local, mesh=mesh, in_specs=(P("context"), P()), out_specs=P("context"))
    jax.jit(f)(jnp.zeros(4), jnp.zeros(4))
    assert seen["varying"] is not None and "context" in seen["varying"].varying
    assert seen["shared"] is not None and not seen["shared"].varying
