"""Llama-style layers: RMSNorm, GQA attention with a pluggable implementation, SwiGLU MLP.

Parameters carry logical axis names (see ringattn/mesh.py); activations are constrained to
logical shardings when the model is given a mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from ringattn.attention.blockwise import blockwise_attention
from ringattn.attention.reference import reference_attention
from ringattn.mesh import mesh_axes_for
from ringattn.nn.config import ModelConfig
from ringattn.nn.rope import apply_rope
from ringattn.parallel.api import context_parallel_attention


def constrain(x, names, cfg: ModelConfig, mesh):
    """Shard activation `x` as its logical axis `names` map to `mesh` (no-op without a mesh)."""
    if mesh is None:
        return x
    return nn.with_logical_constraint(x, names, rules=cfg.rules, mesh=mesh)


def param(module, name, shape, names, cfg: ModelConfig, init=None):
    init = init or nn.initializers.lecun_normal()
    return module.param(
        name, nn.with_logical_partitioning(init, names), shape, jnp.dtype(cfg.param_dtype)
    )


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTE):
        scale = param(self, "scale", (x_BTE.shape[-1],), ("norm",), self.cfg, nn.initializers.ones)
        x = x_BTE.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (x * scale.astype(jnp.float32)).astype(self.cfg.dtype)


def attention(cfg: ModelConfig, mesh, q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT):
    """Causal attention within documents (segment ids), by the implementation cfg names."""
    a = cfg.attention
    mask = dict(
        causal=True,
        segment_ids=segment_ids_BT,
        q_positions=positions_BT,
        kv_positions=positions_BT,
    )
    if a.impl == "dense":
        return reference_attention(q_BTHD, k_BTKD, v_BTKD, **mask)
    if a.impl == "blockwise":
        return blockwise_attention(
            q_BTHD, k_BTKD, v_BTKD, block_q=a.block_q, block_k=a.block_k, **mask
        )
    if mesh is None:
        raise ValueError(
            f"attention: implementation {a.impl!r} needs a mesh; use 'dense' or 'blockwise' "
            "without one."
        )
    extra = dict(head_chunks=a.head_chunks) if a.impl in ("allgather", "auto") else {}
    return context_parallel_attention(
        q_BTHD,
        k_BTKD,
        v_BTKD,
        mesh=mesh,
        axis_name=a.axis,
        strategy=a.impl,
        layout=a.layout,
        batch_axis=mesh_axes_for(cfg.rules, "act_batch") or None,
        head_axis=mesh_axes_for(cfg.rules, "act_heads") or None,
        block_q=a.block_q,
        block_k=a.block_k,
        **extra,
        **mask,
    )


class Attention(nn.Module):
    """Grouped-query attention: H query heads share K key/value heads (never repeated)."""

    cfg: ModelConfig
    mesh: object = None

    @nn.compact
    def __call__(self, x_BTE, positions_BT, segment_ids_BT):
        cfg, e = self.cfg, x_BTE.shape[-1]
        h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # Fan-in is the embedding for q/k/v and (heads, head_dim) for the output projection.
        init_in = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        init_out = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        wq = param(self, "query", (e, h, d), ("embed", "heads", "head_dim"), cfg, init_in)
        wk = param(self, "key", (e, k, d), ("embed", "kv_heads", "head_dim"), cfg, init_in)
        wv = param(self, "value", (e, k, d), ("embed", "kv_heads", "head_dim"), cfg, init_in)
        wo = param(self, "out", (h, d, e), ("heads", "head_dim", "embed"), cfg, init_out)
        dt = jnp.dtype(cfg.dtype)
        q_BTHD = jnp.einsum("bte,ehd->bthd", x_BTE, wq.astype(dt))
        k_BTKD = jnp.einsum("bte,ekd->btkd", x_BTE, wk.astype(dt))
        v_BTKD = jnp.einsum("bte,ekd->btkd", x_BTE, wv.astype(dt))
        q_BTHD = apply_rope(q_BTHD, positions_BT, cfg.rope)
        k_BTKD = apply_rope(k_BTKD, positions_BT, cfg.rope)
        names = ("act_batch", "act_length", "act_heads", "head_dim")
        q_BTHD = constrain(q_BTHD, names, cfg, self.mesh)
        kv_names = ("act_batch", "act_length", "act_kv_heads", "head_dim")
        k_BTKD = constrain(k_BTKD, kv_names, cfg, self.mesh)
        v_BTKD = constrain(v_BTKD, kv_names, cfg, self.mesh)
        o_BTHD = attention(cfg, self.mesh, q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT)
        o_BTHD = constrain(o_BTHD.astype(dt), names, cfg, self.mesh)
        return jnp.einsum("bthd,hde->bte", o_BTHD, wo.astype(dt))


def swiglu(x_BTE, w_gate_EM, w_up_EM, w_down_ME):
    gate = jnp.einsum("bte,em->btm", x_BTE, w_gate_EM)
    up = jnp.einsum("bte,em->btm", x_BTE, w_up_EM)
    return jnp.einsum("btm,me->bte", nn.silu(gate) * up, w_down_ME)


def chunked_swiglu(x_BTE, weights, chunk_size):
    """SwiGLU over the sequence `chunk_size` tokens at a time, each chunk rematerialised in the
    backward, so the [B, T, mlp] intermediate never exists (blockwise feedforward, Liu et al.).

    Chunk c holds tokens {c, c + N, c + 2N ...} (N chunks): the strided split keeps every chunk
    spread evenly over a sequence-sharded mesh, so no device waits on another's chunk."""
    b, t, e = x_BTE.shape
    if t % chunk_size:
        raise ValueError(
            f"mlp: `mlp_chunk_size` ({chunk_size}) must divide the sequence length ({t})."
        )
    n = t // chunk_size
    x_NBCE = jnp.moveaxis(x_BTE.reshape(b, chunk_size, n, e), 2, 0)
    y_NBCE = jax.lax.map(jax.checkpoint(lambda x: swiglu(x, *weights)), x_NBCE)
    return jnp.moveaxis(y_NBCE, 0, 2).reshape(b, t, e)


class Mlp(nn.Module):
    cfg: ModelConfig
    mesh: object = None

    @nn.compact
    def __call__(self, x_BTE):
        cfg, e, m = self.cfg, x_BTE.shape[-1], self.cfg.mlp_dim
        dt = jnp.dtype(cfg.dtype)
        weights = (
            param(self, "gate", (e, m), ("embed", "mlp"), cfg).astype(dt),
            param(self, "up", (e, m), ("embed", "mlp"), cfg).astype(dt),
            param(self, "down", (m, e), ("mlp", "embed"), cfg).astype(dt),
        )
        chunk = cfg.mlp_chunk_size
        if chunk and chunk < x_BTE.shape[1]:
            return chunked_swiglu(x_BTE, weights, chunk)
        return swiglu(x_BTE, *weights)
