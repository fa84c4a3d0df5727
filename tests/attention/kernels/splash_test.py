"""kernel='pallas_tpu' (splash attention) in the TPU interpreter against the float64 reference.

Splash tiles keys in multiples of 128, so these shapes are the smallest it runs: T = 128. The
test that replaces the XLA fallback by NaNs proves the splash branches are the ones that ran.
"""

import numpy as np
import pytest

import ringattn
from ringattn.attention.kernels import fused
from ringattn.attention.kernels.splash import PallasTpu

B, T, H, D = 1, 128, 4, 16
KERNEL = PallasTpu(interpret=True)


def _segments():
    return np.asarray([[0] * 50 + [1] * 78], np.int32)


CASES = {
    # causal diagonal (CausalMask) with segment ids; a lse cotangent (the XLA backward).
    "segments_causal_gqa": (dict(causal=True), True, 2, True),
    # segments only (FullMask + SegmentIds) in both passes.
    "segments_mqa": (dict(), True, 1, False),
    # the causal diagonal without segments, no lse cotangent: splash in both passes.
    "causal_mha": (dict(causal=True), False, 4, False),
}


def _run(helpers, name, kernel=KERNEL):
    static, with_seg, kh, with_dlse = CASES[name]
    rng = np.random.default_rng(0)
    q, k, v, do, dlse = helpers.random_inputs(rng, B, T, T, H, kh, D)
    dlse = dlse if with_dlse else np.zeros_like(dlse)
    masks = dict(segment_ids=_segments()) if with_seg else {}
    got = helpers.run_attention(
        ringattn.blockwise_attention, q, k, v, do, dlse, masks, kernel=kernel, **static
    )
    return got, helpers.reference_f64(q, k, v, do, dlse, masks, **static)


def test_matches_reference(helpers):
    got, want = _run(helpers, "segments_causal_gqa")
    helpers.assert_all_close(got, want, np.float32)


@pytest.mark.parametrize("name", ["segments_mqa", "causal_mha"])
def test_splash_branches_run(helpers, monkeypatch, name):
    """With the XLA fallback poisoned, steps splash expresses are still exact."""

    def poison(*args):
        return tuple(np.nan * x for x in args[-2:])  # the state/grads passed in, as NaN

    monkeypatch.setattr(fused, "xla_fwd", poison)
    monkeypatch.setattr(fused, "xla_bwd", lambda *a: tuple(np.nan * x for x in a[-1]))
    # Another kernel object (fitted to the same tiles): a new program, traced with the poison.
    got, want = _run(helpers, name, PallasTpu(block_q=256, interpret=True))
    helpers.assert_all_close(got, want, np.float32)
