"""What gpu_check's stages compute on: bf16 data drawn on the device, the mask kinds' arguments, and
the f32 reference (out, lse and the gradients) at full f32 precision."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

import ringattn

TOL = 2e-2  # max |got - want| / max |want| of bf16 results against the f32 reference
GRADS = ("out", "lse", "dq", "dk", "dv")


def make_data(b, t, h, kh, d, seed=0):
    """bf16 q [B,T,H,D], k/v [B,T,K,D], do [B,T,H,D]; dlse [B,H,T] f32; sorted segment ids
    [B,T] in 0..2. Drawn on the device: host draws take seconds at T = 32K."""
    keys = jax.random.split(jax.random.key(seed), 5)
    shapes = [(b, t, h, d), (b, t, kh, d), (b, t, kh, d), (b, t, h, d), (b, h, t)]
    dtypes = [jnp.bfloat16] * 4 + [jnp.float32]
    names = ("q", "k", "v", "do", "dlse")
    data = {
        name: jax.random.normal(key, shape, dtype)
        for name, key, shape, dtype in zip(names, keys, shapes, dtypes, strict=True)
    }
    seg = np.sort(np.random.default_rng(seed).integers(0, 3, (b, t)), axis=1)
    return dict(data, seg=jnp.asarray(seg, jnp.int32))


def highest_precision():
    """f32 dots at full precision (GPUs may run them as TF32 by default): for references."""
    ctx = getattr(jax, "default_matmul_precision", None)
    return contextlib.nullcontext() if ctx is None else ctx("highest")


def mask_kwargs(mask, t, seg=None):
    """The attention arguments of a mask kind at length t."""
    return {
        "none": {},
        "causal": {"causal": True},
        "window": {"local_window_size": (t // 4, t // 8)},
        "segments": {"causal": True, "segment_ids": seg},
    }[mask]


def _vjp_all(attn, q, k, v, do, dlse):
    (out, lse), vjp = jax.vjp(attn, q, k, v)
    return (out, lse, *vjp((do, dlse)))


def reference(data, kw, dlse):
    """(out, lse, dq, dk, dv) of the f32 reference on the bf16 data, at full f32 precision."""
    f32 = [data[x].astype(jnp.float32) for x in ("q", "k", "v", "do")]
    attn = lambda q, k, v: ringattn.reference_attention(q, k, v, return_lse=True, **kw)  # noqa: E731
    with highest_precision():
        return jax.jit(lambda *a: _vjp_all(attn, *a))(*f32, dlse)
