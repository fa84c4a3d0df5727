"""Our fused attention kernel for GPUs: Pallas with the Triton lowering (also runs on CPU with
`interpret=True`, which is how the tests check it).

Three pallas_calls, all on [B, L, heads, D] arrays as they come (GQA reads KV head h // G; K/V
are never repeated): the forward (pallas_fwd.py), dK/dV and dQ (pallas_bwd.py). Masks come from
positions and segment ids, whole tiles are skipped from tile tables and fully visible tiles are
unmasked (pallas_common.py). The soft cap is applied in the kernels; v may have its own head dim.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jax.experimental import pallas as pl

from ringattn.attention.kernels import fused
from ringattn.attention.kernels.pallas_bwd import backward
from ringattn.attention.kernels.pallas_fwd import forward


def _pow2(n):
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class PallasGpu(fused.FusedKernel):
    """Tiles and launch settings of our Pallas GPU kernel (block sizes: powers of 2, >= 16).

    `interpret=True` runs the kernels in the Pallas interpreter (any backend, slow): tests.
    """

    name: ClassVar[str] = "pallas_gpu"
    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int | None = None
    num_stages: int = 2
    interpret: bool = False

    def __post_init__(self):
        for f in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            b = getattr(self, f)
            if not isinstance(b, int) or not _pow2(b) or b < 16:
                raise ValueError(f"PallasGpu: `{f}` must be a power of 2 >= 16, got {b!r}.")

    @property
    def pad_q(self):
        return max(self.block_q, self.block_q_bwd)

    @property
    def pad_k(self):
        return max(self.block_k, self.block_k_bwd)

    def fit(self, q_len, kv_len):
        """Blocks no larger than the (power-of-2 rounded) lengths: short shards pad less."""
        cap = lambda b, n: min(b, max(16, pl.next_power_of_2(n)))  # noqa: E731
        return dataclasses.replace(
            self,
            block_q=cap(self.block_q, q_len),
            block_k=cap(self.block_k, kv_len),
            block_q_bwd=cap(self.block_q_bwd, q_len),
            block_k_bwd=cap(self.block_k_bwd, kv_len),
        )

    def attend(self, cfg, q_, k_, v_, qs, ks):
        return forward(self, cfg, q_, k_, v_, qs, ks)

    def fwd_pass(self, cfg, q_, k_, v_, qs, ks, state):
        return forward(self, cfg, q_, k_, v_, qs, ks, state=state)

    def attend_bwd(self, cfg, q_, k_, v_, bwd, qs, ks):
        do_, lse_, aux = bwd
        return backward(self, cfg, q_, k_, v_, do_, lse_, aux.delta, qs, ks)

    def bwd_pass(self, cfg, q_, k_, v_, bwd, qs, ks, grads):
        do_, lse_, aux = bwd
        return backward(self, cfg, q_, k_, v_, do_, lse_, aux.delta, qs, ks, grads)
