"""reference_attention, the ground truth, against a naive numpy implementation (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ringattn

B, T, S, H, D = 2, 12, 12, 4, 4


def naive_attention(
    q,
    k,
    v,
    do,
    dlse,
    *,
    causal=False,
    window=None,
    segment_ids=None,
    kv_segment_ids=None,
    q_positions=None,
    kv_positions=None,
    scale=None,
):
    """Row by row softmax in float64 with a hand-written backward; returns out, lse, dq, dk, dv.

    The backward: with p = softmax(s), out = p v and lse = logsumexp(s),
    d(out . do + lse * dlse)/ds = p * (v do - out . do + dlse).
    """
    q, k, v, do, dlse = (np.asarray(x, np.float64) for x in (q, k, v, do, dlse))
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    qp = np.broadcast_to(np.arange(t) if q_positions is None else q_positions, (b, t))
    kp = np.broadcast_to(np.arange(s) if kv_positions is None else kv_positions, (b, s))
    if kv_segment_ids is None:
        kv_segment_ids = segment_ids
    left, right = (window, window) if isinstance(window, int) else (window or (None, None))
    out, dq = np.zeros_like(q), np.zeros_like(q)
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    lse = np.full((b, h, t), -np.inf)
    for bi in range(b):
        for i in range(t):
            vis = np.ones(s, bool)
            for j in range(s):
                if causal and kp[bi, j] > qp[bi, i]:
                    vis[j] = False
                if window is not None and not qp[bi, i] - left <= kp[bi, j] <= qp[bi, i] + right:
                    vis[j] = False
                if segment_ids is not None and segment_ids[bi, i] != kv_segment_ids[bi, j]:
                    vis[j] = False
            if not vis.any():
                continue
            for hi in range(h):
                kvh = hi // (h // kh)
                kk, vv = k[bi, vis, kvh], v[bi, vis, kvh]
                logits = kk @ q[bi, i, hi] * scale
                e = np.exp(logits - logits.max())
                p = e / e.sum()
                out[bi, i, hi] = p @ vv
                lse[bi, hi, i] = logits.max() + np.log(e.sum())
                ds = p * (vv @ do[bi, i, hi] - out[bi, i, hi] @ do[bi, i, hi] + dlse[bi, hi, i])
                dv[bi, vis, kvh] += np.outer(p, do[bi, i, hi])
                dq[bi, i, hi] = ds @ kk * scale
                dk[bi, vis, kvh] += np.outer(ds, q[bi, i, hi]) * scale
    return out, lse, dq, dk, dv


def _cases():
    rng = np.random.default_rng(1)
    seg = np.array([[0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3, 3]])
    seg = seg.astype(np.int32)
    perm = np.stack([rng.permutation(T) for _ in range(B)]).astype(np.int32)
    even = np.arange(T, dtype=np.int32)[None] * 2
    return {
        "dense": dict(),
        "causal_segments_gqa": dict(
            causal=True, segment_ids=seg, kv_segment_ids=np.roll(seg, 3, axis=1)
        ),
        "fully_masked_rows": dict(
            causal=True, segment_ids=seg, kv_segment_ids=np.where(seg == 2, 7, seg)
        ),
        "window_pair_mqa": dict(kh=1, window=(3, 1)),
        "window_int_mha_scale_large_logits": dict(kh=4, window=2, scale=0.9, logit_scale=6.0),
        "cross_lengths_positions_1d": dict(
            t=5,
            causal=True,
            window=(2, 5),
            q_positions=np.arange(7, 12, dtype=np.int32),
            segment_ids=seg[:, 7:],
            kv_segment_ids=seg,
        ),
        "positions_BT": dict(causal=True, window=(4, 0), q_positions=perm, kv_positions=perm),
        "positions_1T": dict(causal=True, q_positions=even, kv_positions=even + 1),
    }


CASES = _cases()


@pytest.mark.parametrize("name", CASES)
def test_reference_matches_naive_numpy(name, helpers):
    case = dict(CASES[name])
    t, kh, logit_scale = case.pop("t", T), case.pop("kh", 2), case.pop("logit_scale", 1.0)
    rng = np.random.default_rng(0)
    q, k, v, do, dlse = helpers.random_inputs(
        rng, B, t, S, H, kh, D, np.float64, logit_scale=logit_scale
    )
    window = case.pop("window", None)
    static = {name: case.pop(name) for name in ("causal", "scale") if name in case}
    got = helpers.run_attention(
        ringattn.reference_attention, q, k, v, do, dlse, case, local_window_size=window, **static
    )
    want = naive_attention(q, k, v, do, dlse, window=window, **static, **case)
    helpers.assert_all_close(got, want, np.float64)


def test_fully_masked_rows_are_zero_not_nan(helpers, rng):
    q, k, v, do, dlse = helpers.random_inputs(rng, B, T, S, H, 2, D, np.float64)
    seg = np.zeros((B, T), np.int32)
    seg[:, :4] = 5  # queries 0..3 are of document 5, which no key belongs to
    kv_seg = np.zeros((B, S), np.int32)
    kv_seg[:, -3:] = 6  # and no query sees keys 9..11
    out, lse, dq, dk, dv = helpers.run_attention(
        ringattn.reference_attention,
        q,
        k,
        v,
        do,
        dlse,
        dict(segment_ids=seg, kv_segment_ids=kv_seg),
        causal=True,
    )
    for x in (out, lse, dq, dk, dv):
        assert not np.isnan(x).any()
    np.testing.assert_array_equal(out[:, :4], 0.0)
    np.testing.assert_array_equal(lse[:, :, :4], -np.inf)
    np.testing.assert_array_equal(dq[:, :4], 0.0)
    np.testing.assert_array_equal(dk[:, -3:], 0.0)
    np.testing.assert_array_equal(dv[:, -3:], 0.0)
    assert np.isfinite(lse[:, :, 4:]).all()
    assert np.abs(dq[:, 5:]).min() > 0


def test_one_segment_equals_no_segments(helpers, rng):
    q, k, v, do, dlse = helpers.random_inputs(rng, B, T, S, H, 2, D, np.float64)
    one = np.full((B, T), 3, np.int32)
    # Same static arguments (and None-ness) as the "positions_1T" case: shares its program.
    pos = {"q_positions": np.arange(T, dtype=np.int32)[None]}
    pos["kv_positions"] = pos["q_positions"]
    a = helpers.run_attention(ringattn.reference_attention, q, k, v, do, dlse, pos, causal=True)
    b = helpers.run_attention(
        ringattn.reference_attention,
        q,
        k,
        v,
        do,
        dlse,
        dict(pos, segment_ids=one, kv_segment_ids=one),
        causal=True,
    )
    helpers.assert_all_close(a, b, np.float64)
    assert np.abs(a[0][:, 1:] - a[0][:, :1]).max() > 0.1  # not a trivially constant output


@pytest.mark.parametrize("window", [(3, 1), 2])
def test_window_convention_matches_jax_nn(window, rng):
    """local_window_size means what it means in jax.nn.dot_product_attention: (left, right)."""
    q = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    k, v = jnp.asarray(rng.standard_normal((2, B, S, 2, D)), jnp.float32)
    causal = window == 2

    @jax.jit
    def both(q, k, v):
        ours = ringattn.reference_attention(q, k, v, causal=causal, local_window_size=window)
        theirs = jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, local_window_size=window, implementation="xla"
        )
        return ours, theirs

    got, want = both(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_dtypes(rng):
    """Output in the input dtype, lse in float32 (float64 for float64 inputs)."""
    q = jnp.asarray(rng.standard_normal((1, 4, 2, 4)), jnp.bfloat16)
    f = jax.jit(lambda q, k: ringattn.reference_attention(q, k, k, return_lse=True))
    out, lse = f(q, q)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    assert out.shape == (1, 4, 2, 4) and lse.shape == (1, 2, 4)
    out, lse = f(q.astype(jnp.float64), q)
    assert out.dtype == jnp.float64 and lse.dtype == jnp.float64
