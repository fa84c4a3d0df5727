"""The pass interface every single-device kernel implements, and what kernels share.

A kernel works on arrays padded to whole blocks (of the Config's block_q / block_k) in a layout of
its own, and *continues* state instead of returning fresh results, so a ring accumulates in place:

  forward:  state (o, lse) -> (o, lse) after also attending to this k/v     [f32, o normalised]
  backward: (dq, dk, dv) -> (dq, dk, dv) plus this k/v's contributions      [f32, unscaled]

The strategies (blockwise.Single, ring.Ring, allgather.AllGather) run the passes over the keys;
`Kernel` below lists what they call. The XLA kernel (xla.py) and the fused kernels (fused.py and
its subclasses) implement it; nothing in kernels/ imports the strategies.

A query that has seen no key carries lse = masks.LSE_NONE (finite), never -inf.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ringattn.attention import masks
from ringattn.attention.masks import MaskSpec, Ranges


@dataclasses.dataclass(frozen=True)
class Config:
    """Static settings of one attention call's kernel; `kv_len` valid keys per k/v shard (the
    padded tail of a shard is masked)."""

    spec: MaskSpec
    scale: float
    soft_cap: float | None
    block_q: int
    block_k: int
    kv_len: int
    dtype: jnp.dtype  # of q, k, v
    kernel: Kernel
    tile_callback: Callable | None = None
    q_len: int | None = None  # valid queries (the padded length when None)

    @property
    def kv_padded(self) -> bool:
        return self.kv_len % self.block_k != 0


class Side(NamedTuple):
    """Positions [P, L] and segments [B, L] of one side, padded to whole blocks, with ranges."""

    pos: jax.Array
    seg: jax.Array | None
    ranges: Ranges


class BwdInputs(NamedTuple):
    """What the backward of every strategy starts from, [B, T, ...] unpadded: the output `out`
    (inputs' dtype) and its cotangent `dout`, lse [B, H, T] f32 (with sinks; queries that saw
    nothing at -LSE_NONE, masks.backward_lse), delta = rowsum(dout * out) - dlse [B, H, T] f32,
    and whether dlse is nonzero anywhere (library kernels cannot take it)."""

    out: jax.Array
    dout: jax.Array
    lse: jax.Array
    delta: jax.Array
    dlse_nonzero: jax.Array


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


def kv_side(cfg, kpos, kseg) -> Side:
    """The Side of keys whose positions / segments are already padded to whole blocks."""
    return Side(kpos, kseg, masks.block_ranges(kpos, kseg, cfg.block_k))


def prepare_kv(cfg, k, v, kpos, kseg):
    """The k/v bundle a ring passes on: k, v in the kernel's storage and their positions and
    segments, all padded to whole key blocks."""
    pad = lambda x: pad_to_block(cfg.kernel.store_kv(x), cfg.block_k)  # noqa: E731
    edge = lambda x: None if x is None else pad_to_block(x, cfg.block_k, mode="edge")  # noqa: E731
    return pad(k), pad(v), edge(kpos), edge(kseg)


def prepare(cfg, q, k, v, m):
    """Kernel operands: the q side, q in the kernel's layout and the k/v bundle, padded."""
    qs = make_side(m.q_pos, m.q_seg, cfg.block_q)
    q_ = pad_to_block(cfg.kernel.store_q(q, k.shape[2]), cfg.block_q)
    return qs, q_, prepare_kv(cfg, k, v, m.kv_pos, m.kv_seg)


def logits(qk, scale, cap, unit=1.0):
    """(s, t): the logits s = scale * qk, soft-capped (Gemma 2) to cap * t with t = tanh(scale *
    qk / cap) when cap is given (t = None without a cap), times `unit` (log2(e) for a base-2
    softmax). The constants fold into one multiply; the backward needs t for the cap's slope,
    1 - t^2."""
    if cap is None:
        return qk * (scale * unit), None
    t = jnp.tanh(qk * (scale / cap))
    return (cap * unit) * t, t


def varying(x):
    """The shard_map axes x varies over (empty outside shard_map)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # JAX >= 0.10: manual axis types
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def vary_like(arrays, *likes):
    """`arrays` cast to vary over every shard_map axis any of them or of `likes` varies over:
    what a primitive that mixes them (a pallas_call, a custom_vjp's cotangents) needs."""
    axes = frozenset().union(*map(varying, (*arrays, *likes)))
    cast = getattr(lax, "pcast", None)
    out = []
    for x in arrays:
        missing = tuple(sorted(axes - varying(x)))
        if missing:
            x = cast(x, missing, to="varying") if cast else lax.pvary(x, missing)
        out.append(x)
    return out


class Kernel:
    """A single-device attention kernel: the passes the strategies run (module docstring).

    Subclasses are frozen dataclasses (static: they key compiled programs). `store_*`, the
    passes and `finish_*` define the kernel's layout; `attend` / `attend_bwd` are one fresh
    pass (no state to continue), which a kernel may implement more cheaply.
    """

    name: ClassVar[str] = "kernel"

    def fit(self, q_len: int, kv_len: int) -> Kernel:
        """This kernel with its tiles adapted to the given local lengths."""
        del q_len, kv_len
        return self

    def blocks(self, block_q: int, block_k: int, q_len: int, kv_len: int) -> tuple[int, int]:
        """The Config's (block_q, block_k): what q and k/v are padded to multiples of."""
        raise NotImplementedError

    def supports(self, soft_cap, head_dim: int, v_head_dim: int) -> str | None:
        """Why this kernel cannot run a call with this soft cap and these head dims (None if it
        can)."""
        del soft_cap, head_dim, v_head_dim
        return None

    # Layout.
    def store_q(self, q_BTHD, num_kv_heads):
        raise NotImplementedError

    def store_kv(self, x_BSKD):
        raise NotImplementedError

    # Forward.
    def init_state(self, cfg: Config, q_, v_):
        raise NotImplementedError

    def fwd_pass(self, cfg: Config, q_, k_, v_, qs: Side, ks: Side, state):
        raise NotImplementedError

    def finish_fwd(self, cfg: Config, q, state):
        """(o f32 [B, T, H, Dv], lse f32 [B, H, T]), unpadded; LSE_NONE where nothing was seen."""
        raise NotImplementedError

    def attend(self, cfg: Config, q_, k_, v_, qs: Side, ks: Side):
        return self.fwd_pass(cfg, q_, k_, v_, qs, ks, self.init_state(cfg, q_, v_))

    # Backward.
    def prepare_bwd(self, cfg: Config, q, k, b: BwdInputs):
        """The backward operands (do, lse, delta ...) in this kernel's layout, padded like q."""
        raise NotImplementedError

    def init_grads(self, cfg: Config, q_, k_, v_):
        return tuple(jnp.zeros_like(x, dtype=jnp.float32) for x in (q_, k_, v_))

    def bwd_pass(self, cfg: Config, q_, k_, v_, bwd, qs: Side, ks: Side, grads):
        raise NotImplementedError

    def finish_bwd(self, cfg: Config, q, k, v, grads):
        """(dq, dk, dv) unpadded, with the softmax scale, in the inputs' dtypes."""
        raise NotImplementedError

    def attend_bwd(self, cfg: Config, q_, k_, v_, bwd, qs: Side, ks: Side):
        return self.bwd_pass(cfg, q_, k_, v_, bwd, qs, ks, self.init_grads(cfg, q_, k_, v_))
