"""The one-collective merges of partial attention results (decode/merge.py) against a float64
logsumexp reference: every device's rows and each device's own rows, rows some devices do not
see and rows no device sees (0 out, lse -inf publicly, no NaN, no inf formed), and the packed
all-gather rebuilding every dtype bit for bit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ringattn.attention import masks
from ringattn.decode import merge

N, B, T, H, D = 4, 2, 3, 4, 5
AXIS = "context"


def partials(seed=0):
    """out [N, B, T, H, D] and lse [N, B, H, T] float64 over disjoint key sets: row (b=0, t=1)
    is seen by no device, row (b=1, t=2) by device 2 alone, head 3 of row (b=0, t=0) by devices
    0 and 3; what a device does not see is 0 with lse = LSE_NONE, as the kernels leave it."""
    rng = np.random.default_rng(seed)
    out = rng.standard_normal((N, B, T, H, D))
    lse = rng.standard_normal((N, B, H, T)) * 30.0  # spread: the max term matters
    unseen = np.zeros((N, B, H, T), bool)
    unseen[:, 0, :, 1] = True
    unseen[[0, 1, 3], 1, :, 2] = True
    unseen[[1, 2], 0, 3, 0] = True
    lse = np.where(unseen, masks.LSE_NONE, lse)
    out = np.where(np.moveaxis(unseen, 3, 2)[..., None], 0.0, out)
    return out, lse, unseen


def reference(out, lse, unseen):
    """float64: lse = log sum exp over the devices that see the row, out their weighted sum;
    (0, -inf) where none does."""
    seen = ~unseen
    m = np.max(np.where(seen, lse, -np.inf), axis=0)
    m = np.where(np.isfinite(m), m, 0.0)
    w = np.where(seen, np.exp(lse - m), 0.0)
    total = w.sum(0)
    with np.errstate(divide="ignore"):
        lse_ref = np.where(total > 0, m + np.log(np.where(total > 0, total, 1.0)), -np.inf)
    weight = np.moveaxis(w / np.where(total > 0, total, 1.0), 3, 2)[..., None]
    return (out * weight).sum(0), lse_ref


def check(got_out, got_lse, want_out, want_lse):
    got_out, got_lse = np.asarray(got_out), np.asarray(masks.public_lse(got_lse))
    assert np.isfinite(got_out).all()
    np.testing.assert_allclose(got_out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(got_lse), np.isneginf(want_lse))
    seen = np.isfinite(want_lse)
    np.testing.assert_allclose(got_lse[seen], want_lse[seen], rtol=1e-12)


def test_merge_stacked_equals_the_float64_reference():
    out, lse, unseen = partials()
    want = reference(out, lse, unseen)
    assert np.isneginf(want[1][0, :, 1]).all() and np.isfinite(want[1][1, :, 2]).all()
    with jax.debug_nans(True), jax.debug_infs(True):
        got = jax.jit(merge.merge_stacked)(jnp.asarray(out), jnp.asarray(lse))
    check(*got, *want)


@functools.cache
def _merged(mesh, own_rows):
    """jit(shard_map) of a merge: device r holds the partials of device r's keys."""
    parts = P(AXIS)

    def local(out, lse):
        out, lse = out[0], lse[0]
        if own_rows:
            return merge.merge_own_rows(out, lse, AXIS)
        return merge.merge_partials(out, lse, AXIS)

    rows = P(None, AXIS) if own_rows else P()
    lse_rows = P(None, None, AXIS) if own_rows else P()
    return jax.jit(
        jax.shard_map(
            local, mesh=mesh, in_specs=(parts, parts), out_specs=(rows, lse_rows), check_vma=True
        )
    )


def test_merge_partials_gives_every_device_every_row(helpers):
    """One all-gather; the result is invariant over the axis (out_specs P() under check_vma)."""
    mesh = helpers.ring_mesh(N, AXIS)
    out, lse, unseen = partials(1)
    f = _merged(mesh, False)
    with jax.debug_nans(True), jax.debug_infs(True):
        got = f(jnp.asarray(out), jnp.asarray(lse))
    check(*got, *reference(out, lse, unseen))
    hlo = f.lower(jnp.asarray(out), jnp.asarray(lse)).compile().as_text()
    assert helpers.collectives(hlo) == [("all-gather", {(N, B, T, H, D + 1)})]


def test_merge_own_rows_gives_each_device_its_rows(helpers):
    """Every device holds partials of all N * T queries; device r keeps rows [r T, (r + 1) T)
    of the merge, after one all-to-all."""
    mesh = helpers.ring_mesh(N, AXIS)
    blocks = [partials(seed) for seed in range(2, 2 + N)]  # a different block for each device
    out, lse, unseen = (
        np.concatenate([blk[i] for blk in blocks], axis=a) for i, a in enumerate((2, 3, 3))
    )
    f = _merged(mesh, True)
    with jax.debug_nans(True), jax.debug_infs(True):
        got = f(jnp.asarray(out), jnp.asarray(lse))
    check(*got, *reference(out, lse, unseen))
    hlo = f.lower(jnp.asarray(out), jnp.asarray(lse)).compile().as_text()
    assert [op for op, _ in helpers.collectives(hlo)] == ["all-to-all"]


@pytest.mark.parametrize("axis", [1, 0])
def test_gather_packed_rebuilds_every_dtype(helpers, axis):
    mesh = helpers.ring_mesh(N, AXIS)
    rng = np.random.default_rng(3)
    arrays = [
        rng.standard_normal((B, N * T, H, D)).astype(np.float32),
        rng.integers(-(2**31), 2**31 - 1, (B, N * T), dtype=np.int64).astype(np.int32),
        jnp.asarray(rng.standard_normal((B, N * T, 3)), jnp.bfloat16),
        rng.standard_normal((B, N * T, 2)),  # float64
        rng.integers(-128, 127, (B, N * T, H), dtype=np.int64).astype(np.int8),
    ]
    arrays = [jnp.moveaxis(jnp.asarray(x), 1, axis) for x in arrays]
    spec = P(*[None] * axis, AXIS)
    gather = jax.jit(
        jax.shard_map(
            lambda *xs: tuple(merge.gather_packed(list(xs), AXIS, axis=axis)),
            mesh=mesh, in_specs=spec, out_specs=P(), check_vma=False,
        )
    )  # fmt: skip
    for got, want in zip(gather(*arrays), arrays, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(
            np.asarray(jax.lax.bitcast_convert_type(got, jnp.uint8)),
            np.asarray(jax.lax.bitcast_convert_type(want, jnp.uint8)),
        )
    hlo = gather.lower(*arrays).compile().as_text()
    assert [op for op, _ in helpers.collectives(hlo)] == ["all-gather"]
    with pytest.raises(ValueError, match="leading dims"):
        merge.gather_packed([jnp.zeros((2, 3)), jnp.zeros((2, 4))], AXIS)
