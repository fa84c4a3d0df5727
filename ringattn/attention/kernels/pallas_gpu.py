"""Our fused attention kernel for GPUs: Pallas with the Triton lowering (also runs on CPU with
`interpret=True`, which is how the tests check it).

Three pallas_calls, all on [B, L, heads, D] arrays as they come (GQA reads KV head h // G; K/V
are never repeated):

  forward   grid (q blocks, B, H): a q block streams the key blocks with an online softmax in
            base 2 and writes out and the natural-log lse [B, H, T] in f32. It can *continue* a
            softmax state (o, lse) passed in (aliased to the outputs), as a ring step does.
  dK/dV     grid (k blocks, B, K): a key block streams the q blocks of all G query heads that
            share its KV head, so the group reduction happens in registers, without atomics.
  dQ        grid (q blocks, B, H): a q block streams the key blocks.

Masks come from positions and segment ids. Per (q block, key block) a tile state is decided
before the kernels run (masks.tile_state on per-block ranges): each program loops only over the
run [lo, hi) of blocks that are not skipped, and applies no mask to FULL tiles. delta =
rowsum(do * o) - dlse is the usual pre-pass, done by XLA (a fused elementwise + reduction).
Gradients are f32 and without the softmax scale, like the XLA kernel's (blockwise.bwd_pass).

`pl.program_id` is read at the top level of each kernel only, so interpret mode runs them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ringattn.attention import masks
from ringattn.attention.kernels import fused
from ringattn.attention.masks import FULL, PARTIAL, SKIP

try:  # the Triton-specific API; absent in a JAX without GPU Pallas support
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def _compiler_params(num_warps, num_stages):
    if plgpu is None:
        return None
    params = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    return params(num_warps=num_warps, num_stages=num_stages)


def _varying(x):
    """The shard_map axes x varies over (empty outside shard_map)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # JAX >= 0.10: manual axis types
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _match_varying(arrays):
    """All arrays varying over the union of their shard_map axes, the type of the outputs
    (in a ring, positions may be replicated while q is not)."""
    axes = frozenset().union(*map(_varying, arrays))
    cast = getattr(lax, "pcast", None)
    out = []
    for x in arrays:
        missing = tuple(sorted(axes - _varying(x)))
        if missing:
            x = cast(x, missing, to="varying") if cast else lax.pvary(x, missing)
        out.append(x)
    return out


def _struct(shape, like):
    """An f32 output of a pallas_call varying over the same shard_map axes as `like`."""
    aval = jax.typeof(like)
    mat = getattr(aval, "mat", None)
    if mat is not None and not mat.empty:
        return jax.ShapeDtypeStruct(shape, jnp.float32, manual_axis_type=mat)
    vma = getattr(aval, "vma", None)  # older JAX
    if vma:
        return jax.ShapeDtypeStruct(shape, jnp.float32, vma=vma)
    return jax.ShapeDtypeStruct(shape, jnp.float32)


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

    def fwd_pass(self, cfg, q_, k_, v_, qs, ks, o, lse):
        return forward(self, cfg, q_, k_, v_, qs, ks, state=(o, lse))

    def attend_bwd(self, cfg, q_, k_, v_, do_, lse_, aux, qs, ks):
        return backward(self, cfg, q_, k_, v_, do_, lse_, aux.delta, qs, ks)

    def bwd_pass(self, cfg, q_, k_, v_, do_, lse_, aux, qs, ks, grads):
        return backward(self, cfg, q_, k_, v_, do_, lse_, aux.delta, qs, ks, grads)


# ---------------------------------------------------------------------------------------------
# Tile tables: which (q block, key block) tiles each program visits and masks.


class _Tables:
    """state [B, nq, nk] (SKIP/FULL/PARTIAL) and the run [lo, hi) of non-skipped blocks per q
    block (`q_bounds` [B, nq, 2]) and per key block (`k_bounds` [B, nk, 2]); None without a mask."""

    def __init__(self, cfg, qs, ks, bq, bk, batch):
        def ranges(pos, seg, block, axis):
            def lo_hi(x):
                x = x.reshape(x.shape[0], -1, block)
                return (jnp.expand_dims(x.min(-1), axis), jnp.expand_dims(x.max(-1), axis))

            seg_r = lo_hi(seg) if seg is not None else (None, None)
            return masks.Ranges(*lo_hi(pos), *seg_r)

        nq, nk = qs.pos.shape[1] // bq, ks.pos.shape[1] // bk
        state = masks.tile_state(
            cfg.spec, ranges(qs.pos, qs.seg, bq, 2), ranges(ks.pos, ks.seg, bk, 1)
        )
        state = jnp.broadcast_to(state, (batch, nq, nk))
        padded = (jnp.arange(nk) + 1) * bk > cfg.kv_len  # key blocks holding padding
        self.state = jnp.where(padded & (state == FULL), PARTIAL, state).astype(jnp.int32)
        self.q_bounds = _bounds(self.state != SKIP, axis=2)
        self.k_bounds = _bounds(self.state != SKIP, axis=1)


def _bounds(visible, axis):
    n = visible.shape[axis]
    any_ = visible.any(axis)
    lo = jnp.argmax(visible, axis)
    hi = n - jnp.argmax(jnp.flip(visible, axis), axis)
    return jnp.stack([jnp.where(any_, lo, 0), jnp.where(any_, hi, 0)], -1).astype(jnp.int32)


def _has_mask(cfg, qs):
    return cfg.spec.causal or cfg.spec.window is not None or qs.seg is not None or cfg.kv_padded


def _visible(spec, kv_len, q_pos, kv_pos, q_seg, kv_seg, k_start, bk):
    vis = masks.token_visible(spec, q_pos, kv_pos, q_seg, kv_seg)
    return vis & (k_start + lax.broadcasted_iota(jnp.int32, (1, bk), 1) < kv_len)


def _dot(a, b, contract=(1, 1)):
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _pad_head_dim(x):
    """Head dims that Triton cannot tile (not a power of 2, or < 16) are padded with zeros."""
    d = x.shape[-1]
    dp = max(16, pl.next_power_of_2(d))
    return x if dp == d else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dp - d)])


class _Call:
    """Named inputs of a pallas_call, in order, with their BlockSpecs; absent ones left out."""

    def __init__(self):
        self.names, self.arrays, self.specs = [], [], []

    def add(self, name, x, block, index_map):
        if x is not None:
            self.names.append(name)
            self.arrays.append(x)
            self.specs.append(pl.BlockSpec(block, index_map))

    def index(self, name):
        return self.names.index(name)

    def __call__(self, kern, body, grid, out_shapes, out_specs, aliases, label, **static):
        """Run `body(refs, *out_refs, **static)` on the grid; f32 outputs of `out_shapes`."""
        n_in = len(self.names)
        arrays = _match_varying(self.arrays)

        def kernel(*refs):
            body(dict(zip(self.names, refs[:n_in], strict=True)), *refs[n_in:], **static)

        return pl.pallas_call(
            kernel,
            grid=grid,
            in_specs=self.specs,
            out_specs=out_specs,
            out_shape=tuple(_struct(shape, arrays[0]) for shape in out_shapes),
            input_output_aliases=aliases,
            compiler_params=None if kern.interpret else _compiler_params(*_launch(kern, label)),
            interpret=kern.interpret,
            name=f"ringattn_{label}",
        )(*arrays)


def _launch(kern, label):
    warps = kern.num_warps
    if warps is None:
        warps = 8 if label == "fwd" and kern.block_q >= 128 else 4
    return warps, kern.num_stages


# ---------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(r, o_ref, lse_ref, *, spec, scale, bk, kv_len, nk, masked, has_state):
    q = r["q"][...]
    bq = q.shape[0]
    c = scale * LOG2E
    if has_state:
        acc = r["o_in"][...].astype(jnp.float32)
        m = r["lse_in"][...] * LOG2E  # the state as one pseudo-key: score lse, value o, sum 1
        den = jnp.ones((bq,), jnp.float32)
    else:
        acc = jnp.zeros(q.shape, jnp.float32)
        m = jnp.full((bq,), -jnp.inf, jnp.float32)
        den = jnp.zeros((bq,), jnp.float32)
    if masked:
        q_pos = r["q_pos"][...]
        q_seg = _load(r, "q_seg")
        lo, hi = r["bounds"][0], r["bounds"][1]
    else:
        lo, hi = 0, nk

    def body(j, carry):
        acc, m, den = carry
        start = pl.multiple_of(j * bk, bk)
        k = r["k"][pl.ds(start, bk), :]
        v = r["v"][pl.ds(start, bk), :]
        s = _dot(q, k) * c
        if masked:
            kv_pos, kv_seg = r["kv_pos"][pl.ds(start, bk)], _load(r, "kv_seg", pl.ds(start, bk))
            vis = _visible(spec, kv_len, q_pos, kv_pos, q_seg, kv_seg, start, bk)
            s = lax.cond(
                r["state"][j] == FULL, lambda s: s, lambda s: jnp.where(vis, s, -jnp.inf), s
            )
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp2(s - m_safe[:, None])
        corr = jnp.exp2(m - m_safe)
        acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v, (1, 0))
        return acc, m_new, den * corr + p.sum(-1)

    acc, m, den = lax.fori_loop(lo, hi, body, (acc, m, den))
    seen = den > 0
    den = jnp.where(seen, den, 1.0)
    o_ref[...] = (acc / den[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, (m + jnp.log2(den)) * LN2, -jnp.inf)


def forward(kern, cfg, q_, k_, v_, qs, ks, state=None):
    """(o f32 [B, Tp, H, D], lse f32 [B, H, Tp]) over the keys k_/v_, continuing `state`."""
    b, tp, h, d = q_.shape
    sp, kh = k_.shape[1], k_.shape[2]
    g = h // kh
    bq, bk = min(kern.block_q, tp), min(kern.block_k, sp)
    nq, nk = tp // bq, sp // bk
    q_, k_, v_ = (_pad_head_dim(x) for x in (q_, k_, v_))
    dp = q_.shape[-1]
    masked = _has_mask(cfg, qs)
    call = _Call()
    call.add("q", q_, (None, bq, None, dp), lambda i, bb, hh: (bb, i, hh, 0))
    call.add("k", k_, (None, sp, None, dp), lambda i, bb, hh: (bb, 0, hh // g, 0))
    call.add("v", v_, (None, sp, None, dp), lambda i, bb, hh: (bb, 0, hh // g, 0))
    if masked:
        tab = _Tables(cfg, qs, ks, bq, bk, b)
        pq, pk = qs.pos.shape[0], ks.pos.shape[0]
        call.add("q_pos", qs.pos, (None, bq), lambda i, bb, hh: (bb if pq > 1 else 0, i))
        call.add("kv_pos", ks.pos, (None, sp), lambda i, bb, hh: (bb if pk > 1 else 0, 0))
        call.add("q_seg", qs.seg, (None, bq), lambda i, bb, hh: (bb, i))
        call.add("kv_seg", ks.seg, (None, sp), lambda i, bb, hh: (bb, 0))
        call.add("state", tab.state, (None, None, nk), lambda i, bb, hh: (bb, i, 0))
        call.add("bounds", tab.q_bounds, (None, None, 2), lambda i, bb, hh: (bb, i, 0))
    aliases = {}
    if state is not None:
        o, lse = state
        call.add("o_in", _pad_head_dim(o), (None, bq, None, dp), lambda i, bb, hh: (bb, i, hh, 0))
        call.add("lse_in", lse, (None, None, bq), lambda i, bb, hh: (bb, hh, i))
        aliases = {call.index("o_in"): 0, call.index("lse_in"): 1}
    o, lse = call(
        kern,
        _fwd_kernel,
        grid=(nq, b, h),
        out_shapes=((b, tp, h, dp), (b, h, tp)),
        out_specs=(
            pl.BlockSpec((None, bq, None, dp), lambda i, bb, hh: (bb, i, hh, 0)),
            pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i)),
        ),
        aliases=aliases,
        label="fwd",
        spec=cfg.spec,
        scale=cfg.scale,
        bk=bk,
        kv_len=cfg.kv_len,
        nk=nk,
        masked=masked,
        has_state=state is not None,
    )
    return o[..., :d], lse


# ---------------------------------------------------------------------------------------------
# Backward.


def _tile_p(q, k, lse, c, mask_args, state):
    """Probabilities p = exp(s - lse) of one tile, masked (`_visible(*mask_args)`) unless the
    tile is FULL; mask_args is None without a mask."""
    p = jnp.exp2(_dot(q, k) * c - lse[:, None])
    if mask_args is None:
        return p
    vis = _visible(*mask_args)
    return lax.cond(state == FULL, lambda p: p, lambda p: jnp.where(vis, p, 0.0), p)


def _load(r, name, sl=slice(None)):
    return r[name][sl] if name in r else None


def _dkv_kernel(r, dk_ref, dv_ref, *, spec, scale, bq, bk, kv_len, nq, g, masked, has_grads):
    j = pl.program_id(0)  # the key block
    k_start = pl.multiple_of(j * bk, bk)
    k, v = r["k"][...], r["v"][...]
    c = scale * LOG2E
    dk = r["dk_in"][...] if has_grads else jnp.zeros(k.shape, jnp.float32)
    dv = r["dv_in"][...] if has_grads else jnp.zeros(v.shape, jnp.float32)
    if masked:
        kv_pos, kv_seg = r["kv_pos"][...], _load(r, "kv_seg")
        lo, hi = r["bounds"][0], r["bounds"][1]
    else:
        lo, hi = 0, nq

    def over_q(i, carry, gi):
        dk, dv = carry
        q_sl = pl.ds(pl.multiple_of(i * bq, bq), bq)
        q, do = r["q"][q_sl, gi, :], r["do"][q_sl, gi, :]
        lse, delta = r["lse"][gi, q_sl] * LOG2E, r["delta"][gi, q_sl]
        mask_args, state = None, None
        if masked:
            q_pos, q_seg = r["q_pos"][q_sl], _load(r, "q_seg", q_sl)
            mask_args = (spec, kv_len, q_pos, kv_pos, q_seg, kv_seg, k_start, bk)
            state = r["state"][i]
        p = _tile_p(q, k, lse, c, mask_args, state)
        dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
        ds = p * (_dot(do, v) - delta[:, None])
        return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv

    def over_group(gi, carry):  # the G query heads that share this KV head
        return lax.fori_loop(lo, hi, functools.partial(over_q, gi=gi), carry)

    dk, dv = lax.fori_loop(0, g, over_group, (dk, dv))
    dk_ref[...] = dk
    dv_ref[...] = dv


def _dq_kernel(r, dq_ref, *, spec, scale, bk, kv_len, nk, masked, has_grads):
    q, do = r["q"][...], r["do"][...]
    lse, delta = r["lse"][...] * LOG2E, r["delta"][...]
    c = scale * LOG2E
    dq = r["dq_in"][...] if has_grads else jnp.zeros(q.shape, jnp.float32)
    if masked:
        q_pos, q_seg = r["q_pos"][...], _load(r, "q_seg")
        lo, hi = r["bounds"][0], r["bounds"][1]
    else:
        lo, hi = 0, nk

    def body(j, dq):
        k_start = pl.multiple_of(j * bk, bk)
        k_sl = pl.ds(k_start, bk)
        k, v = r["k"][k_sl, :], r["v"][k_sl, :]
        mask_args, state = None, None
        if masked:
            kv_pos, kv_seg = r["kv_pos"][k_sl], _load(r, "kv_seg", k_sl)
            mask_args = (spec, kv_len, q_pos, kv_pos, q_seg, kv_seg, k_start, bk)
            state = r["state"][j]
        p = _tile_p(q, k, lse, c, mask_args, state)
        ds = p * (_dot(do, v) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, (1, 0))

    dq_ref[...] = lax.fori_loop(lo, hi, body, dq)


def backward(kern, cfg, q_, k_, v_, do_, lse_, delta, qs, ks, grads=None):
    """(dq, dk, dv) f32 and unscaled, plus `grads` if given (accumulated in place).

    lse_ has +inf where a query sees nothing (so p = 0), delta = rowsum(do * o) - dlse.
    """
    b, tp, h, d = q_.shape
    sp, kh = k_.shape[1], k_.shape[2]
    g = h // kh
    bq, bk = min(kern.block_q_bwd, tp), min(kern.block_k_bwd, sp)
    nq, nk = tp // bq, sp // bk
    q_, k_, v_, do_ = (_pad_head_dim(x) for x in (q_, k_, v_, do_))
    dp = q_.shape[-1]
    masked = _has_mask(cfg, qs)
    tab = _Tables(cfg, qs, ks, bq, bk, b) if masked else None
    pq, pk = qs.pos.shape[0], ks.pos.shape[0]
    grads = None if grads is None else tuple(_pad_head_dim(x) for x in grads)
    common = dict(spec=cfg.spec, scale=cfg.scale, kv_len=cfg.kv_len, masked=masked)

    # dK/dV: program (j, b, kv head).
    call = _Call()
    call.add("q", q_, (None, tp, g, dp), lambda j, bb, kk: (bb, 0, kk, 0))
    call.add("do", do_, (None, tp, g, dp), lambda j, bb, kk: (bb, 0, kk, 0))
    call.add("lse", lse_, (None, g, tp), lambda j, bb, kk: (bb, kk, 0))
    call.add("delta", delta, (None, g, tp), lambda j, bb, kk: (bb, kk, 0))
    call.add("k", k_, (None, bk, None, dp), lambda j, bb, kk: (bb, j, kk, 0))
    call.add("v", v_, (None, bk, None, dp), lambda j, bb, kk: (bb, j, kk, 0))
    if masked:
        call.add("q_pos", qs.pos, (None, tp), lambda j, bb, kk: (bb if pq > 1 else 0, 0))
        call.add("kv_pos", ks.pos, (None, bk), lambda j, bb, kk: (bb if pk > 1 else 0, j))
        call.add("q_seg", qs.seg, (None, tp), lambda j, bb, kk: (bb, 0))
        call.add("kv_seg", ks.seg, (None, bk), lambda j, bb, kk: (bb, j))
        call.add("state", tab.state, (None, nq, None), lambda j, bb, kk: (bb, 0, j))
        call.add("bounds", tab.k_bounds, (None, None, 2), lambda j, bb, kk: (bb, j, 0))
    kv_spec = pl.BlockSpec((None, bk, None, dp), lambda j, bb, kk: (bb, j, kk, 0))
    aliases = {}
    if grads is not None:
        call.add("dk_in", grads[1], (None, bk, None, dp), lambda j, bb, kk: (bb, j, kk, 0))
        call.add("dv_in", grads[2], (None, bk, None, dp), lambda j, bb, kk: (bb, j, kk, 0))
        aliases = {call.index("dk_in"): 0, call.index("dv_in"): 1}
    dk, dv = call(
        kern,
        _dkv_kernel,
        grid=(nk, b, kh),
        out_shapes=(k_.shape, v_.shape),
        out_specs=(kv_spec, kv_spec),
        aliases=aliases,
        label="dkv",
        bq=bq,
        bk=bk,
        nq=nq,
        g=g,
        has_grads=grads is not None,
        **common,
    )

    # dQ: program (i, b, head).
    call = _Call()
    call.add("q", q_, (None, bq, None, dp), lambda i, bb, hh: (bb, i, hh, 0))
    call.add("do", do_, (None, bq, None, dp), lambda i, bb, hh: (bb, i, hh, 0))
    call.add("lse", lse_, (None, None, bq), lambda i, bb, hh: (bb, hh, i))
    call.add("delta", delta, (None, None, bq), lambda i, bb, hh: (bb, hh, i))
    call.add("k", k_, (None, sp, None, dp), lambda i, bb, hh: (bb, 0, hh // g, 0))
    call.add("v", v_, (None, sp, None, dp), lambda i, bb, hh: (bb, 0, hh // g, 0))
    if masked:
        call.add("q_pos", qs.pos, (None, bq), lambda i, bb, hh: (bb if pq > 1 else 0, i))
        call.add("kv_pos", ks.pos, (None, sp), lambda i, bb, hh: (bb if pk > 1 else 0, 0))
        call.add("q_seg", qs.seg, (None, bq), lambda i, bb, hh: (bb, i))
        call.add("kv_seg", ks.seg, (None, sp), lambda i, bb, hh: (bb, 0))
        call.add("state", tab.state, (None, None, nk), lambda i, bb, hh: (bb, i, 0))
        call.add("bounds", tab.q_bounds, (None, None, 2), lambda i, bb, hh: (bb, i, 0))
    aliases = {}
    if grads is not None:
        call.add("dq_in", grads[0], (None, bq, None, dp), lambda i, bb, hh: (bb, i, hh, 0))
        aliases = {call.index("dq_in"): 0}
    (dq,) = call(
        kern,
        _dq_kernel,
        grid=(nq, b, h),
        out_shapes=(q_.shape,),
        out_specs=(pl.BlockSpec((None, bq, None, dp), lambda i, bb, hh: (bb, i, hh, 0)),),
        aliases=aliases,
        label="dq",
        bk=bk,
        nk=nk,
        has_grads=grads is not None,
        **common,
    )
    return dq[..., :d], dk[..., :d], dv[..., :d]
