"""Argument checks: bad input raises ValueError/TypeError naming the argument; defaults filled in.

Every check reads only shapes and dtypes, so these tests run no attention at all.
"""

import numpy as np
import pytest

import ringattn
from ringattn.attention import inputs
from ringattn.attention.masks import MaskSpec

B, T, S, H, K, D = 2, 8, 6, 4, 2, 4


def arrays(t=T, s=S, h=H, kh=K, d=D, dtype=np.float32):
    return (
        np.zeros((B, t, h, d), dtype),
        np.zeros((B, s, kh, d), dtype),
        np.zeros((B, s, kh, d), dtype),
    )


def ints(*shape):
    return np.zeros(shape, np.int32)


ATTENTION_FNS = [ringattn.reference_attention, ringattn.blockwise_attention]

# (q, k, v overrides, keyword arguments, exception, pattern the message must contain)
BAD_QKV = {
    "q_rank": (dict(q=np.zeros((B, T, H), np.float32)), ValueError, r"`q` must have rank 4"),
    "k_rank": (dict(k=np.zeros((B, S, K, D, 1), np.float32)), ValueError, r"`k` must have rank 4"),
    "v_rank": (dict(v=np.zeros((S, K, D), np.float32)), ValueError, r"`v` must have rank 4"),
    "q_int": (dict(q=np.zeros((B, T, H, D), np.int32)), TypeError, r"`q` must be a floating"),
    "v_bool": (dict(v=np.zeros((B, S, K, D), bool)), TypeError, r"`v` must be a floating"),
    "kv_shapes": (dict(v=np.zeros((B, S + 1, K, D), np.float32)), ValueError, r"`k` and `v`"),
    "kv_heads": (dict(v=np.zeros((B, S, K + 1, D), np.float32)), ValueError, r"`k` and `v`"),
    "head_dims": (
        dict(k=np.zeros((B, S, K, D + 1), np.float32), v=np.zeros((B, S, K, D + 1), np.float32)),
        ValueError,
        r"`q` and `k` head dims differ: 4 and 5",
    ),
    "batch": (
        dict(k=np.zeros((B + 1, S, K, D), np.float32), v=np.zeros((B + 1, S, K, D), np.float32)),
        ValueError,
        r"`q` and `k` batch sizes differ",
    ),
}

BAD_KWARGS = {
    "segment_ids_shape": (
        dict(segment_ids=ints(B, T + 1), kv_segment_ids=ints(B, S)),
        ValueError,
        "`segment_ids`",
    ),
    "segment_ids_float": (
        dict(segment_ids=np.zeros((B, T)), kv_segment_ids=ints(B, S)),
        TypeError,
        "`segment_ids`",
    ),
    "kv_segment_ids_shape": (
        dict(segment_ids=ints(B, T), kv_segment_ids=ints(B, T)),
        ValueError,
        "`kv_segment_ids`",
    ),
    "kv_segment_ids_alone": (dict(kv_segment_ids=ints(B, S)), ValueError, "`kv_segment_ids`"),
    "kv_segment_ids_needed": (dict(segment_ids=ints(B, T)), ValueError, "`kv_segment_ids`"),
    "q_positions_shape": (dict(q_positions=ints(B + 1, T)), ValueError, "`q_positions`"),
    "q_positions_rank": (dict(q_positions=ints(1, 1, T)), ValueError, "`q_positions`"),
    "kv_positions_shape": (dict(kv_positions=ints(T)), ValueError, "`kv_positions`"),
    "kv_positions_float": (
        dict(kv_positions=np.arange(S, dtype=np.float32)),
        TypeError,
        "`kv_positions`",
    ),
    "window_negative": (dict(local_window_size=-1), ValueError, "`local_window_size`"),
    "window_pair_negative": (dict(local_window_size=(2, -1)), ValueError, "`local_window_size`"),
    "window_float": (dict(local_window_size=2.5), TypeError, "`local_window_size`"),
    "window_triple": (dict(local_window_size=(1, 2, 3)), TypeError, "`local_window_size`"),
    "causal_str": (dict(causal="yes"), TypeError, "`causal`"),
    "scale_array": (dict(scale=np.ones(2)), TypeError, "`scale`"),
    "soft_cap_zero": (dict(logits_soft_cap=0.0), ValueError, "`logits_soft_cap`"),
    "soft_cap_negative": (dict(logits_soft_cap=-3), ValueError, "`logits_soft_cap`"),
    "soft_cap_inf": (dict(logits_soft_cap=float("inf")), ValueError, "`logits_soft_cap`"),
    "soft_cap_array": (dict(logits_soft_cap=np.ones(1)), TypeError, "`logits_soft_cap`"),
    "sinks_shape": (dict(sinks=np.zeros((H, 1), np.float32)), ValueError, r"`sinks`.*\(4,\)"),
    "sinks_per_kv_head": (dict(sinks=np.zeros(K, np.float32)), ValueError, "`sinks`"),
    "sinks_int": (dict(sinks=np.zeros(H, np.int32)), TypeError, "`sinks`"),
}


@pytest.mark.parametrize("fn", ATTENTION_FNS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", BAD_QKV)
def test_bad_qkv(fn, case):
    override, exc, pattern = BAD_QKV[case]
    q, k, v = arrays()
    args = {"q": q, "k": k, "v": v, **override}
    with pytest.raises(exc, match=pattern):
        fn(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("fn", ATTENTION_FNS, ids=lambda f: f.__name__)
def test_heads_not_divisible(fn):
    """H % K != 0: the message names the argument (as every other check does) and both counts."""
    q, k, v = arrays(h=4, kh=3)
    with pytest.raises(ValueError, match=r"4.*3") as err:
        fn(q, k, v)
    assert "`k`" in str(err.value) or "`q`" in str(err.value), str(err.value)


@pytest.mark.parametrize("fn", ATTENTION_FNS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", BAD_KWARGS)
def test_bad_mask_arguments(fn, case):
    kwargs, exc, pattern = BAD_KWARGS[case]
    with pytest.raises(exc, match=pattern):
        fn(*arrays(), **kwargs)


def test_error_names_the_function():
    with pytest.raises(ValueError, match="^blockwise_attention: `local_window_size`"):
        ringattn.blockwise_attention(*arrays(), local_window_size=-2)


@pytest.mark.parametrize("name, value", [("block_q", 0), ("block_k", -4), ("block_k", 8.0)])
def test_bad_blocks(name, value):
    with pytest.raises(ValueError, match=f"`{name}`"):
        ringattn.blockwise_attention(*arrays(), **{name: value})


# ---------------------------------------------------------------------------------------------
# Normalisation.


@pytest.mark.parametrize(
    "given, want",
    [
        (None, None),
        (3, (3, 3)),
        ((2, 0), (2, 0)),
        ([0, 5], (0, 5)),
        (np.int64(4), (4, 4)),
        ((np.int32(1), 2), (1, 2)),
    ],
)
def test_normalize_window(given, want):
    assert inputs.normalize_window("f", given) == want


def normalize(q, k, v, **kwargs):
    """(MaskSpec, MaskArrays, scale) from inputs.check's bundle."""
    opts, m, _ = inputs.check("f", q, k, v, **kwargs)
    return opts.spec, m, opts.scale


def test_defaults():
    spec, m, scale = normalize(*arrays())
    assert spec == MaskSpec(causal=False, window=None)
    assert scale == pytest.approx(1 / np.sqrt(D))
    np.testing.assert_array_equal(m.q_pos, np.arange(T)[None])
    np.testing.assert_array_equal(m.kv_pos, np.arange(S)[None])
    assert m.q_pos.dtype == m.kv_pos.dtype == np.int32
    assert m.q_seg is None and m.kv_seg is None


def test_segments_and_positions_normalised():
    q, k, v = arrays(s=T)
    seg = np.arange(B * T, dtype=np.int64).reshape(B, T)
    spec, m, scale = normalize(
        q,
        k,
        v,
        causal=np.bool_(True),
        local_window_size=2,
        segment_ids=seg,
        q_positions=np.arange(T, dtype=np.int16),
        kv_positions=np.ones((B, T), np.int64),
        scale=2,
    )
    assert spec == MaskSpec(causal=True, window=(2, 2)) and scale == 2.0
    assert m.q_seg.dtype == m.kv_seg.dtype == np.int32
    np.testing.assert_array_equal(m.kv_seg, seg)  # kv_segment_ids defaults to segment_ids
    assert m.q_pos.shape == (1, T) and m.q_pos.dtype == np.int32
    assert m.kv_pos.shape == (B, T) and m.kv_pos.dtype == np.int32


@pytest.mark.parametrize("shape", [(S,), (1, S), (B, S)])
def test_position_shapes_accepted(shape):
    _, m, _ = normalize(*arrays(), kv_positions=np.zeros(shape, np.int32))
    assert m.kv_pos.shape == ((1, S) if len(shape) == 1 else shape)


def test_v_may_have_its_own_head_dim():
    q, k, _ = arrays()
    out = ringattn.reference_attention(q, k, np.ones((B, S, K, 3), np.float32))
    assert out.shape == (B, T, H, 3)
