"""TPU: JAX's splash attention for the steps it can express, our XLA kernel for the others.

Splash masks are static, so a step runs splash when its mask needs no positional offset: FULL
(every query sees every key), the causal diagonal (same increasing positions on both sides) and,
when the mask has no causal or window part, segments alone; segment ids go to splash as
`SegmentIds`. Other steps (offset windows, arbitrary positions) run the XLA blockwise kernel, as
do backward steps when dlse is nonzero (splash recomputes delta = rowsum(do * o) itself).

GQA runs splash's MQA kernel over each KV head's group of G query heads (vmapped over batch and
KV heads): K/V are not repeated. Splash takes no softmax scale, so q is scaled before it; its
backward is called with *our* residuals (the final out and lse of the ring), through the
private `_splash_attention_bwd`, checked by `problem`. On a non-TPU platform it runs in the TPU
interpreter (`interpret=True`), which is how the tests check it on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import ClassVar

import jax
import jax.numpy as jnp

from ringattn.attention.kernels import fused
from ringattn.attention.masks import LSE_NONE

_BLOCK = 128
# Splash's kernels lower for TPUs with 32-bit indices only: under jax_enable_x64 their loop index
# is i64 and Mosaic rejects its product with an i32 (found lowering for TPU on a CPU:
# tests/attention/kernels/lowering_test.py). Their operands are 32-bit or narrower, so they are
# traced with x64 off and nothing else changes.
_X32 = functools.partial(jax.enable_x64, False)


def _modules():
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel,
        splash_attention_mask,
    )

    return splash_attention_kernel, splash_attention_mask


@functools.cache
def _api_problem():
    try:
        sk, _ = _modules()
    except Exception as e:  # noqa: BLE001 - any import failure means: not available
        return f"cannot import splash attention ({e!r})"
    for name in ("_splash_attention_bwd", "_splash_attention_fwd", "make_splash_mqa"):
        if not hasattr(sk, name):
            return f"splash attention has no `{name}` (JAX changed)"
    names = list(inspect.signature(sk._splash_attention_fwd).parameters)
    if names[:4] != ["fwd_mask_info", "dq_mask_info", "dkv_mask_info", "q"]:
        return f"splash attention's residuals changed: {names}"
    return None


def problem(dtype, head_dim):
    """Why splash cannot run these inputs (None if it can)."""
    if not any(jnp.dtype(dtype) == jnp.dtype(t) for t in (jnp.float32, jnp.bfloat16)):
        return f"it takes float32/bfloat16 inputs, got {jnp.dtype(dtype).name}"
    return _api_problem()


@functools.cache
def _splash(kind, heads, q_len, kv_len, block_q, block_k, interpret):
    """The splash MQA kernel (with residuals) for a 'full' or 'causal' mask, cached."""
    sk, sm = _modules()
    shape = (q_len, kv_len)
    one = sm.FullMask(shape) if kind == "full" else sm.CausalMask(shape)
    mask = sm.MultiHeadMask([one] * heads)
    bq, bk = min(block_q, q_len), min(block_k, kv_len)
    sizes = sk.BlockSizes(bq, bk, bk, bq, bk, bk, bq, bk)
    with jax.ensure_compile_time_eval():  # concrete mask tables, even when built in a trace
        return sk.make_splash_mqa(
            mask,
            block_sizes=sizes,
            head_shards=1,
            q_seq_shards=1,
            save_residuals=True,
            interpret=interpret,
        )


def _heads_major(x_BLHD, kh, grouped=True):
    """[B, L, H, D] -> [B, K, G, L, D] (q side, `grouped`) or [B, K, L, D] (k/v side, H = K)."""
    b, length, h, d = x_BLHD.shape
    x = jnp.moveaxis(x_BLHD.reshape(b, length, kh, h // kh, d), 1, 3)
    return x if grouped else x[:, :, 0]


def _from_heads_major(x_BKGLD):
    b, kh, g, length, d = x_BKGLD.shape
    return jnp.moveaxis(x_BKGLD, 3, 1).reshape(b, length, kh * g, d)


@dataclasses.dataclass(frozen=True)
class PallasTpu(fused.FusedKernel):
    """Splash attention for the steps it expresses, XLA for the others (module docstring)."""

    name: ClassVar[str] = "pallas_tpu"
    block_q: int = _BLOCK
    block_k: int = _BLOCK
    interpret: bool = False

    @property
    def pad_q(self):
        return self.block_q

    @property
    def pad_k(self):
        return self.block_k

    def fit(self, q_len, kv_len):
        # Splash tiles keys in multiples of 128 lanes: no smaller blocks.
        cap = lambda b, n: min(b, max(_BLOCK, 1 << (n - 1).bit_length()))  # noqa: E731
        return dataclasses.replace(
            self, block_q=cap(self.block_q, q_len), block_k=cap(self.block_k, kv_len)
        )

    def supports(self, soft_cap, head_dim, v_head_dim):
        return fused.library_supports(soft_cap, head_dim, v_head_dim)

    def _segments_only(self, cfg):
        """Whether a PARTIAL step can only come from segment ids (splash takes those)."""
        return not cfg.spec.causal and cfg.spec.window is None and not cfg.kv_padded

    def _kernel(self, kind, q_, k_):
        g, (t, s) = q_.shape[2] // k_.shape[2], (q_.shape[1], k_.shape[1])
        return _splash(kind, g, t, s, self.block_q, self.block_k, self.interpret)

    def _run_fwd(self, kind, cfg, q_, k_, v_, qs, ks):
        """(o f32 [B, Tp, H, D], lse [B, H, Tp]) from splash; LSE_NONE where a query sees
        nothing."""
        sk, _ = _modules()
        kern = self._kernel(kind, q_, k_)
        kh = k_.shape[2]
        qh = _heads_major(q_ * jnp.asarray(cfg.scale, q_.dtype), kh)
        kk, vv = _heads_major(k_, kh, False), _heads_major(v_, kh, False)

        def one(q, k, v, q_seg, kv_seg):  # q [G, T, D], k/v [S, D]
            seg = None if q_seg is None else sk.SegmentIds(q_seg, kv_seg)
            with _X32():
                out, (lse,) = kern(q, k, v, segment_ids=seg)
            return out, lse

        per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))
        segs = (qs.seg, ks.seg) if qs.seg is not None else (None, None)
        o, lse = jax.vmap(per_head)(qh, kk, vv, *segs)  # [B, K, G, T, D], [B, K, G, T]
        b, t = lse.shape[0], lse.shape[-1]
        lse = lse.reshape(b, -1, t)
        # Splash masks with a finite value: a query that sees nothing gets a huge negative lse.
        seen = lse > 0.5 * jnp.finfo(jnp.float32).min
        o = jnp.where(jnp.moveaxis(seen, 1, 2)[..., None], _from_heads_major(o), 0)
        return o.astype(jnp.float32), jnp.where(seen, lse, LSE_NONE)

    def _run_bwd(self, kind, cfg, q_, k_, v_, do_, lse_, aux, qs, ks):
        """(dq, dk, dv), f32 and unscaled, from splash's backward given our residuals."""
        sk, _ = _modules()
        kern = self._kernel(kind, q_, k_)
        kh = k_.shape[2]
        qh = _heads_major(q_ * jnp.asarray(cfg.scale, q_.dtype), kh)
        kk, vv = _heads_major(k_, kh, False), _heads_major(v_, kh, False)
        oh, doh = _heads_major(aux.out, kh), _heads_major(do_, kh)
        b, h, t = lse_.shape
        lse_h = lse_.reshape(b, kh, h // kh, t)
        sinks = [None] if "sinks" in inspect.signature(sk._splash_attention_fwd).parameters else []
        bwd_names = inspect.signature(sk._splash_attention_bwd).parameters
        static = {n: kern.kwargs[n] for n in bwd_names if n in kern.kwargs}

        def one(q, k, v, o, do, lse, q_seg, kv_seg):  # one batch row and KV head
            seg = None if q_seg is None else sk.SegmentIds(q_seg, kv_seg)
            # The residuals of splash's forward, with the ring's out and lse in them.
            res = (q, k, v, seg, *sinks, o, lse, kern.dq_mask_info, kern.dkv_mask_info)
            with _X32():
                return sk._splash_attention_bwd(**static, res=res, do=do)[3:6]  # dq, dk, dv

        per_head = jax.vmap(one, in_axes=(0, 0, 0, 0, 0, 0, None, None))
        segs = (qs.seg, ks.seg) if qs.seg is not None else (None, None)
        dq, dk, dv = jax.vmap(per_head)(qh, kk, vv, oh, doh, lse_h, *segs)
        # Splash's gradients are those of the scaled q: ours are unscaled (finish_bwd scales).
        to_kv = lambda x: jnp.moveaxis(x, 1, 2).astype(jnp.float32)  # noqa: E731
        dq = _from_heads_major(dq).astype(jnp.float32)
        return dq, to_kv(dk) / cfg.scale, to_kv(dv)

    def _branches(self, cfg, run, q_, v_):
        """Step branches: splash where it expresses the step, `run('xla')` elsewhere."""
        if self.supports(cfg.soft_cap, q_.shape[-1], v_.shape[-1]) is not None:
            return dict(skip=run("skip"), full=run("xla"), diag=run("xla"), partial=run("xla"))
        partial = run("full") if self._segments_only(cfg) else run("xla")
        return dict(skip=run("skip"), full=run("full"), diag=run("causal"), partial=partial)

    def fwd_pass(self, cfg, q_, k_, v_, qs, ks, state):
        def run(kind):
            if kind == "skip":
                return lambda o, lse: (o, lse)
            if kind == "xla":
                return lambda o, lse: fused.xla_fwd(cfg, q_, k_, v_, qs, ks, o, lse)
            return lambda o, lse: fused.merge(o, lse, *self._run_fwd(kind, cfg, q_, k_, v_, qs, ks))

        cls = fused.step_class(cfg, qs, ks, allow_segments_diag=True)
        return fused.switch_step(cls, self._branches(cfg, run, q_, v_), *state)

    def bwd_pass(self, cfg, q_, k_, v_, bwd, qs, ks, grads):
        do_, lse_, aux = bwd

        def run(kind):
            if kind == "skip":
                return lambda g: g
            if kind == "xla":
                return lambda g: fused.xla_bwd(cfg, q_, k_, v_, do_, lse_, aux, qs, ks, g)

            def lib(g):
                new = self._run_bwd(kind, cfg, q_, k_, v_, do_, lse_, aux, qs, ks)
                return tuple(a + b for a, b in zip(g, new, strict=True))

            return lib

        cls = fused.step_class(cfg, qs, ks, allow_segments_diag=True)
        # A nonzero dlse: the XLA kernel (not 'partial', which may be splash with segments).
        xla = aux.dlse_nonzero & (cls != fused.SKIP)
        branches = self._branches(cfg, run, q_, v_)
        branches["xla"] = run("xla")
        index = jnp.where(xla, 4, cls)
        order = [branches[n] for n in ("skip", "full", "partial", "diag", "xla")]
        return jax.lax.switch(index, order, grads)
