"""Llama-style layers: RMSNorm, GQA attention with a pluggable implementation, SwiGLU MLP.

Parameters carry logical axis names (see ringattn/mesh.py); activations are constrained to
logical shardings when the model is given a mesh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ringattn.attention.blockwise import blockwise_attention
from ringattn.attention.reference import reference_attention
from ringattn.decode import attend as attend_lib
from ringattn.decode import cache as cache_lib
from ringattn.decode import prefill as prefill_lib
from ringattn.decode import retrieval, sharded
from ringattn.mesh import mesh_axes_for
from ringattn.nn.config import ModelConfig
from ringattn.nn.rope import apply_rope
from ringattn.parallel.api import context_parallel_attention


def constrain(x, names, cfg: ModelConfig, mesh):
    """Shard activation `x` as its logical axis `names` map to `mesh` (no-op without a mesh).

    A dimension that does not split evenly over its mesh axes stays whole on them: a decode
    step's one token (act_length) is replicated over the context axis, as the sharded cache's
    attention wants it, instead of padded to one token a device, which would cost collectives
    around every norm and projection."""
    if mesh is None:
        return x
    spec = nn.logical_to_mesh_axes(names, cfg.rules)
    even = []
    for size, axes in zip(x.shape, tuple(spec) + (None,) * (x.ndim - len(spec)), strict=True):
        group = (axes,) if isinstance(axes, str) else tuple(axes or ())
        even.append(axes if size % math.prod(mesh.shape[a] for a in group) == 0 else None)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*even)))


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


def attention(cfg: ModelConfig, mesh, q_BTHD, k_BTKD, v_BTKE, positions_BT, segment_ids_BT,
              window=None, sinks_H=None):  # fmt: skip
    """Causal attention within documents (segment ids), by the implementation cfg names; a
    local layer's `window` (its `local_window_size`: keys to a query's left), the soft cap and
    sinks as configured."""
    a = cfg.attention
    mask = dict(
        causal=True,
        local_window_size=None if window is None else (window, 0),
        segment_ids=segment_ids_BT,
        q_positions=positions_BT,
        kv_positions=positions_BT,
        logits_soft_cap=a.logits_soft_cap or None,
        sinks=sinks_H,
    )
    if a.impl == "dense":
        return reference_attention(q_BTHD, k_BTKD, v_BTKE, **mask)
    if a.impl == "blockwise":
        return blockwise_attention(
            q_BTHD, k_BTKD, v_BTKE, block_q=a.block_q, block_k=a.block_k, kernel=a.kernel, **mask
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
        v_BTKE,
        mesh=mesh,
        axis_name=a.axis,
        strategy=a.impl,
        layout=a.layout,
        input_layout=a.layout,  # the trainer and generate lay out the batch once
        batch_axis=mesh_axes_for(cfg.rules, "act_batch") or None,
        head_axis=mesh_axes_for(cfg.rules, "act_heads") or None,
        block_q=a.block_q,
        block_k=a.block_k,
        kernel=a.kernel,
        **extra,
        **mask,
    )


def shards_cache(cfg: ModelConfig, mesh) -> bool:
    """Whether decoding keeps the KV cache sharded along the sequence over the context axis:
    whenever the model runs a context-parallel attention on a mesh."""
    return mesh is not None and cfg.attention.impl not in ("dense", "blockwise")


def cache_batch_axes(cfg: ModelConfig, mesh):
    """The mesh axes a sharded cache's batch is split over (the activations' batch axes)."""
    return tuple(a for a in mesh_axes_for(cfg.rules, "act_batch") if mesh.shape[a] > 1) or None


def _on_mesh(cfg: ModelConfig, mesh):
    """Where a sharded cache lives: the mesh, its context axis and the batch axes."""
    return dict(mesh=mesh, axis_name=cfg.attention.axis, batch_axis=cache_batch_axes(cfg, mesh))


def write_cache(cfg: ModelConfig, mesh, cache, k_BtKD, v_BtKD, positions_Bt):
    """The cache with the new tokens written at their positions (padding: position < 0)."""
    one, on_mesh = cache_lib.update, sharded.update_on_mesh
    if cache.kind == "retrieval":
        one, on_mesh = retrieval.update, retrieval.update_on_mesh
    if not shards_cache(cfg, mesh):
        return one(cache, k_BtKD, v_BtKD, positions_Bt)
    return on_mesh(cache, k_BtKD, v_BtKD, positions_Bt, **_on_mesh(cfg, mesh))


def cached_attention(cfg: ModelConfig, mesh, q_BtHD, positions_Bt, cache, rope, window, sinks):
    """New queries against the cache (already holding them): on one device, or per device on
    its shard of the cache, merged through lse (the cache never moves). A retrieval cache
    attends to its sinks, window and chosen pages (its keys are rotated already: no rope)."""
    variants = dict(
        logits_soft_cap=cfg.attention.logits_soft_cap or None,
        local_window_size=window,
        sinks=sinks,
    )
    one, on_mesh = attend_lib.attend, sharded.attend_on_mesh
    if cache.kind == "retrieval":
        one, on_mesh = retrieval.attend, retrieval.attend_on_mesh
    else:
        variants["rope"] = rope
    if not shards_cache(cfg, mesh):
        return one(q_BtHD, positions_Bt, cache, **variants)
    return on_mesh(q_BtHD, positions_Bt, cache, **variants, **_on_mesh(cfg, mesh))


def chunk_attention(cfg: ModelConfig, mesh, q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT,
                    cache, window, sinks, cache_bound):  # fmt: skip
    """(out, cache): a prompt chunk against a full cache that may hold tokens (below
    `cache_bound`, None: anywhere), and against itself; then written (ringattn/decode/chunked.py:
    on a mesh the cache stays sharded and cfg.attention.prefill picks the strategy)."""
    a = cfg.attention
    opts = dict(
        segment_ids=segment_ids_BT,
        local_window_size=None if window is None else (window, 0),
        logits_soft_cap=a.logits_soft_cap or None,
        sinks=sinks,
        cache_bound=cache_bound,
        block_q=a.block_q,
        block_k=a.block_k,
        kernel=a.kernel,
    )
    if not shards_cache(cfg, mesh):
        return prefill_lib.prefill(q_BTHD, k_BTKD, v_BTKD, positions_BT, cache, **opts)
    return prefill_lib.prefill_on_mesh(
        q_BTHD, k_BTKD, v_BTKD, positions_BT, cache, layout=a.layout, strategy=a.prefill,
        **_on_mesh(cfg, mesh), **opts,
    )  # fmt: skip


def project_out(o_BTHD, w_HDE):
    """The attention output projection, heads and head dim contracted as one axis: both
    reshapes are free, where the two-axis einsum made XLA:CPU transpose the weights (and the
    output) on every call, a copy of the weights per decode step."""
    b, t, h, d = o_BTHD.shape
    return jnp.einsum("btf,fe->bte", o_BTHD.reshape(b, t, h * d), w_HDE.reshape(h * d, -1))


class Attention(nn.Module):
    """Grouped-query attention: H query heads share K key/value heads (never repeated).

    With a KV `cache` (ringattn/decode/cache.py) it returns (out, cache). `prefill` with
    `cache_bound=0` (the caches are empty) computes the tokens' attention with the configured
    implementation and then writes their K/V; otherwise (the caches may hold tokens below
    `cache_bound`; None: anywhere) a full cache takes them as a chunk (`chunk_attention`), a
    window or retrieval cache as a decode step would. A decode step (prefill=False) writes the
    new tokens first and attends them to the cache. Full and retrieval caches store keys rotated
    at their positions; window kinds store them un-rotated and rotate at their positions in the
    cache (StreamingLLM). `window`: this layer's local_window_size (keys to a query's left;
    None: global)."""

    cfg: ModelConfig
    mesh: object = None
    window: int | None = None

    @nn.compact
    def __call__(self, x_BTE, positions_BT, segment_ids_BT, cache=None, prefill=True,
                 cache_bound=None):  # fmt: skip
        cfg, e = self.cfg, x_BTE.shape[-1]
        h, k, d, dv = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.value_dim
        # Fan-in is the embedding for q/k/v and (heads, head_dim) for the output projection.
        init_in = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        init_out = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        wq = param(self, "query", (e, h, d), ("embed", "heads", "head_dim"), cfg, init_in)
        wk = param(self, "key", (e, k, d), ("embed", "kv_heads", "head_dim"), cfg, init_in)
        wv = param(self, "value", (e, k, dv), ("embed", "kv_heads", "head_dim"), cfg, init_in)
        wo = param(self, "out", (h, dv, e), ("heads", "head_dim", "embed"), cfg, init_out)
        sinks_H = None
        if cfg.attention.sinks:  # one logit per head, starting at 0 (as likely as one key)
            sinks_H = param(self, "sinks", (h,), ("heads",), cfg, nn.initializers.zeros)
            sinks_H = sinks_H.astype(jnp.float32)
        dt = jnp.dtype(cfg.dtype)
        q_BTHD = jnp.einsum("bte,ehd->bthd", x_BTE, wq.astype(dt))
        k_BTKD = jnp.einsum("bte,ekd->btkd", x_BTE, wk.astype(dt))
        v_BTKD = jnp.einsum("bte,ekd->btkd", x_BTE, wv.astype(dt))
        unrotated_k_BTKD = k_BTKD
        rotate_later = cache is not None and cache.kind in ("sink_window", "window")
        rope = None
        if rotate_later:
            rope = lambda x, pos: apply_rope(x, pos, cfg.rope)  # noqa: E731
        if cache is not None and (not prefill or (cache.kind != "full" and cache_bound != 0)):
            if not rotate_later:
                q_BTHD = apply_rope(q_BTHD, positions_BT, cfg.rope)
                k_BTKD = apply_rope(k_BTKD, positions_BT, cfg.rope)
            cache = write_cache(cfg, self.mesh, cache, k_BTKD, v_BTKD, positions_BT)
            o_BTHD = cached_attention(
                cfg, self.mesh, q_BTHD, positions_BT, cache, rope, self.window, sinks_H
            )
            return project_out(o_BTHD.astype(dt), wo.astype(dt)), cache
        q_BTHD = apply_rope(q_BTHD, positions_BT, cfg.rope)
        k_BTKD = apply_rope(k_BTKD, positions_BT, cfg.rope)
        names = ("act_batch", "act_length", "act_heads", "head_dim")
        q_BTHD = constrain(q_BTHD, names, cfg, self.mesh)
        kv_names = ("act_batch", "act_length", "act_kv_heads", "head_dim")
        k_BTKD = constrain(k_BTKD, kv_names, cfg, self.mesh)
        v_BTKD = constrain(v_BTKD, kv_names, cfg, self.mesh)
        if cache is not None and cache_bound != 0:
            o_BTHD, cache = chunk_attention(
                cfg, self.mesh, q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, cache,
                self.window, sinks_H, cache_bound,
            )  # fmt: skip
            o_BTHD = constrain(o_BTHD.astype(dt), names, cfg, self.mesh)
            return project_out(o_BTHD, wo.astype(dt)), cache
        o_BTHD = attention(
            cfg, self.mesh, q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, self.window,
            sinks_H,
        )  # fmt: skip
        o_BTHD = constrain(o_BTHD.astype(dt), names, cfg, self.mesh)
        out_BTE = project_out(o_BTHD, wo.astype(dt))
        if cache is None:
            return out_BTE
        stored_k = unrotated_k_BTKD if rotate_later else k_BTKD
        return out_BTE, write_cache(cfg, self.mesh, cache, stored_k, v_BTKD, positions_BT)


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
