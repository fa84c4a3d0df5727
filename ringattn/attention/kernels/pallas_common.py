"""What the Pallas GPU forward and backward kernels share: tile tables, masks inside a tile, head
dim padding and the `pallas_call` wrapper (pallas_fwd.py, pallas_bwd.py, pallas_gpu.py).

Per (q block, key block) a tile state is decided before the kernels run (masks.tile_state on
per-block ranges): each program loops only over the run [lo, hi) of blocks that are not skipped,
and applies no mask to FULL tiles.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ringattn.attention import masks
from ringattn.attention.kernels.base import vary_like
from ringattn.attention.masks import FULL, PARTIAL, SKIP

try:  # the Triton-specific API; absent in a JAX without GPU Pallas support
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def compiler_params(num_warps, num_stages):
    if plgpu is None:
        return None
    params = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    return params(num_warps=num_warps, num_stages=num_stages)


def struct(shape, like):
    """An f32 output of a pallas_call typed like `like` on shard_map's manual axes.

    Under check_vma=True a pallas_call needs the manual-axis type of every output, also when it
    varies over no axis (then the empty type), so it is always passed where JAX has one."""
    aval = jax.typeof(like)
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return jax.ShapeDtypeStruct(shape, jnp.float32, manual_axis_type=mat)
    vma = getattr(aval, "vma", None)  # older JAX
    if vma is not None:
        return jax.ShapeDtypeStruct(shape, jnp.float32, vma=vma)
    return jax.ShapeDtypeStruct(shape, jnp.float32)


class Tables:
    """state [B, nq, nk] (SKIP/FULL/PARTIAL) and the run [lo, hi) of non-skipped blocks per q
    block (`q_bounds` [B, nq, 2]) and per key block (`k_bounds` [B, nk, 2])."""

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


def has_mask(cfg, qs):
    return cfg.spec.causal or cfg.spec.window is not None or qs.seg is not None or cfg.kv_padded


def visible(spec, kv_len, q_pos, kv_pos, q_seg, kv_seg, k_start, bk):
    vis = masks.token_visible(spec, q_pos, kv_pos, q_seg, kv_seg)
    return vis & (k_start + lax.broadcasted_iota(jnp.int32, (1, bk), 1) < kv_len)


def dot(a, b, contract=(1, 1)):
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def pad_head_dim(x):
    """Head dims that Triton cannot tile (not a power of 2, or < 16) are padded with zeros."""
    d = x.shape[-1]
    dp = max(16, pl.next_power_of_2(d))
    return x if dp == d else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dp - d)])


def load(r, name, sl=slice(None)):
    """r[name][sl], or None for an input the call left out."""
    return r[name][sl] if name in r else None


def launch(kern, label):
    warps = kern.num_warps
    if warps is None:
        warps = 8 if label == "fwd" and kern.block_q >= 128 else 4
    return warps, kern.num_stages


class Call:
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
        # In a ring, positions may be replicated while q is not: one varying type for all.
        arrays = vary_like(self.arrays)

        def kernel(*refs):
            body(dict(zip(self.names, refs[:n_in], strict=True)), *refs[n_in:], **static)

        return pl.pallas_call(
            kernel,
            grid=grid,
            in_specs=self.specs,
            out_specs=out_specs,
            out_shape=tuple(struct(shape, arrays[0]) for shape in out_shapes),
            input_output_aliases=aliases,
            compiler_params=None if kern.interpret else compiler_params(*launch(kern, label)),
            interpret=kern.interpret,
            name=f"ringattn_{label}",
        )(*arrays)
