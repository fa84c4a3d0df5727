"""Exact attention in O(T) memory: the single-device entry, and the custom_vjp every strategy runs.

`exact_attention(cfg, loop, ...)` is one custom_vjp for all strategies: `loop` says how a
kernel's passes run over the keys (`Single` here: one pass; `ring.Ring`, `allgather.AllGather`),
`cfg.kernel` which kernel runs them (kernels/: the XLA kernel or a fused one, chosen by
kernels/dispatch.py). The forward returns (out, lse); the backward recomputes tiles from them
(DESIGN 3), so nothing of size T x S is stored.

Sinks (one logit per query head whose value is 0, gpt-oss style) are added once, after every key
has been seen, whatever the strategy: lse' = logaddexp(lse, sink), out' = out exp(lse - lse').
The backward then runs on (out', lse') unchanged, and d sink = -sum_t exp(sink - lse') delta_t.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Unpack

import jax
import jax.numpy as jnp

from ringattn.attention import inputs, keywords, masks
from ringattn.attention.kernels import base, dispatch


def make_config(fn, opts: inputs.Options, q, k, v, m, kv_len=None) -> base.Config:
    """The kernel Config of a call: the kernel `opts.kernel` names for these inputs on this
    platform, fitted to the local lengths, with its tiles. `kv_len`: keys per k/v shard."""
    t, s = q.shape[1], k.shape[1] if kv_len is None else kv_len
    dtype = jnp.result_type(q, k, v)
    segments = m.q_seg is not None
    kern = dispatch.resolve(fn, opts, dtype, q.shape[-1], v.shape[-1], t, s, segments)
    bq, bk = kern.blocks(opts.block_q, opts.block_k, t, s)
    return base.Config(
        opts.spec, opts.scale, opts.logits_soft_cap, bq, bk, s, dtype, kern, opts.tile_callback, t
    )


@dataclasses.dataclass(frozen=True)
class Single:
    """One device attends to all the keys: one pass of the kernel."""

    def forward(self, cfg, q, k, v, m):
        qs, q_, (k_, v_, kpos, kseg) = base.prepare(cfg, q, k, v, m)
        state = cfg.kernel.attend(cfg, q_, k_, v_, qs, base.kv_side(cfg, kpos, kseg))
        return cfg.kernel.finish_fwd(cfg, q, state)

    def backward(self, cfg, q, k, v, m, b: base.BwdInputs):
        qs, q_, (k_, v_, kpos, kseg) = base.prepare(cfg, q, k, v, m)
        bwd = cfg.kernel.prepare_bwd(cfg, q, k, b)
        ks = base.kv_side(cfg, kpos, kseg)
        return cfg.kernel.finish_bwd(
            cfg, q, k, v, cfg.kernel.attend_bwd(cfg, q_, k_, v_, bwd, qs, ks)
        )


def add_sinks(o_BTHD, lse_BHT, sinks_H):
    """(out, lse) with one more logit per head, `sinks`, whose value is 0 (module docstring)."""
    if sinks_H is None:
        return o_BTHD, lse_BHT
    sink = sinks_H.astype(lse_BHT.dtype)[None, :, None]
    new = jnp.logaddexp(lse_BHT, sink)
    return o_BTHD * jnp.moveaxis(jnp.exp(lse_BHT - new), 1, 2)[..., None], new


def _run_fwd(cfg, loop, q, k, v, m, sinks):
    o, lse = add_sinks(*loop.forward(cfg, q, k, v, m), sinks)
    out = o.astype(q.dtype)
    return (out, masks.public_lse(lse)), (q, k, v, m, sinks, out, lse)


def _run_bwd(cfg, loop, res, cts):
    q, k, v, m, sinks, out, lse = res
    dout, dlse = cts
    acc = lse.dtype
    delta = jnp.moveaxis(jnp.sum(dout.astype(acc) * out.astype(acc), axis=-1), 1, 2) - dlse
    b = base.BwdInputs(out, dout, masks.backward_lse(lse), delta, jnp.any(dlse != 0))
    dq, dk, dv = loop.backward(cfg, q, k, v, m, b)
    dsinks = None
    if sinks is not None:
        p_sink = jnp.exp(sinks.astype(acc)[None, :, None] - lse)
        dsinks = (-jnp.sum(p_sink * delta, axis=(0, 2))).astype(sinks.dtype)
    return dq, dk, dv, None, dsinks


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _exact(cfg, loop, q, k, v, m, sinks):
    return _run_fwd(cfg, loop, q, k, v, m, sinks)[0]


_exact.defvjp(_run_fwd, _run_bwd)


def exact_attention(cfg, loop, q, k, v, m, sinks):
    """(out [B, T, H, Dv] in q's dtype, lse [B, H, T] f32) of `loop` running cfg.kernel's passes,
    sinks added (module docstring). q/k/v share one dtype; `m` are the mask's arrays.

    Inside shard_map the sinks' gradient is a sum over this device's queries: the sinks are cast
    to vary like q, so that autodiff sums it over the devices (the transpose of that cast)."""
    if sinks is not None:
        (sinks,) = base.vary_like([sinks], q)
    return _exact(cfg, loop, q, k, v, m, sinks)


def attend(fn, q, k, v, opts: inputs.Options, m: inputs.MaskArrays, sinks):
    """(out, lse) of checked arguments on one device (what `blockwise_attention` and every
    strategy that ends in a single-device call run)."""
    cfg = make_config(fn, opts, q, k, v, m)
    q, k, v = (x.astype(cfg.dtype) for x in (q, k, v))
    return exact_attention(cfg, Single(), q, k, v, m, sinks)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _attend_jit(fn, q, k, v, opts, m, sinks):
    """`attend`, compiled once per static options: a caller who does not jit runs one program
    instead of the kernel's every op dispatched on its own (inside a caller's jit it inlines)."""
    return attend(fn, q, k, v, opts, m, sinks)


@keywords.takes(keywords.AttentionKeywords)
def blockwise_attention(
    q, k, v, *, return_lse=False, **attention: Unpack[keywords.AttentionKeywords]
):
    """Exact attention in O(T) memory, same arguments and results as `reference_attention`.

    Lengths need not be multiples of the block sizes. lse is natural-log, f32, [B, H, T].
    `tile_callback(pass, q_pos, kv_pos, masked)`, if given, runs on the host for every tile
    computed ("fwd" or "bwd"; first positions of the query and key blocks; masked: PARTIAL).
    `kernel`: "auto", "xla", "pallas_gpu", "cudnn", "pallas_tpu" or a kernel object
    (kernels/dispatch.py); block_q / block_k are the XLA kernel's tiles (None: the platform's
    default, 512 on CPU and TPU, 1024 on GPU; fused kernels have their own).
    """
    fn = "blockwise_attention"
    opts, m, sinks = inputs.check(fn, q, k, v, **attention)
    out, lse = _attend_jit(fn, q, k, v, opts, m, sinks)
    return (out, lse) if return_lse else out
