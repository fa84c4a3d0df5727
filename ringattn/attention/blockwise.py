"""Flash-style blockwise attention in pure JAX: online softmax forward, fused tiled backward.

The two passes below are the single-device kernel every ring step calls. They work on arrays
padded to whole blocks, with queries grouped by KV head (q_BTKGD: G = H // K query heads share a
KV head, so K/V are never repeated), and *continue* accumulators instead of returning fresh ones:

  forward:  (o, lse) -> (o, lse) after also attending to this k/v      [o f32, normalised]
  backward: (dq, dk, dv) -> (dq, dk, dv) plus this k/v's contributions   [f32, unscaled]

so a ring accumulates in place, with no full-size temporary per step. Tiles that the mask rules
out are not computed and fully visible tiles apply no mask (masks.tile_state).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ringattn.attention import inputs, masks
from ringattn.attention.masks import FULL, PARTIAL, SKIP, MaskSpec, Ranges


@dataclasses.dataclass(frozen=True)
class Config:
    """Static kernel settings; `kv_len` valid keys per k/v shard (its padded tail is masked)."""

    spec: MaskSpec
    scale: float
    block_q: int
    block_k: int
    kv_len: int
    dtype: jnp.dtype  # of q, k, v (which may be stored as bits, see `to_storage`)
    # Called on the host as f(pass, q_pos, kv_pos, masked) for every tile a pass computes, with
    # the first position of its query and key blocks: for tests and drawing schedules.
    tile_callback: Callable | None = None
    # A fused kernel (kernels/), whose passes replace this module's; None: this module's.
    kernel: object = None

    @property
    def kv_padded(self) -> bool:
        return self.kv_len % self.block_k != 0


class Side(NamedTuple):
    """Positions [P, L] and segments [B, L] of one side, padded to whole blocks, with ranges."""

    pos: jax.Array
    seg: jax.Array | None
    ranges: Ranges


def pad_to_block(x, block, axis=1, mode="constant"):
    pad = -x.shape[axis] % block
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, mode=mode)


def make_side(pos, seg, block) -> Side:
    # Edge padding keeps the padded tokens inside the real ranges, so no tile looks wider.
    pos = pad_to_block(pos, block, mode="edge")
    seg = None if seg is None else pad_to_block(seg, block, mode="edge")
    return Side(pos, seg, masks.block_ranges(pos, seg, block))


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


def to_storage(x):
    """Narrow floats (bf16, f16) as same-width unsigned ints; other arrays unchanged.

    XLA:CPU computes bf16 dots in f32, and on a whole loop-invariant bf16 array it hoists that
    conversion out of the tile loop, adding a full-size f32 copy of q, k, v and do. Integer bits
    cannot be converted early, so kernels keep narrow operands as bits and reinterpret each tile
    (`_tile`). Elsewhere the bitcasts are free.
    """
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4:
        return lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    return x


def _tile(x, n, block, dtype):
    """Block n of x along axis 1, as `dtype` (see `to_storage`)."""
    t = lax.dynamic_slice_in_dim(x, n * block, block, 1)
    return t if t.dtype == dtype else lax.bitcast_convert_type(t, dtype)


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


def fwd_pass(cfg: Config, q_BTKGD, k_BSKD, v_BSKD, qs: Side, ks: Side, o_BTKGD, lse_BKGT):
    """Continue the softmax state (o, lse) of every query with the keys k/v."""
    qs, ks = _pin_masks(q_BTKGD, qs, ks)
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk = q_BTKGD.shape[1] // bq, k_BSKD.shape[1] // bk
    acc_dtype = o_BTKGD.dtype
    g = q_BTKGD.shape[3]

    def q_block(i, carry):
        o_BTKGD, lse_BKGT = carry
        q_ = _rows(_tile(q_BTKGD, i, bq, cfg.dtype))
        # (o, lse) is the flash state (acc = o, max = lse, sum = 1): continuing it is exact.
        acc = _rows(lax.dynamic_slice_in_dim(o_BTKGD, i * bq, bq, 1))
        m = _rows_stat(lax.dynamic_slice_in_dim(lse_BKGT, i * bq, bq, 3))

        def tile(j, carry, masked):
            _report(cfg, "fwd", qs, ks, i, j, masked)
            acc, m, den = carry
            k_ = _tile(k_BSKD, j, bk, cfg.dtype)
            v_ = _tile(v_BSKD, j, bk, cfg.dtype)
            s = jnp.einsum("bkrd,bskd->bkrs", q_, k_, preferred_element_type=acc_dtype) * cfg.scale
            if masked:
                s = jnp.where(_rows_mask(_tile_mask(cfg, qs, ks, i, j), g), s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
            p = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(m - m_safe)
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
        seen = den > 0
        o_ = _unrows(acc / jnp.where(seen, den, 1.0)[..., None], g)
        lse_ = jnp.where(seen, m + jnp.log(jnp.where(seen, den, 1.0)), -jnp.inf)
        o_BTKGD = lax.dynamic_update_slice_in_dim(o_BTKGD, o_, i * bq, 1)
        lse_BKGT = lax.dynamic_update_slice_in_dim(lse_BKGT, _unrows_stat(lse_, g), i * bq, 3)
        return o_BTKGD, lse_BKGT

    return lax.fori_loop(0, nq, q_block, (o_BTKGD, lse_BKGT))


def bwd_pass(cfg: Config, q_BTKGD, k_BSKD, v_BSKD, do_BTKGD, lse_BKGT, delta_BKGT, qs, ks, grads):
    """Add this k/v's contributions to (dq, dk, dv), all f32 and without the softmax scale.

    `lse` must map -inf (queries that see nothing) to +inf so that their p is 0, not NaN;
    `delta` = rowsum(do * o) - dlse.
    """
    qs, ks = _pin_masks(q_BTKGD, qs, ks)
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk = q_BTKGD.shape[1] // bq, k_BSKD.shape[1] // bk
    acc_dtype = lse_BKGT.dtype
    dt = cfg.dtype
    g = q_BTKGD.shape[3]

    def kv_block(j, carry):
        dq_BTKGD, dk_BSKD, dv_BSKD = carry
        k_BSKD_ = _tile(k_BSKD, j, bk, cfg.dtype)
        v_BSKD_ = _tile(v_BSKD, j, bk, cfg.dtype)

        def tile(i, carry, masked):
            _report(cfg, "bwd", qs, ks, i, j, masked)
            dk_, dv_ = carry
            # Rows are (query head in group, query) pairs: [B, K, G * bq, D], so that every dot
            # is a plain batched matmul over KV heads (no size-1 group dim for XLA to lay out).
            q_ = _rows(_tile(q_BTKGD, i, bq, cfg.dtype))
            do_ = _rows(_tile(do_BTKGD, i, bq, cfg.dtype))
            lse_ = _rows_stat(lax.dynamic_slice_in_dim(lse_BKGT, i * bq, bq, 3))[..., None]
            delta_ = _rows_stat(lax.dynamic_slice_in_dim(delta_BKGT, i * bq, bq, 3))[..., None]
            s = jnp.einsum("bkqd,bskd->bkqs", q_, k_BSKD_, preferred_element_type=acc_dtype)
            p = jnp.exp(s * cfg.scale - lse_)
            if masked:
                p = jnp.where(_rows_mask(_tile_mask(cfg, qs, ks, i, j), g), p, 0.0)
            dp = jnp.einsum("bkqd,bskd->bkqs", do_, v_BSKD_, preferred_element_type=acc_dtype)
            ds = (p * (dp - delta_)).astype(dt)
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
            lax.dynamic_slice_in_dim(dv_BSKD, j * bk, bk, 1),
        )
        dq_BTKGD, (dk_, dv_) = lax.fori_loop(0, nq, q_block, (dq_BTKGD, dkv))
        dk_BSKD = lax.dynamic_update_slice_in_dim(dk_BSKD, dk_, j * bk, 1)
        dv_BSKD = lax.dynamic_update_slice_in_dim(dv_BSKD, dv_, j * bk, 1)
        return dq_BTKGD, dk_BSKD, dv_BSKD

    return lax.fori_loop(0, nk, kv_block, grads)


# ---------------------------------------------------------------------------------------------
# Single-device attention: one forward pass and one backward pass of the kernel above.


def group_heads(x_BTHD, num_kv_heads):
    b, t, h, d = x_BTHD.shape
    return x_BTHD.reshape(b, t, num_kv_heads, h // num_kv_heads, d)


def acc_dtype(cfg):
    return jnp.promote_types(cfg.dtype, jnp.float32)


def prepare(cfg, q, k, v, m: inputs.MaskArrays):
    """Kernel operands: q side, q_BTKGD and the k/v bundle (k, v, kv positions, kv segments),
    padded to whole blocks, narrow floats as bits. The k/v bundle is what a ring passes on."""
    qs = make_side(m.q_pos, m.q_seg, cfg.block_q)
    q_ = to_storage(pad_to_block(group_heads(q, k.shape[2]), cfg.block_q))
    kpos = pad_to_block(m.kv_pos, cfg.block_k, mode="edge")
    kseg = None if m.kv_seg is None else pad_to_block(m.kv_seg, cfg.block_k, mode="edge")
    k_, v_ = (to_storage(pad_to_block(x, cfg.block_k)) for x in (k, v))
    return qs, q_, (k_, v_, kpos, kseg)


def kv_side(cfg, kpos, kseg) -> Side:
    return Side(kpos, kseg, masks.block_ranges(kpos, kseg, cfg.block_k))


def init_fwd_state(cfg, q_BTKGD):
    """(o = 0, lse = -inf). *_like keeps the inputs' shard_map varying-axes type."""
    acc = acc_dtype(cfg)
    lse_BTKG = jnp.full_like(q_BTKGD[..., 0], -jnp.inf, dtype=acc)
    return jnp.zeros_like(q_BTKGD, dtype=acc), jnp.moveaxis(lse_BTKG, 1, 3)


def finish_fwd(cfg, q, o_BTKGD, lse_BKGT):
    """Unpad: out [B, T, H, D] in q's dtype, lse [B, H, T]."""
    b, t, h, d = q.shape
    return o_BTKGD[:, :t].reshape(b, t, h, d).astype(q.dtype), lse_BKGT[..., :t].reshape(b, h, t)


def prepare_bwd(cfg, k, out, lse, dout, dlse):
    """(do_BTKGD, lse, delta): lse with -inf -> +inf so that p = 0 there, never NaN, and
    delta = rowsum(do * o) - dlse; both [B, K, G, T] f32, padded like q."""
    b, t, h, _ = out.shape
    kh = k.shape[2]
    o_, do_ = group_heads(out, kh), group_heads(dout, kh)
    acc = acc_dtype(cfg)
    # An elementwise product and a reduction fuse into one loop: no f32 copy of do or o.
    delta = jnp.moveaxis(jnp.sum(do_.astype(acc) * o_.astype(acc), axis=-1), 1, 3)
    lse_ = lse.reshape(delta.shape)
    if dlse is not None:
        delta = delta - dlse.reshape(delta.shape)
    lse_ = jnp.where(lse_ == -jnp.inf, jnp.inf, lse_)
    pad_t = lambda x: pad_to_block(x, cfg.block_q, axis=3)  # noqa: E731
    do_ = to_storage(pad_to_block(do_.astype(cfg.dtype), cfg.block_q))
    return do_, pad_t(lse_), pad_t(delta)


def finish_bwd(cfg, q, k, v, dq_BTKGD, dk_BSKD, dv_BSKD):
    """Unpad, apply the softmax scale, cast to the input dtypes."""
    t, s = q.shape[1], k.shape[1]
    dq = (dq_BTKGD[:, :t] * cfg.scale).reshape(q.shape).astype(q.dtype)
    dk = (dk_BSKD[:, :s] * cfg.scale).astype(k.dtype)
    return dq, dk, dv_BSKD[:, :s].astype(v.dtype)


def attend(cfg, q_BTKGD, k_BSKD, v_BSKD, qs: Side, ks: Side):
    """One fresh forward pass: (o, lse) of the queries over the keys k/v."""
    return fwd_pass(cfg, q_BTKGD, k_BSKD, v_BSKD, qs, ks, *init_fwd_state(cfg, q_BTKGD))


def attend_bwd(cfg, q_BTKGD, k_BSKD, v_BSKD, do_BTKGD, lse_BKGT, delta_BKGT, qs, ks):
    """One fresh backward pass: (dq, dk, dv), f32 and unscaled."""
    grads = tuple(jnp.zeros_like(x, dtype=acc_dtype(cfg)) for x in (q_BTKGD, k_BSKD, v_BSKD))
    return bwd_pass(cfg, q_BTKGD, k_BSKD, v_BSKD, do_BTKGD, lse_BKGT, delta_BKGT, qs, ks, grads)


def kernel_ops(cfg):
    """The passes (prepare, fwd_pass, bwd_pass, ...) of cfg's kernel: this module's functions,
    or those of the fused kernel in cfg.kernel (kernels/fused.py), which have the same names."""
    return sys.modules[__name__] if cfg.kernel is None else cfg.kernel


def _fwd(cfg, q, k, v, m):
    ops = kernel_ops(cfg)
    qs, q_, (k_, v_, kpos, kseg) = ops.prepare(cfg, q, k, v, m)
    state = ops.attend(cfg, q_, k_, v_, qs, ops.kv_side(cfg, kpos, kseg))
    out, lse = ops.finish_fwd(cfg, q, *state)
    return (out, lse), (q, k, v, m, out, lse)


def _bwd(cfg, res, cts):
    q, k, v, m, out, lse = res
    ops = kernel_ops(cfg)
    qs, q_, (k_, v_, kpos, kseg) = ops.prepare(cfg, q, k, v, m)
    do_, lse_, delta = ops.prepare_bwd(cfg, k, out, lse, *cts)
    ks = ops.kv_side(cfg, kpos, kseg)
    grads = ops.attend_bwd(cfg, q_, k_, v_, do_, lse_, delta, qs, ks)
    return (*ops.finish_bwd(cfg, q, k, v, *grads), None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, m):
    return _fwd(cfg, q, k, v, m)[0]


def _attention_fwd(cfg, q, k, v, m):
    return _fwd(cfg, q, k, v, m)


_attention.defvjp(_attention_fwd, _bwd)


def check_blocks(fn, block_q, block_k):
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(b, int) or b <= 0:
            raise ValueError(f"{fn}: `{name}` must be a positive int, got {b!r}.")


def blockwise_attention(
    q,
    k,
    v,
    *,
    causal=False,
    local_window_size=None,
    segment_ids=None,
    kv_segment_ids=None,
    q_positions=None,
    kv_positions=None,
    scale=None,
    block_q=512,
    block_k=512,
    return_lse=False,
    tile_callback=None,
    kernel="auto",
):
    """Exact attention in O(T) memory, same arguments and results as `reference_attention`.

    Lengths need not be multiples of the block sizes. lse is natural-log, f32, [B, H, T].
    `tile_callback(pass, q_pos, kv_pos, masked)`, if given, runs on the host for every tile
    computed ("fwd" or "bwd"; first positions of the query and key blocks; masked: PARTIAL).
    `kernel`: "auto", "xla", "pallas_gpu", "cudnn", "pallas_tpu" or a kernel object
    (kernels/dispatch.py); block_q / block_k are the XLA kernel's tiles (fused kernels have
    their own).
    """
    fn = "blockwise_attention"
    spec, m, scale = inputs.check_and_normalize(
        fn,
        q,
        k,
        v,
        causal=causal,
        local_window_size=local_window_size,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_positions=q_positions,
        kv_positions=kv_positions,
        scale=scale,
    )
    check_blocks(fn, block_q, block_k)
    t, s = q.shape[1], k.shape[1]
    dtype = jnp.result_type(q, k, v)
    from ringattn.attention.kernels import dispatch  # kernels build on this module

    kern = dispatch.resolve(fn, kernel, dtype, q.shape[-1], t, s, tile_callback)
    bq, bk = dispatch.blocks(kern, block_q, block_k, t, s)
    cfg = Config(spec, scale, bq, bk, s, dtype, tile_callback, kern)
    out, lse = _attention(cfg, q.astype(dtype), k.astype(dtype), v.astype(dtype), m)
    return (out, lse) if return_lse else out
