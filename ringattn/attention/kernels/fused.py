"""What every fused kernel shares: the pass interface on plain [B, L, heads, D] arrays, the
per-step choice between a library kernel and a fallback, and the XLA kernel as that fallback.

Operands are padded to whole blocks of `pad_q` / `pad_k` (the Config's block_q / block_k), not
grouped and not stored as bits. The forward state is o f32 [B, Tp, H, Dv] and lse f32 [B, H, Tp];
gradients are f32 and without the softmax scale, as in the XLA kernel.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ringattn.attention import masks
from ringattn.attention.kernels import xla
from ringattn.attention.kernels.base import Kernel, pad_to_block
from ringattn.attention.masks import FULL, LSE_NONE, PARTIAL, SKIP

# A step a library kernel can run without positional offsets: causal with q and kv at the same,
# increasing positions (the diagonal of a causal mask). SKIP / FULL / PARTIAL come from masks.
DIAG = 3


class BwdAux(NamedTuple):
    """What backward passes need besides do and lse: delta = rowsum(do * o) - dlse [B, H, Tp]
    f32, the output [B, Tp, H, Dv] (library kernels recompute delta from it) and whether dlse is
    nonzero anywhere (library kernels cannot take it: those steps fall back)."""

    delta: jax.Array
    out: jax.Array
    dlse_nonzero: jax.Array


@dataclasses.dataclass(frozen=True)
class FusedKernel(Kernel):
    """Base of the fused kernels: the parts of the pass interface that do not depend on them."""

    name: ClassVar[str] = "fused"

    @property
    def pad_q(self) -> int:
        return 1

    @property
    def pad_k(self) -> int:
        return 1

    def blocks(self, block_q, block_k, q_len, kv_len):
        return self.pad_q, self.pad_k

    def store_q(self, q_BTHD, num_kv_heads):
        return q_BTHD

    def store_kv(self, x_BSKD):
        return x_BSKD

    def init_state(self, cfg, q_, v_):
        o = jnp.zeros_like(q_[..., :1], dtype=jnp.float32)
        o = jnp.broadcast_to(o, (*o.shape[:-1], v_.shape[-1]))
        lse = jnp.full_like(q_[..., 0], LSE_NONE, dtype=jnp.float32)
        return o, jnp.moveaxis(lse, 1, 2)

    def finish_fwd(self, cfg, q, state):
        o, lse = state
        t = q.shape[1]
        return o[:, :t], lse[..., :t]

    def prepare_bwd(self, cfg, q, k, b):
        """(do_, lse_, aux), all padded like q."""
        pad_t = lambda x: pad_to_block(x, cfg.block_q, axis=2)  # noqa: E731
        pad_q = lambda x: pad_to_block(x, cfg.block_q)  # noqa: E731
        aux = BwdAux(pad_t(b.delta), pad_q(b.out), b.dlse_nonzero)
        return pad_q(b.dout.astype(b.out.dtype)), pad_t(b.lse), aux

    def finish_bwd(self, cfg, q, k, v, grads):
        dq, dk, dv = grads
        t, s = q.shape[1], k.shape[1]
        return (
            (dq[:, :t] * cfg.scale).astype(q.dtype),
            (dk[:, :s] * cfg.scale).astype(k.dtype),
            dv[:, :s].astype(v.dtype),
        )


def library_supports(soft_cap, head_dim, v_head_dim):
    """What library kernels (cuDNN, splash) cannot express: a soft cap, a v head dim of its own.
    Their steps then run the fallback; dispatch chooses another kernel under "auto"."""
    if soft_cap is not None:
        return "its fused attention takes no logit soft cap"
    if v_head_dim != head_dim:
        return f"it needs v's head dim ({v_head_dim}) to equal q's and k's ({head_dim})"
    return None


# ---------------------------------------------------------------------------------------------
# Steps: merging results, classifying a step, the XLA kernel as a fallback.


def merge(o, lse, o_s, lse_s):
    """Two partial results over disjoint keys, merged exactly through their lse (DESIGN 3);
    lse at LSE_NONE (nothing seen) weighs exp(LSE_NONE - lse) = 0 against any real one."""
    new = jnp.logaddexp(lse, lse_s)
    w = lambda x: jnp.moveaxis(jnp.exp(x - new), 1, 2)[..., None]  # noqa: E731
    return o * w(lse) + o_s.astype(o.dtype) * w(lse_s), new


def step_class(cfg, qs, ks, allow_segments_diag=False, padding_ok=False):
    """SKIP, FULL, PARTIAL or DIAG (int32) for q side qs against the keys of side ks.

    DIAG: causal, no window, the same strictly increasing positions on both sides (so the mask
    is the plain lower triangle) and no segments unless `allow_segments_diag`. Padded keys make
    a step PARTIAL unless the library masks its own padding (`padding_ok`: then positions are
    compared on both sides as padded, increasing over the valid keys).
    """
    state = masks.tile_state(
        cfg.spec, masks.reduce_ranges(qs.ranges), masks.reduce_ranges(ks.ranges)
    )
    if cfg.kv_padded and not padding_ok:
        state = jnp.where(state == FULL, PARTIAL, state)
    spec = cfg.spec
    diag_possible = (
        spec.causal
        and spec.window is None
        and qs.pos.shape == ks.pos.shape
        and (qs.seg is None or allow_segments_diag)
        and (padding_ok or not cfg.kv_padded)
    )
    if diag_possible:
        pos = qs.pos[:, : cfg.kv_len]
        same = jnp.all(qs.pos == ks.pos) & jnp.all(pos[:, 1:] > pos[:, :-1])
        state = jnp.where((state == PARTIAL) & same, DIAG, state)
    return state.astype(jnp.int32)


def switch_step(cls, branches, *operands):
    """lax.switch over SKIP/FULL/PARTIAL/DIAG with branches given by name (a missing one
    falls back to 'partial', which handles any step)."""
    order = [None] * 4
    order[SKIP], order[FULL], order[PARTIAL], order[DIAG] = (
        branches.get(n, branches["partial"]) for n in ("skip", "full", "partial", "diag")
    )
    return lax.switch(cls, order, *operands)


def _xla_cfg(cfg):
    return dataclasses.replace(cfg, kernel=xla.Xla(), tile_callback=None)


def xla_fwd(cfg, q_, k_, v_, qs, ks, o, lse):
    """The XLA kernel's forward pass on fused-layout operands (reshapes and bitcasts only)."""
    kh = k_.shape[2]
    q_g = xla.to_storage(xla.group_heads(q_, kh))
    k_s, v_s = xla.to_storage(k_), xla.to_storage(v_)
    o_g = xla.group_heads(o, kh)
    b, h, t = lse.shape
    lse_g = lse.reshape(b, kh, h // kh, t)
    o_g, lse_g = xla.fwd_pass(_xla_cfg(cfg), q_g, k_s, v_s, qs, ks, o_g, lse_g)
    return o_g.reshape(o.shape), lse_g.reshape(lse.shape)


def xla_bwd(cfg, q_, k_, v_, do_, lse_, aux, qs, ks, grads):
    """The XLA kernel's backward pass on fused-layout operands."""
    kh = k_.shape[2]
    b, h, t = lse_.shape
    stat = lambda x: x.reshape(b, kh, h // kh, t)  # noqa: E731
    grouped = lambda x: xla.to_storage(xla.group_heads(x, kh))  # noqa: E731
    dq, dk, dv = grads
    dq, dk, dv = xla.bwd_pass(
        _xla_cfg(cfg),
        grouped(q_),
        xla.to_storage(k_),
        xla.to_storage(v_),
        grouped(do_),
        stat(lse_),
        stat(aux.delta),
        qs,
        ks,
        (xla.group_heads(dq, kh), dk, dv),
    )
    return dq.reshape(q_.shape), dk, dv


@dataclasses.dataclass(frozen=True)
class FusedXla(FusedKernel):
    """The XLA kernel behind the fused kernels' layout: the fallback of a library kernel's
    steps when our Pallas kernel cannot run (dispatch.py)."""

    name: ClassVar[str] = "xla"
    block_q: int = 128
    block_k: int = 128

    @property
    def pad_q(self):
        return self.block_q

    @property
    def pad_k(self):
        return self.block_k

    def fit(self, q_len, kv_len):
        return dataclasses.replace(
            self, block_q=min(self.block_q, q_len), block_k=min(self.block_k, kv_len)
        )

    def fwd_pass(self, cfg, q_, k_, v_, qs, ks, state):
        return xla_fwd(cfg, q_, k_, v_, qs, ks, *state)

    def bwd_pass(self, cfg, q_, k_, v_, bwd, qs, ks, grads):
        do_, lse_, aux = bwd
        return xla_bwd(cfg, q_, k_, v_, do_, lse_, aux, qs, ks, grads)
