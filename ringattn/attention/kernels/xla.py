"""The XLA kernel: flash-style blockwise attention in pure JAX, on every backend, dtype and mask.

Online softmax forward, fused tiled backward (DESIGN 3). Queries are grouped by KV head
(q_BTKGD: G = H // K query heads share a KV head, so K/V are never repeated), statistics and
accumulators are f32 (f64 for f64 inputs). Tiles that the mask rules out are not computed and
fully visible tiles apply no mask (masks.tile_state).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from ringattn.attention import masks
from ringattn.attention.kernels.base import Config, Kernel, Side, logits, pad_to_block
from ringattn.attention.masks import FULL, LSE_NONE, PARTIAL, SKIP


def to_storage(x):
    """Narrow floats (bf16, f16) as same-width unsigned ints; other arrays unchanged.

    XLA:CPU computes bf16 dots in f32, and on a whole loop-invariant bf16 array it hoists that
    conversion out of the tile loop, adding a full-size f32 copy of q, k, v and do. Integer bits
    cannot be converted early, so the kernel keeps narrow operands as bits and reinterprets each
    tile (`_tile`). Elsewhere the bitcasts are free.
    """
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4:
        return lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    return x


def from_storage(x, dtype):
    """The inverse of `to_storage`: x as `dtype` again (a bitcast where it was stored as bits)."""
    return x if x.dtype == dtype else lax.bitcast_convert_type(x, dtype)


def group_heads(x_BTHD, num_kv_heads):
    b, t, h, d = x_BTHD.shape
    return x_BTHD.reshape(b, t, num_kv_heads, h // num_kv_heads, d)


def acc_dtype(cfg):
    return jnp.promote_types(cfg.dtype, jnp.float32)


def _tile(x, n, block, dtype):
    """Block n of x along axis 1, as `dtype` (see `to_storage`)."""
    return from_storage(lax.dynamic_slice_in_dim(x, n * block, block, 1), dtype)


def _rows(x_BQKGD):
    b, q, k, g, d = x_BQKGD.shape
    return jnp.moveaxis(x_BQKGD, 1, 3).reshape(b, k, g * q, d)


def _unrows(x_BKRD, g):
    b, k, r, d = x_BKRD.shape
    return jnp.moveaxis(x_BKRD.reshape(b, k, g, r // g, d), 3, 1)


def _rows_stat(x_BKGQ):
    b, k, g, q = x_BKGQ.shape
    return x_BKGQ.reshape(b, k, g * q)


def _unrows_stat(x_BKR, g):
    b, k, r = x_BKR.shape
    return x_BKR.reshape(b, k, g, r // g)


def _rows_mask(vis_BQS, g):
    b, q, s = vis_BQS.shape
    return jnp.broadcast_to(vis_BQS[:, None, None], (b, 1, g, q, s)).reshape(b, 1, g * q, s)


def _tile_mask(cfg, qs: Side, ks: Side, i, j):
    """Visibility [B|1, bq, bk] of tile (i, j), padded keys masked."""
    bq, bk = cfg.block_q, cfg.block_k
    sl = lambda x, n, b: None if x is None else lax.dynamic_slice_in_dim(x, n * b, b, 1)  # noqa: E731
    vis = masks.token_visible(
        cfg.spec, sl(qs.pos, i, bq), sl(ks.pos, j, bk), sl(qs.seg, i, bq), sl(ks.seg, j, bk)
    )
    if cfg.kv_padded:
        vis &= (j * bk + jnp.arange(bk) < cfg.kv_len)[None, None, :]
    return vis


def _state(cfg, qs: Side, ks: Side, i, j):
    state = masks.tile_state(
        cfg.spec, masks.index_ranges(qs.ranges, i), masks.index_ranges(ks.ranges, j)
    )
    if cfg.kv_padded:
        last = j == ks.pos.shape[1] // cfg.block_k - 1
        state = jnp.where(last & (state == FULL), PARTIAL, state)
    return state


def _report(cfg, which, qs: Side, ks: Side, i, j, masked):
    if cfg.tile_callback is not None:
        first = lambda side, n, b: side.pos[0, n * b]  # noqa: E731
        q0, k0 = first(qs, i, cfg.block_q), first(ks, j, cfg.block_k)
        jax.debug.callback(cfg.tile_callback, which, q0, k0, masked, ordered=False)


def _switch(state, skip, full, partial, *operands):
    """lax.switch on SKIP/FULL/PARTIAL, with the branch order tied to the constants."""
    branches = [None] * 3
    branches[SKIP], branches[FULL], branches[PARTIAL] = skip, full, partial
    return lax.switch(state, branches, *operands)


def _pin_masks(q, qs: Side, ks: Side):
    """Tie the mask inputs (positions, segment ids) to q through an optimization barrier.

    Under a loop whose body they do not change (a scan over layers: every layer sees the same
    positions), XLA's loop-invariant code motion would otherwise hoist every tile's mask out of
    the loop and materialise all of them at once: [tiles, block_q, block_k] for the whole
    sequence, O(T^2) memory (measured: 270 MiB instead of 42 at T=4096 under a 2-step scan)."""
    _, qs, ks = lax.optimization_barrier((q, qs, ks))
    return qs, ks


def fwd_pass(cfg: Config, q_BTKGD, k_BSKD, v_BSKE, qs: Side, ks: Side, o_BTKGE, lse_BKGT):
    """Continue the softmax state (o, lse) of every query with the keys k/v (E: v's head dim)."""
    qs, ks = _pin_masks(q_BTKGD, qs, ks)
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk = q_BTKGD.shape[1] // bq, k_BSKD.shape[1] // bk
    acc_dtype = o_BTKGE.dtype
    g = q_BTKGD.shape[3]

    def q_block(i, carry):
        o_BTKGE, lse_BKGT = carry
        q_ = _rows(_tile(q_BTKGD, i, bq, cfg.dtype))
        # Wide floats take the softmax scale here, once a query block (fused into its copy):
        # the scores then come straight out of the product, where XLA:CPU otherwise wrote them
        # once more, scaled, for the row max and the exponential to read. (Narrow floats keep
        # the scale on the f32 scores: scaling q in bf16 would round it once more.)
        scale = cfg.scale
        if jnp.dtype(cfg.dtype).itemsize >= 4:
            q_, scale = q_ * jnp.asarray(scale, q_.dtype), 1.0
        # (o, lse) is the flash state (acc = o, max = lse, sum = 1): continuing it is exact. A
        # query that saw nothing has lse = LSE_NONE, which any real score replaces (corr = 0).
        acc = _rows(lax.dynamic_slice_in_dim(o_BTKGE, i * bq, bq, 1))
        m = _rows_stat(lax.dynamic_slice_in_dim(lse_BKGT, i * bq, bq, 3))

        def tile(j, carry, masked):
            _report(cfg, "fwd", qs, ks, i, j, masked)
            acc, m, den = carry
            k_ = _tile(k_BSKD, j, bk, cfg.dtype)
            v_ = _tile(v_BSKE, j, bk, cfg.dtype)
            qk = jnp.einsum("bkrd,bskd->bkrs", q_, k_, preferred_element_type=acc_dtype)
            s, _ = logits(qk, scale, cfg.soft_cap)
            if masked:
                s = jnp.where(_rows_mask(_tile_mask(cfg, qs, ks, i, j), g), s, LSE_NONE)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            if masked:  # a row that sees nothing yet has m_new = LSE_NONE = s: p must be 0
                p = jnp.where(s > 0.5 * LSE_NONE, p, 0.0)
            corr = jnp.exp(m - m_new)
            pv = jnp.einsum(
                "bkrs,bskd->bkrd", p.astype(cfg.dtype), v_, preferred_element_type=acc_dtype
            )
            return acc * corr[..., None] + pv, m_new, den * corr + p.sum(-1)

        def kv_block(j, carry):
            return _switch(
                _state(cfg, qs, ks, i, j),
                lambda j, c: c,
                functools.partial(tile, masked=False),
                functools.partial(tile, masked=True),
                j,
                carry,
            )

        acc, m, den = lax.fori_loop(0, nk, kv_block, (acc, m, jnp.ones_like(m)))
        o_ = _unrows(acc / den[..., None], g)  # den >= 1 from the state's own pseudo-key
        lse_ = m + jnp.log(den)
        o_BTKGE = lax.dynamic_update_slice_in_dim(o_BTKGE, o_, i * bq, 1)
        lse_BKGT = lax.dynamic_update_slice_in_dim(lse_BKGT, _unrows_stat(lse_, g), i * bq, 3)
        return o_BTKGE, lse_BKGT

    return lax.fori_loop(0, nq, q_block, (o_BTKGE, lse_BKGT))


def bwd_pass(cfg: Config, q_BTKGD, k_BSKD, v_BSKE, do_BTKGE, lse_BKGT, delta_BKGT, qs, ks, grads):
    """Add this k/v's contributions to (dq, dk, dv), all f32 and without the softmax scale.

    `lse` has -LSE_NONE for queries that see nothing (p = 0); `delta` = rowsum(do * o) - dlse.
    """
    qs, ks = _pin_masks(q_BTKGD, qs, ks)
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk = q_BTKGD.shape[1] // bq, k_BSKD.shape[1] // bk
    acc_dtype = lse_BKGT.dtype
    dt = cfg.dtype
    g = q_BTKGD.shape[3]

    def kv_block(j, carry):
        dq_BTKGD, dk_BSKD, dv_BSKE = carry
        k_BSKD_ = _tile(k_BSKD, j, bk, cfg.dtype)
        v_BSKE_ = _tile(v_BSKE, j, bk, cfg.dtype)

        def tile(i, carry, masked):
            _report(cfg, "bwd", qs, ks, i, j, masked)
            dk_, dv_ = carry
            # Rows are (query head in group, query) pairs: [B, K, G * bq, D], so that every dot
            # is a plain batched matmul over KV heads (no size-1 group dim for XLA to lay out).
            q_ = _rows(_tile(q_BTKGD, i, bq, cfg.dtype))
            do_ = _rows(_tile(do_BTKGE, i, bq, cfg.dtype))
            lse_ = _rows_stat(lax.dynamic_slice_in_dim(lse_BKGT, i * bq, bq, 3))[..., None]
            delta_ = _rows_stat(lax.dynamic_slice_in_dim(delta_BKGT, i * bq, bq, 3))[..., None]
            qk = jnp.einsum("bkqd,bskd->bkqs", q_, k_BSKD_, preferred_element_type=acc_dtype)
            s, t = logits(qk, cfg.scale, cfg.soft_cap)
            p = jnp.exp(s - lse_)
            if masked:
                p = jnp.where(_rows_mask(_tile_mask(cfg, qs, ks, i, j), g), p, 0.0)
            dp = jnp.einsum("bkqd,bskd->bkqs", do_, v_BSKE_, preferred_element_type=acc_dtype)
            ds = p * (dp - delta_)
            if t is not None:  # the soft cap's slope
                ds = ds * (1.0 - t * t)
            ds = ds.astype(dt)
            dv_ = dv_ + jnp.einsum(
                "bkqs,bkqd->bskd", p.astype(dt), do_, preferred_element_type=acc_dtype
            )
            dk_ = dk_ + jnp.einsum("bkqs,bkqd->bskd", ds, q_, preferred_element_type=acc_dtype)
            dq_ = jnp.einsum("bkqs,bskd->bkqd", ds, k_BSKD_, preferred_element_type=acc_dtype)
            return _unrows(dq_, g), (dk_, dv_)

        def q_block(i, carry):
            # The switch returns only tile-sized values: carrying the whole dq through it would
            # make XLA copy dq on every iteration, skipped tiles included.
            dq_BTKGD, dkv = carry
            dq_tile = jnp.zeros_like(dq_BTKGD, shape=(dq_BTKGD.shape[0], bq, *dq_BTKGD.shape[2:]))
            dq_tile, dkv = _switch(
                _state(cfg, qs, ks, i, j),
                lambda i, c: (dq_tile, c),
                functools.partial(tile, masked=False),
                functools.partial(tile, masked=True),
                i,
                dkv,
            )
            dq_tile = lax.dynamic_slice_in_dim(dq_BTKGD, i * bq, bq, 1) + dq_tile
            return lax.dynamic_update_slice_in_dim(dq_BTKGD, dq_tile, i * bq, 1), dkv

        dkv = (
            lax.dynamic_slice_in_dim(dk_BSKD, j * bk, bk, 1),
            lax.dynamic_slice_in_dim(dv_BSKE, j * bk, bk, 1),
        )
        dq_BTKGD, (dk_, dv_) = lax.fori_loop(0, nq, q_block, (dq_BTKGD, dkv))
        dk_BSKD = lax.dynamic_update_slice_in_dim(dk_BSKD, dk_, j * bk, 1)
        dv_BSKE = lax.dynamic_update_slice_in_dim(dv_BSKE, dv_, j * bk, 1)
        return dq_BTKGD, dk_BSKD, dv_BSKE

    return lax.fori_loop(0, nk, kv_block, grads)


# Default tiles per platform, when a call gives block_q / block_k = None. GPU: on one H200
# (bf16, D = 128, T = 8K, fwd+bwd) 1024 x 1024 tiles ran 2.4x faster than 512 x 512
# (experiments/results/gpu_h200_core.txt): bigger dots amortise the loop. CPU: 512, of 128 / 256 /
# 512 / 1024 the fastest on the 2-core machine for blockwise at 2K and 4K tokens (forward and
# forward + backward; 128 is 1.5-1.8x slower) and for the ring's forward + backward over 8
# devices at 8K; the ring's forward alone ran 10% faster with 128 (experiments/block_sizes.py,
# experiments/results/real_model/finetune/block_sizes.jsonl). TPU: 512 (unmeasured here).
BLOCKS = {"gpu": 1024, "cpu": 512, "tpu": 512}


@dataclasses.dataclass(frozen=True)
class Xla(Kernel):
    """The XLA kernel (module docstring); its tiles are the calls' block_q / block_k, or
    `block` (the platform's default, BLOCKS) where a call gives None."""

    name: ClassVar[str] = "xla"
    block: int = 512

    def blocks(self, block_q, block_k, q_len, kv_len):
        return min(block_q or self.block, q_len), min(block_k or self.block, kv_len)

    def store_q(self, q_BTHD, num_kv_heads):
        return to_storage(group_heads(q_BTHD, num_kv_heads))

    def store_kv(self, x_BSKD):
        return to_storage(x_BSKD)

    def init_state(self, cfg, q_BTKGD, v_BSKE):
        """(o = 0 [B, T, K, G, E], lse = LSE_NONE [B, K, G, T]); *_like keeps the inputs'
        shard_map varying-axes type."""
        acc = acc_dtype(cfg)
        lse_BTKG = jnp.full_like(q_BTKGD[..., 0], LSE_NONE, dtype=acc)
        o = jnp.zeros_like(q_BTKGD[..., :1], dtype=acc)
        return jnp.broadcast_to(o, (*o.shape[:-1], v_BSKE.shape[-1])), jnp.moveaxis(lse_BTKG, 1, 3)

    def fwd_pass(self, cfg, q_, k_, v_, qs, ks, state):
        return fwd_pass(cfg, q_, k_, v_, qs, ks, *state)

    def finish_fwd(self, cfg, q, state):
        o_BTKGE, lse_BKGT = state
        b, t, h, _ = q.shape
        o = o_BTKGE[:, :t].reshape(b, t, h, o_BTKGE.shape[-1])
        return o, lse_BKGT[..., :t].reshape(b, h, t)

    def prepare_bwd(self, cfg, q, k, b):
        """(do_BTKGE, lse, delta): do grouped like q, lse and delta [B, K, G, T], padded."""
        kh = k.shape[2]
        acc = acc_dtype(cfg)
        stat = lambda x: x.astype(acc).reshape(x.shape[0], kh, -1, x.shape[-1])  # noqa: E731
        pad_t = lambda x: pad_to_block(stat(x), cfg.block_q, axis=3)  # noqa: E731
        do_ = group_heads(b.dout.astype(cfg.dtype), kh)
        return to_storage(pad_to_block(do_, cfg.block_q)), pad_t(b.lse), pad_t(b.delta)

    def init_grads(self, cfg, q_, k_, v_):
        return tuple(jnp.zeros_like(x, dtype=acc_dtype(cfg)) for x in (q_, k_, v_))

    def bwd_pass(self, cfg, q_, k_, v_, bwd, qs, ks, grads):
        return bwd_pass(cfg, q_, k_, v_, *bwd, qs, ks, grads)

    def finish_bwd(self, cfg, q, k, v, grads):
        dq_BTKGD, dk_BSKD, dv_BSKE = grads
        t, s = q.shape[1], k.shape[1]
        dq = (dq_BTKGD[:, :t] * cfg.scale).reshape(q.shape).astype(q.dtype)
        dk = (dk_BSKD[:, :s] * cfg.scale).astype(k.dtype)
        return dq, dk, dv_BSKE[:, :s].astype(v.dtype)
