"""What every fused kernel shares: the pass interface of the XLA kernel, on plain [B, L, heads, D]
arrays, and the per-step choice between a library kernel and a fallback.

A kernel object is static (a frozen dataclass) and carries the functions `blockwise` and `ring`
call through `blockwise.kernel_ops(cfg)`:

  prepare, kv_side, init_fwd_state, fwd_pass, finish_fwd, prepare_bwd, bwd_pass, finish_bwd
  attend, attend_bwd            one fresh pass (single device: no state to continue)

Operands are padded to whole blocks of `pad_q` / `pad_k` (the Config's block_q / block_k), not
grouped and not stored as bits. The forward state is o f32 [B, Tp, H, D] and lse f32 [B, H, Tp];
gradients are f32 and without the softmax scale, as in `blockwise`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ringattn.attention import blockwise, masks
from ringattn.attention.masks import FULL, PARTIAL, SKIP

# A step a library kernel can run without positional offsets: causal with q and kv at the same,
# increasing positions (the diagonal of a causal mask). SKIP / FULL / PARTIAL come from masks.
DIAG = 3


class BwdAux(NamedTuple):
    """What backward passes need besides do and lse: delta = rowsum(do * o) - dlse [B, H, Tp]
    f32, the output [B, Tp, H, D] (library kernels recompute delta from it) and whether dlse is
    nonzero anywhere (library kernels cannot take it: those steps fall back)."""

    delta: jax.Array
    out: jax.Array
    dlse_nonzero: jax.Array


@dataclasses.dataclass(frozen=True)
class FusedKernel:
    """Base of the fused kernels: the parts of the pass interface that do not depend on them."""

    name: ClassVar[str] = "fused"

    @property
    def pad_q(self) -> int:
        return 1

    @property
    def pad_k(self) -> int:
        return 1

    def fit(self, q_len, kv_len):
        """This kernel with its tiles adapted to the given local lengths."""
        del q_len, kv_len
        return self

    # -- the pass interface ---------------------------------------------------------------

    def prepare(self, cfg, q, k, v, m):
        qs = blockwise.make_side(m.q_pos, m.q_seg, cfg.block_q)
        pad_edge = lambda x: blockwise.pad_to_block(x, cfg.block_k, mode="edge")  # noqa: E731
        kpos = pad_edge(m.kv_pos)
        kseg = None if m.kv_seg is None else pad_edge(m.kv_seg)
        q_ = blockwise.pad_to_block(q, cfg.block_q)
        k_, v_ = (blockwise.pad_to_block(x, cfg.block_k) for x in (k, v))
        return qs, q_, (k_, v_, kpos, kseg)

    def kv_side(self, cfg, kpos, kseg):
        return blockwise.kv_side(cfg, kpos, kseg)

    def init_fwd_state(self, cfg, q_):
        o = jnp.zeros_like(q_, dtype=jnp.float32)
        lse = jnp.full_like(q_[..., 0], -jnp.inf, dtype=jnp.float32)
        return o, jnp.moveaxis(lse, 1, 2)

    def finish_fwd(self, cfg, q, o, lse):
        t = q.shape[1]
        return o[:, :t].astype(q.dtype), lse[..., :t]

    def prepare_bwd(self, cfg, k, out, lse, dout, dlse):
        """(do_, lse_, aux): lse with -inf -> +inf (p = 0 there), all padded like q."""
        delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
        delta = jnp.moveaxis(delta, 1, 2)
        nonzero = jnp.asarray(False)
        if dlse is not None:
            delta = delta - dlse
            nonzero = jnp.any(dlse != 0)
        pad_t = lambda x: blockwise.pad_to_block(x, cfg.block_q, axis=2)  # noqa: E731
        pad_q = lambda x: blockwise.pad_to_block(x, cfg.block_q)  # noqa: E731
        lse_ = jnp.where(lse == -jnp.inf, jnp.inf, lse)
        aux = BwdAux(pad_t(delta), pad_q(out), nonzero)
        return pad_q(dout.astype(out.dtype)), pad_t(lse_), aux

    def finish_bwd(self, cfg, q, k, v, dq, dk, dv):
        return blockwise.finish_bwd(cfg, q, k, v, dq, dk, dv)

    def attend(self, cfg, q_, k_, v_, qs, ks):
        return self.fwd_pass(cfg, q_, k_, v_, qs, ks, *self.init_fwd_state(cfg, q_))

    def attend_bwd(self, cfg, q_, k_, v_, do_, lse_, aux, qs, ks):
        grads = tuple(jnp.zeros_like(x, dtype=jnp.float32) for x in (q_, k_, v_))
        return self.bwd_pass(cfg, q_, k_, v_, do_, lse_, aux, qs, ks, grads)

    def fwd_pass(self, cfg, q_, k_, v_, qs, ks, o, lse):
        raise NotImplementedError

    def bwd_pass(self, cfg, q_, k_, v_, do_, lse_, aux, qs, ks, grads):
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Steps: merging results, classifying a step, the XLA kernel as a fallback.


def merge(o, lse, o_s, lse_s):
    """Two partial results over disjoint keys, merged exactly through their lse (DESIGN 3)."""
    new = jnp.logaddexp(lse, lse_s)
    safe = jnp.where(new == -jnp.inf, 0.0, new)
    w = lambda x: jnp.moveaxis(jnp.exp(x - safe), 1, 2)[..., None]  # noqa: E731
    return o * w(lse) + o_s.astype(o.dtype) * w(lse_s), new


def step_class(cfg, qs, ks, allow_segments_diag=False):
    """SKIP, FULL, PARTIAL or DIAG (int32) for q side qs against the keys of side ks.

    DIAG: causal, no window, the same strictly increasing positions on both sides (so the mask
    is the plain lower triangle), no padding, and no segments unless `allow_segments_diag`.
    """
    state = masks.tile_state(
        cfg.spec, masks.reduce_ranges(qs.ranges), masks.reduce_ranges(ks.ranges)
    )
    if cfg.kv_padded:
        state = jnp.where(state == FULL, PARTIAL, state)
    spec = cfg.spec
    diag_possible = (
        spec.causal
        and spec.window is None
        and qs.pos.shape == ks.pos.shape
        and (qs.seg is None or allow_segments_diag)
        and not cfg.kv_padded
    )
    if diag_possible:
        same = jnp.all(qs.pos == ks.pos) & jnp.all(qs.pos[:, 1:] > qs.pos[:, :-1])
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
    return dataclasses.replace(cfg, kernel=None, tile_callback=None)


def xla_fwd(cfg, q_, k_, v_, qs, ks, o, lse):
    """The XLA kernel's forward pass on fused-layout operands (reshapes and bitcasts only)."""
    kh = k_.shape[2]
    q_g = blockwise.to_storage(blockwise.group_heads(q_, kh))
    k_s, v_s = blockwise.to_storage(k_), blockwise.to_storage(v_)
    o_g = blockwise.group_heads(o, kh)
    b, h, t = lse.shape
    lse_g = lse.reshape(b, kh, h // kh, t)
    o_g, lse_g = blockwise.fwd_pass(_xla_cfg(cfg), q_g, k_s, v_s, qs, ks, o_g, lse_g)
    return o_g.reshape(o.shape), lse_g.reshape(lse.shape)


def xla_bwd(cfg, q_, k_, v_, do_, lse_, aux, qs, ks, grads):
    """The XLA kernel's backward pass on fused-layout operands."""
    kh = k_.shape[2]
    b, h, t = lse_.shape
    stat = lambda x: x.reshape(b, kh, h // kh, t)  # noqa: E731
    grouped = lambda x: blockwise.to_storage(blockwise.group_heads(x, kh))  # noqa: E731
    dq, dk, dv = grads
    dq, dk, dv = blockwise.bwd_pass(
        _xla_cfg(cfg),
        grouped(q_),
        blockwise.to_storage(k_),
        blockwise.to_storage(v_),
        grouped(do_),
        stat(lse_),
        stat(aux.delta),
        qs,
        ks,
        (blockwise.group_heads(dq, kh), dk, dv),
    )
    return dq.reshape(q_.shape), dk, dv
