"""Rotary position embeddings (RoPE) from positions, with the scalings used to extend context.

Everything is computed in float32 from integer positions, so any token order (a layout, packed
documents restarting at 0, a cache's own positions) gets the right rotation. The scalings change
the per-dimension inverse frequencies (and, for YaRN, the attention temperature):

- "none": inv_freq_i = theta^(-2i/D) (Su et al. 2021).
- "linear": position interpolation (Chen et al. 2023): every frequency divided by `factor`.
- "ntk": NTK-aware scaling: the base becomes theta * factor^(D / (D - 2)), so the lowest frequency
  is interpolated by `factor` while the highest is left nearly untouched.
- "yarn": YaRN (Peng et al. 2023, eq. 18-20): dimensions that rotate more than `beta_fast` times
  over the original context keep their frequency, those rotating fewer than `beta_slow` times are
  interpolated by `factor`, a linear ramp in between; cos/sin scaled by 0.1 ln(factor) + 1
  (or a given `attention_factor`, as Hugging Face configs may set).
- "llama3": Llama 3.1's rule: wavelengths shorter than original_len / high_freq_factor kept,
  longer than original_len / low_freq_factor divided by `factor`, smooth interpolation between.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

SCALINGS = ("none", "linear", "ntk", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10_000.0
    scaling: str = "none"
    factor: float = 1.0  # context extension factor (target length / original length)
    original_len: int = 8192  # the context length the model was trained at (yarn, llama3)
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float = 0.0  # yarn: the cos/sin scale; 0: YaRN's 0.1 ln(factor) + 1
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise ValueError(
                f"RopeConfig: `scaling` must be one of {SCALINGS}, got {self.scaling!r}."
            )
        if not self.factor >= 1.0:
            raise ValueError(f"RopeConfig: `factor` must be >= 1, got {self.factor}.")


def inverse_frequencies(head_dim: int, cfg: RopeConfig) -> tuple[np.ndarray, float]:
    """(inv_freq [head_dim // 2] float64, cos/sin scale) for `cfg`; numpy, computed once."""
    if head_dim % 2:
        raise ValueError(f"RoPE: `head_dim` must be even, got {head_dim}.")
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    theta, f = cfg.theta, cfg.factor
    if cfg.scaling == "ntk":
        theta = theta * f ** (head_dim / (head_dim - 2))
    inv_freq = theta**-exponents
    if cfg.scaling == "linear":
        return inv_freq / f, 1.0
    if cfg.scaling == "yarn":
        # The dimension index at which the rotations over original_len equal r (eq. 17).
        def dim_for(rotations):
            wavelength = cfg.original_len / rotations
            return head_dim * math.log(wavelength / (2 * math.pi)) / (2 * math.log(cfg.theta))

        low = max(math.floor(dim_for(cfg.beta_fast)), 0)
        high = min(math.ceil(dim_for(cfg.beta_slow)), head_dim - 1)
        high = max(high, low + 1e-3)  # avoid 0 / 0 when the range is empty
        ramp = np.clip((np.arange(head_dim // 2) - low) / (high - low), 0.0, 1.0)
        inv_freq = inv_freq * (1 - ramp) + inv_freq / f * ramp
        default = (0.1 * math.log(f) + 1.0) if f > 1 else 1.0
        return inv_freq, cfg.attention_factor or default
    if cfg.scaling == "llama3":
        wavelength = 2 * math.pi / inv_freq
        short = cfg.original_len / cfg.high_freq_factor
        long = cfg.original_len / cfg.low_freq_factor
        smooth = (cfg.original_len / wavelength - cfg.low_freq_factor) / (
            cfg.high_freq_factor - cfg.low_freq_factor
        )
        mixed = (1 - smooth) * inv_freq / f + smooth * inv_freq
        inv_freq = np.where(
            wavelength < short, inv_freq, np.where(wavelength > long, inv_freq / f, mixed)
        )
        return inv_freq, 1.0
    return inv_freq, 1.0


def apply_rope(x_BTHD, positions_BT, cfg: RopeConfig):
    """Rotate x [B, T, H, D] by its positions [B, T] (or [T]); pairs (i, i + D/2) rotate together
    (the Llama / GPT-NeoX convention). Computed in float32, returned in x's dtype.

    As x * cos + rotate_half(x) * sin with cos/sin tables over the whole head dim: one pass
    over x. (Rotating the halves and concatenating the results is the same arithmetic, but
    XLA:CPU runs its concatenate 3-4x slower: measured on SmolLM2's q and k at 2048 tokens.)"""
    d = x_BTHD.shape[-1]
    inv_freq, mscale = inverse_frequencies(d, cfg)
    positions = jnp.asarray(positions_BT)
    if positions.ndim == 1:
        positions = positions[None]
    angle_BTF = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    cos_BTF, sin_BTF = jnp.cos(angle_BTF) * mscale, jnp.sin(angle_BTF) * mscale
    cos_BT1D = jnp.concatenate([cos_BTF, cos_BTF], axis=-1)[:, :, None]
    sin_BT1D = jnp.concatenate([-sin_BTF, sin_BTF], axis=-1)[:, :, None]  # signs of rotate_half
    x = x_BTHD.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([x2, x1], axis=-1)
    return (x * cos_BT1D + rotated * sin_BT1D).astype(x_BTHD.dtype)
