"""RoPE and its scalings against their closed forms, computed independently in float64."""

import math

import numpy as np
import pytest

from ringattn.nn.rope import RopeConfig, apply_rope, inverse_frequencies

D = 16


def rotate_f64(x_BTHD, positions_T, inv_freq):
    """x's (i, i + D/2) pairs as complex numbers, times exp(i * pos * freq)."""
    half = x_BTHD.shape[-1] // 2
    z = x_BTHD[..., :half] + 1j * x_BTHD[..., half:]
    z = z * np.exp(1j * positions_T[None, :, None, None] * inv_freq)
    return np.concatenate([z.real, z.imag], axis=-1)


def base_freqs(theta, d=D):
    return np.array([theta ** (-2 * i / d) for i in range(d // 2)])


@pytest.fixture
def x():
    return np.random.default_rng(0).normal(size=(2, 40, 3, D)).astype(np.float32)


def test_none_is_the_complex_rotation(x):
    pos = np.arange(40) * 7  # large angles
    got = apply_rope(x, pos, RopeConfig())
    want = rotate_f64(x.astype(np.float64), pos, base_freqs(10_000.0))
    np.testing.assert_allclose(got, want, atol=2e-4)
    assert not np.allclose(got, x)


def test_relative_positions_only(x):
    """<rope(q, m), rope(k, n)> depends on m - n only (for every scaling)."""
    for scaling in ("none", "linear", "ntk", "yarn", "llama3"):
        cfg = RopeConfig(scaling=scaling, factor=4.0, original_len=64)
        q, k = x[:1, :1], x[1:, :1]
        dots = [
            np.sum(apply_rope(q, np.array([m]), cfg) * apply_rope(k, np.array([m - 5]), cfg))
            for m in (5, 17, 300)
        ]
        np.testing.assert_allclose(dots, dots[0], rtol=1e-4, err_msg=scaling)


def test_linear_divides_positions(x):
    pos = np.arange(40)
    got = apply_rope(x, pos, RopeConfig(scaling="linear", factor=4.0))
    want = rotate_f64(x.astype(np.float64), pos / 4.0, base_freqs(10_000.0))
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_ntk_changes_the_base():
    f = 8.0
    got, mscale = inverse_frequencies(D, RopeConfig(scaling="ntk", factor=f))
    want = base_freqs(10_000.0 * f ** (D / (D - 2)))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert mscale == 1.0
    base = base_freqs(10_000.0)
    assert got[0] == base[0]  # the highest frequency is kept
    np.testing.assert_allclose(got[-1], base[-1] / f, rtol=1e-12)  # the lowest interpolated


def test_yarn_ramp_and_temperature(x):
    f, length, theta, d = 16.0, 256, 10_000.0, 64
    cfg = RopeConfig(scaling="yarn", factor=f, original_len=length, theta=theta)
    got, mscale = inverse_frequencies(d, cfg)
    base = base_freqs(theta, d)

    # Dimension index where a frequency makes r rotations over the original length.
    def dim(r):
        return d * math.log(length / (2 * math.pi * r)) / (2 * math.log(theta))

    low, high = math.floor(dim(32.0)), math.ceil(dim(1.0))
    for i in range(d // 2):
        gamma = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: keep, 1: interpolate
        want = base[i] * (1 - gamma) + base[i] / f * gamma
        assert got[i] == pytest.approx(want, rel=1e-12), i
    assert got[0] == base[0] and got[-1] == pytest.approx(base[-1] / f, rel=1e-12)
    assert mscale == pytest.approx(0.1 * math.log(f) + 1)
    # The temperature scales every rotated vector's norm by mscale.
    y = apply_rope(x, np.arange(40), RopeConfig(scaling="yarn", factor=f, original_len=length))
    np.testing.assert_allclose(
        np.linalg.norm(y, axis=-1), mscale * np.linalg.norm(x, axis=-1), rtol=1e-5
    )


def test_llama3_rule():
    # Llama 3.1's published parameters.
    cfg = RopeConfig(
        scaling="llama3", factor=8.0, original_len=8192, theta=500_000.0,
        low_freq_factor=1.0, high_freq_factor=4.0,
    )  # fmt: skip
    d = 128
    got, _ = inverse_frequencies(d, cfg)
    base = base_freqs(500_000.0, d)
    kept = scaled = mixed = 0
    for i, w in enumerate(2 * math.pi / base):
        if w < 8192 / 4:  # unchanged, to the rounding of pow (numpy's may differ by an ulp)
            assert got[i] == pytest.approx(base[i], rel=1e-15)
            kept += 1
        elif w > 8192 / 1:
            assert got[i] == pytest.approx(base[i] / 8, rel=1e-12)
            scaled += 1
        else:
            s = (8192 / w - 1) / (4 - 1)
            assert got[i] == pytest.approx((1 - s) * base[i] / 8 + s * base[i], rel=1e-12)
            mixed += 1
    assert kept and scaled and mixed  # every branch exercised


def test_bad_config():
    with pytest.raises(ValueError, match="`scaling` must be one of"):
        RopeConfig(scaling="xpos")
    with pytest.raises(ValueError, match="`factor` must be >= 1"):
        RopeConfig(scaling="linear", factor=0.5)
    with pytest.raises(ValueError, match="`head_dim` must be even"):
        inverse_frequencies(7, RopeConfig())
