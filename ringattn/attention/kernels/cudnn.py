"""cuDNN flash attention for the steps that need no positional offset, Pallas for the others.

A ring step (or a single-device call) whose mask is FULL (every query sees every key) or the
plain causal diagonal (same increasing positions on both sides) runs cuDNN's fused kernel; any
other step runs the fallback kernel (our Pallas GPU kernel). The forward takes (out, lse) from
cuDNN's training forward, the backward binds cuDNN's backward with *our* residuals (the ring's
final out and lse), so every step's gradient is exact.

cuDNN's backward recomputes delta = rowsum(do * o) itself and cannot take an lse cotangent, so
when dlse is nonzero (someone differentiates the lse) those steps run the fallback instead.

This goes through JAX's private module jax._src.cudnn.fused_attention_stablehlo (the public
jax.nn.dot_product_attention returns lse in the input dtype and without a gradient). It is
checked once (`unavailable_reason`); dispatch falls back with a warning when it is missing or
its signature changed.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import ClassVar

import jax
import jax.numpy as jnp

from ringattn.attention.kernels import fused
from ringattn.attention.kernels.pallas_gpu import PallasGpu

MIN_CUDNN_VERSION = 8904  # flash attention with a backward (cuDNN 8.9.4)
# What this code passes to the private API, checked by name before it is ever called.
_FWD_KEYWORDS = ("q_seqlen", "kv_seqlen", "scale", "mask_type", "qkv_layout", "return_residual")
_MASKS = ("NO_MASK", "CAUSAL", "PADDING", "PADDING_CAUSAL")
_BWD_PARAMS = ("scale", "seed", "dropout_rate", "variadic_args", "mask_type", "layout")
_BWD_PARAMS += ("sliding_window_length",)
_BWD_OPERANDS = ("query", "key", "value", "bias", "q_seqlen", "kv_seqlen", "q_offsets")
_BWD_OPERANDS += ("kv_offsets", "page_table_k", "page_table_v", "activation", "fwd_output")
_BWD_OPERANDS += ("grad_output",)


def _module():
    from jax._src.cudnn import fused_attention_stablehlo  # private: guarded by callers

    return fused_attention_stablehlo


def _api_problem(fa):
    """What of the private API this code uses is missing or changed (None: all there). The
    semantics (lse's shape and log base, the masks) are checked by running it (probe.py)."""
    names = ("dot_product_attention", "MaskType", "AttentionLayout", "check_cudnn_version")
    names += ("_dot_product_attention_bwd_p_wrapper", "_dot_product_attention_bwd_impl")
    for name in names:
        if not hasattr(fa, name):
            return f"jax._src.cudnn.fused_attention_stablehlo has no `{name}` (JAX changed)"
    missing = [m for m in _MASKS if not hasattr(fa.MaskType, m)]
    if missing or not hasattr(fa.AttentionLayout, "BTNH"):
        return f"cuDNN's MaskType/AttentionLayout lack {missing or ['BTNH']} (JAX changed)"
    fwd = inspect.signature(fa.dot_product_attention).parameters
    missing = [n for n in _FWD_KEYWORDS if n not in fwd]
    if missing:
        return f"cuDNN's forward takes no {missing} (JAX changed)"
    bwd = tuple(inspect.signature(fa._dot_product_attention_bwd_impl).parameters)
    unknown = set(bwd) - set(_BWD_OPERANDS) - set(_BWD_PARAMS)
    missing = {"query", "key", "value", "activation", "fwd_output", "grad_output"} - set(bwd)
    if unknown or missing:
        return (
            f"cuDNN's backward changed: arguments this code does not know {sorted(unknown)}, "
            f"missing {sorted(missing)}"
        )
    return None


def _version_problem(fa):
    """Why the cuDNN this JAX reads (from its CUDA plugin) cannot run the path (None: it can)."""
    try:
        version = fa.check_cudnn_version()
    except Exception as e:  # noqa: BLE001
        return f"cuDNN not detected ({e!r})"
    if version < MIN_CUDNN_VERSION:
        return f"cuDNN {version} is older than {MIN_CUDNN_VERSION}"
    return None


def _module_problem():
    """(the private module, None) or (None, why it cannot be used)."""
    try:
        fa = _module()
    except Exception as e:  # noqa: BLE001 - any import failure means: not available
        return None, f"cannot import jax._src.cudnn.fused_attention_stablehlo ({e!r})"
    return fa, _api_problem(fa)


@functools.cache
def unavailable_reason() -> str | None:
    """None if the cuDNN path can run here, else why not (checked once per process)."""
    fa, why = _module_problem()
    if why is not None:
        return why
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return "no GPU backend"
    if "cuda" not in getattr(gpus[0].client, "platform_version", "").lower():
        return "the GPU backend is not CUDA"
    why = _version_problem(fa)
    if why is not None:
        return why
    major = int(str(getattr(gpus[0], "compute_capability", "0")).split(".")[0])
    if major < 8:
        return f"compute capability {gpus[0].compute_capability} < 8.0"
    return None


def lowering_problem() -> str | None:
    """None if the cuDNN path can be traced and lowered for a CUDA GPU from here (with or
    without one: target.py), else why not. JAX reads the local cuDNN version while tracing its
    cuDNN attention, from its CUDA plugin (jax[cuda]): without it nothing can be traced."""
    fa, why = _module_problem()
    if why is None:
        why = _version_problem(fa)
    if why is not None and fa is not None and getattr(fa, "cuda_versions", 1) is None:
        why += "; JAX reads the cuDNN version while tracing, from its CUDA plugin (jax[cuda])"
    return why


def max_head_dim():
    """256 on a local GPU of compute capability >= 9.0, else 128 (also with no local GPU, when
    lowering for one: JAX's own check then allows 128)."""
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        return 128
    return 256 if float(getattr(gpu, "compute_capability", "0")) >= 9.0 else 128


def _mask(fa, causal, lengths):
    """cuDNN's mask type: with `lengths` (q and k/v padded) its padding masks, so that a padded
    step stays a library step."""
    if lengths is not None:
        return fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
    return fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK


def _seqlens(q, lengths):
    if lengths is None:
        return None, None
    b = q.shape[0]
    return tuple(jnp.full((b,), n, jnp.int32) for n in lengths)


def cudnn_fwd(q, k, v, scale, causal, lengths=None):
    """(out [B, T, H, D] in q's dtype, lse [B, H, T] f32) from cuDNN's training forward; rows
    and keys beyond `lengths` = (q_len, kv_len) (when given) are padding."""
    fa = _module()
    q_seqlen, kv_seqlen = _seqlens(q, lengths)
    out, lse = fa.dot_product_attention(
        q, k, v, q_seqlen=q_seqlen, kv_seqlen=kv_seqlen, scale=scale,
        mask_type=_mask(fa, causal, lengths), qkv_layout="BTNH", return_residual=True,
    )  # fmt: skip
    return out, lse


def cudnn_bwd(q, k, v, out, lse, do, scale, causal, lengths=None):
    """(dq, dk, dv) in the input dtypes (scaled) for the residuals (out, lse) given."""
    fa = _module()
    unused = jnp.zeros(0, q.dtype)
    params = dict(
        scale=scale,
        seed=42,
        dropout_rate=0.0,
        variadic_args=(False, False),  # (has_bias, has_dbias)
        mask_type=_mask(fa, causal, lengths),
        layout=fa.AttentionLayout.BTNH.value,
        sliding_window_length=None,
    )
    q_seqlen, kv_seqlen = _seqlens(q, lengths)
    values = dict(query=q, key=k, value=v, activation=lse, fwd_output=out, grad_output=do)
    if lengths is not None:
        values.update(q_seqlen=q_seqlen, kv_seqlen=kv_seqlen)
    names = inspect.signature(fa._dot_product_attention_bwd_impl).parameters
    operands = [values.get(n, unused) for n in names if n not in params]
    params = {n: params[n] for n in names if n in params}
    grads = fa._dot_product_attention_bwd_p_wrapper.bind(*operands, **params)
    return tuple(grads[:3])


@dataclasses.dataclass(frozen=True)
class Cudnn(fused.FusedKernel):
    """cuDNN for FULL and causal-diagonal steps, `fallback` for the others."""

    name: ClassVar[str] = "cudnn"
    fallback: fused.FusedKernel = PallasGpu()  # the steps cuDNN cannot express

    @property
    def pad_q(self):
        # q and k/v padded alike, so a causal step of equal lengths stays the diagonal.
        return max(self.fallback.pad_q, self.fallback.pad_k)

    @property
    def pad_k(self):
        return self.pad_q

    def fit(self, q_len, kv_len):
        return dataclasses.replace(self, fallback=self.fallback.fit(q_len, kv_len))

    def supports(self, soft_cap, head_dim, v_head_dim):
        return fused.library_supports(soft_cap, head_dim, v_head_dim)

    def _step_class(self, cfg, q_, v_, qs, ks):
        """fused.step_class (padding is cuDNN's own), PARTIAL (the fallback) wherever cuDNN
        cannot express the call."""
        if self.supports(cfg.soft_cap, q_.shape[-1], v_.shape[-1]) is not None:
            return jnp.int32(fused.PARTIAL)
        return fused.step_class(cfg, qs, ks, padding_ok=True)

    def _lengths(self, cfg, q_, k_):
        """(q_len, kv_len) for cuDNN's padding masks when q or k/v are padded, else None."""
        q_len = q_.shape[1] if cfg.q_len is None else cfg.q_len
        if (q_len, cfg.kv_len) == (q_.shape[1], k_.shape[1]):
            return None
        return q_len, cfg.kv_len

    def fwd_pass(self, cfg, q_, k_, v_, qs, ks, state):
        lengths = self._lengths(cfg, q_, k_)

        def lib(causal):
            def run(o, lse):
                return fused.merge(o, lse, *cudnn_fwd(q_, k_, v_, cfg.scale, causal, lengths))

            return run

        def fallback(o, lse):
            return self.fallback.fwd_pass(cfg, q_, k_, v_, qs, ks, (o, lse))

        branches = dict(skip=lambda o, lse: (o, lse), full=lib(False), diag=lib(True))
        cls = self._step_class(cfg, q_, v_, qs, ks)
        return fused.switch_step(cls, dict(branches, partial=fallback), *state)

    def attend(self, cfg, q_, k_, v_, qs, ks):
        lengths = self._lengths(cfg, q_, k_)

        def lib(causal):
            def run():
                out, lse = cudnn_fwd(q_, k_, v_, cfg.scale, causal, lengths)
                return out.astype(jnp.float32), lse

            return run

        branches = dict(
            skip=lambda: self.init_state(cfg, q_, v_),
            full=lib(False),
            diag=lib(True),
            partial=lambda: self.fallback.attend(cfg, q_, k_, v_, qs, ks),
        )
        return fused.switch_step(self._step_class(cfg, q_, v_, qs, ks), branches)

    def bwd_pass(self, cfg, q_, k_, v_, bwd, qs, ks, grads):
        do_, lse_, aux = bwd
        lengths = self._lengths(cfg, q_, k_)

        def lib(causal):
            def run(grads):
                dq, dk, dv = cudnn_bwd(q_, k_, v_, aux.out, lse_, do_, cfg.scale, causal, lengths)
                # Ours are f32, dq and dk without the scale (finish_bwd applies it).
                unscale = lambda x: x.astype(jnp.float32) / cfg.scale  # noqa: E731
                return grads[0] + unscale(dq), grads[1] + unscale(dk), grads[2] + dv

            return run

        def fallback(grads):
            return self.fallback.bwd_pass(cfg, q_, k_, v_, bwd, qs, ks, grads)

        cls = self._step_class(cfg, q_, v_, qs, ks)
        cls = jnp.where(aux.dlse_nonzero & (cls != fused.SKIP), fused.PARTIAL, cls)
        branches = dict(skip=lambda g: g, full=lib(False), diag=lib(True), partial=fallback)
        return fused.switch_step(cls, branches, grads)
