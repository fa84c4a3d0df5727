"""Rematerialisation that keeps a 16-bit float input as its raw bits.

`checkpoint_keeping_bits(f)` differentiates like `jax.checkpoint(f)` with nothing saved (the
backward recomputes f from its inputs), but stores the input `x` as unsigned integers of its
width. The values and the gradients are the same; only the saved array's type differs. Why:
scanned layers save their inputs stacked [layers, B, T, E], which the backward slices one layer
at a time. XLA's CPU compiler computes on bfloat16 in float32 (it converts every bfloat16 op,
slices included), and moves the float32 conversion of the loop-invariant stack out of the
backward loop: a float32 copy of every layer's input at once, twice the saved stack. A stack of
integers is sliced as it is. On an accelerator the bitcasts are free.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_BITS = {jnp.dtype(jnp.bfloat16): jnp.uint16, jnp.dtype(jnp.float16): jnp.uint16}


def to_bits(x):
    """x's raw bits (uint16) when it is a 16-bit float; otherwise x."""
    bits = _BITS.get(jnp.dtype(x.dtype))
    return x if bits is None else jax.lax.bitcast_convert_type(x, bits)


def from_bits(bits, dtype):
    """The array `to_bits` made of an array of `dtype`."""
    return bits if bits.dtype == dtype else jax.lax.bitcast_convert_type(bits, dtype)


def checkpoint_keeping_bits(f):
    """f(params, x, *consts) -> y, rematerialised: the backward recomputes f from params, x
    (kept as raw bits, see the module docstring) and consts (not differentiated: positions,
    segment ids)."""

    @jax.custom_vjp
    def g(params, x, *consts):
        return f(params, x, *consts)

    def fwd(params, x, *consts):
        return f(params, x, *consts), (params, to_bits(x), consts)

    def bwd(residuals, dy):
        params, bits, consts = residuals
        x = from_bits(bits, dy.dtype)
        _, vjp = jax.vjp(lambda p, x: f(p, x, *consts), params, x)
        return (*vjp(dy), *(None for _ in consts))

    g.defvjp(fwd, bwd)
    return g
