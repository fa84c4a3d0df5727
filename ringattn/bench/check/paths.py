"""The attention paths gpu_check compares, by name: our fused kernels and kernel="auto" through
blockwise_attention, a 2-shard ring emulated through the kernels' passes, JAX's own dense and fused
attention (the baselines), each with why it cannot run here when it cannot."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import ringattn
from ringattn.attention import inputs
from ringattn.attention.kernels import cudnn, dispatch, splash
from ringattn.attention.kernels.cudnn import Cudnn
from ringattn.attention.kernels.pallas_gpu import PallasGpu
from ringattn.attention.kernels.splash import PallasTpu
from ringattn.bench.check.emulated_ring import FN, emulated_ring


@dataclasses.dataclass(frozen=True)
class Path:
    """An attention path: attn(q, k, v, **mask kwargs) -> (out, lse or None), or why it cannot
    run here (`na`)."""

    name: str
    attn: object = None
    na: str | None = None
    dlse: bool = True  # checked with a random lse cotangent (else 0: cuDNN's backward needs 0)


def _blockwise(kernel, **extra):
    def attn(q, k, v, **kw):
        return ringattn.blockwise_attention(q, k, v, kernel=kernel, return_lse=True, **extra, **kw)

    return attn


def _ring(kernel):
    return lambda q, k, v, **kw: emulated_ring(q, k, v, kernel=kernel, n=2, **kw)


def _dense(impl):
    def attn(q, k, v, causal=False):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl), None

    return attn


def _jax_splash(interpret):
    """JAX's splash attention on its own (no lse; K/V heads repeated to H): the TPU baseline."""

    def attn(q, k, v, causal=False):
        sk, sm = splash._modules()
        h, d = q.shape[2:]
        one = (sm.CausalMask if causal else sm.FullMask)((q.shape[1], k.shape[1]))
        with jax.ensure_compile_time_eval():  # concrete mask tables
            kern = sk.make_splash_mha(
                sm.MultiHeadMask([one] * h), head_shards=1, q_seq_shards=1, interpret=interpret
            )
        q = q * jnp.asarray(d**-0.5, q.dtype)  # splash takes no scale
        q, k, v = (jnp.swapaxes(jnp.repeat(x, h // x.shape[2], axis=2), 1, 2) for x in (q, k, v))
        return jnp.swapaxes(jax.vmap(kern)(q, k, v), 1, 2), None  # [B, H, T, D] and back

    return attn


def paths(interpret):
    """Every path by name, those that cannot run here with the reason."""
    on = dispatch.platform()
    pallas, tpu = PallasGpu(interpret=interpret), PallasTpu(interpret=interpret)
    no_pallas = (
        None if (on == "gpu" or interpret) else "our Pallas kernel needs a GPU (or --interpret)"
    )
    no_splash = (
        None if (on == "tpu" or interpret) else "splash attention needs a TPU (or --interpret)"
    )
    no_cudnn = cudnn.unavailable_reason()
    return {
        p.name: p
        for p in (
            Path("pallas", _blockwise(pallas), no_pallas),
            Path("cudnn", _blockwise(Cudnn(fallback=pallas)), no_cudnn, dlse=False),
            Path("auto", _blockwise("auto"), dlse=False),
            Path("ring2 pallas", _ring(pallas), no_pallas),
            Path("ring2 auto", _ring("auto"), dlse=False),
            Path("splash", _blockwise(tpu), no_splash, dlse=False),  # 0: splash's backward
            Path("ring2 splash", _ring(tpu), no_splash, dlse=False),
            Path("xla1024", _blockwise("xla", block_q=1024, block_k=1024)),
            Path("xla512", _blockwise("xla", block_q=512, block_k=512)),
            Path("jax cudnn", _dense("cudnn"), no_cudnn),
            Path("jax splash", _jax_splash(interpret), no_splash),
            Path("jax xla", _dense("xla")),
        )
    }


def describe(kern):
    fallback = getattr(kern, "fallback", None)
    return kern.name + (f" (fallback {fallback.name})" if fallback is not None else "")


def auto_kernel(q, k, v, **kw):
    """The kernel kernel='auto' runs for these inputs on this platform."""
    opts, m, _ = inputs.check(FN, q, k, v, **kw)
    d, t, s = q.shape[-1], q.shape[1], k.shape[1]
    return dispatch.resolve(FN, opts, q.dtype, d, v.shape[-1], t, s, m.q_seg is not None)
