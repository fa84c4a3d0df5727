"""context_parallel_attention: attention over global arrays sharded along a mesh axis."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Unpack

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ringattn.attention import inputs, keywords
from ringattn.attention.kernels import dispatch
from ringattn.parallel import allgather, costs, hybrid, layouts, ring, sharding, ulysses

STRATEGIES = ("ring", "allgather", "ulysses", "hybrid", "auto")
# The strategies on checked arguments, inside shard_map: (fn, q, k, v, Options, MaskArrays,
# sinks, axis_name=, layout=) -> (out, lse).
_LOCAL = {
    "ring": ring.ring,
    "allgather": allgather.allgather,
    "ulysses": ulysses.ulysses,
    "hybrid": hybrid.hybrid,
}


def _axis_names(fn, mesh, axis_name):
    """The mesh axes `axis_name` names (one, or a pair for 'hybrid'), all checked to exist."""
    names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
    for a in names:
        if a not in mesh.axis_names:
            raise ValueError(
                f"{fn}: `axis_name` {a!r} is not an axis of the mesh {mesh.axis_names}."
            )
    return names


def _size(mesh, axes):
    return math.prod(mesh.shape[a] for a in axes or ())


def _other_axes(fn, mesh, arg, axes, context_axes, dim, what):
    """`batch_axis` / `head_axis` as a tuple of mesh axes (None if empty), checked: on the mesh,
    not a context axis, and dividing the dimension they shard."""
    if axes is None:
        return None
    axes = tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)
    for a in axes:
        if a not in mesh.axis_names or a in context_axes:
            raise ValueError(
                f"{fn}: `{arg}` must name mesh axes other than the context axes {context_axes}, "
                f"got {a!r} (mesh axes {mesh.axis_names})."
            )
    if dim % _size(mesh, axes):
        raise ValueError(
            f"{fn}: `{arg}` {axes} has size {_size(mesh, axes)}, which does not divide the "
            f"{what} ({dim})."
        )
    return axes or None


def _check_axis_form(fn, strategy, axis_name):
    if strategy == "hybrid":
        hybrid.check_axis_pair(fn, axis_name)
    elif isinstance(axis_name, (tuple, list)):
        raise ValueError(
            f"{fn}: `axis_name` must be a single mesh axis for strategy {strategy!r}, got "
            f"{axis_name!r}; a pair (ulysses_axis, ring_axis) is for strategy 'hybrid'."
        )


def _choose(q, k, mesh, axis_name, spec, layout):
    b, t, h, d = q.shape
    return costs.choose_strategy(
        batch=b,
        q_len=t,
        kv_len=k.shape[1],
        num_heads=h,
        num_kv_heads=k.shape[2],
        head_dim=d,
        dtype=jnp.result_type(q, k),
        mesh_axis_sizes=dict(mesh.shape),
        axis_name=axis_name,
        causal=spec.causal,
        local_window_size=spec.window,
        layout=layout,
    )


@keywords.takes(keywords.AttentionKeywords)
def context_parallel_attention(
    q,
    k,
    v,
    *,
    mesh,
    axis_name="context",
    strategy="ring",
    layout="contiguous",
    input_layout=None,
    head_chunks=1,
    batch_axis=None,
    head_axis=None,
    return_lse=False,
    **attention: Unpack[keywords.AttentionKeywords],
):
    """Exact attention over global q [B, T, H, D], k [B, S, K, D], v [B, S, K, Dv] split along
    `axis_name`.

    `layout` is the token order the devices compute in: "contiguous", or "zigzag" / "striped",
    which balance causal work. `input_layout` says which order q, k, v (and segment ids,
    positions) are in: "natural" (they are laid out inside, and out and lse come back in natural
    order: one all-to-all (striped) or two collective permutes (zigzag) of each array each way,
    every token moving once), or `layout` itself (already laid out, e.g. once per batch with
    `to_layout` as our trainer does: nothing is permuted and the result stays in that order).
    A balanced layout without `input_layout` is refused unless both q and kv positions are given
    (they then say where every token is). Positions not given are the ones `layout` implies.

    Works eagerly and under `jax.jit`, with any mesh (Explicit or Auto axes). `batch_axis` /
    `head_axis` (a mesh axis, a tuple of axes, or None) shard the batch and the heads (q's H and
    k/v's K, so K must divide by their size); the mesh axes named nowhere hold replicas.

    strategy: "ring" (pass-KV), "allgather" (gather K/V, `head_chunks` KV-head chunks at a time),
    "ulysses" (all-to-all to head shards; heads a multiple of the axis size), "hybrid"
    (`axis_name` = (ulysses_axis, ring_axis); the sequence is sharded over both, ring-major:
    `layout` order over n_u * n_r shards, shard i on ring index i // n_u, Ulysses index
    i % n_u), or "auto" (`costs.choose_strategy` picks one from the shapes and the mesh).

    kernel: the single-device kernel each device runs ("auto", "xla", "pallas_gpu", "cudnn",
    "pallas_tpu" or a kernel object, see `blockwise_attention`), chosen for the mesh's platform
    (or the lowering target, `ringattn.target_platform`).
    `logits_soft_cap` and `sinks` [H] as in `reference_attention`.
    """
    fn = "context_parallel_attention"
    if strategy not in STRATEGIES:
        raise ValueError(f"{fn}: `strategy` must be one of {STRATEGIES}, got {strategy!r}.")
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"{fn}: `mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    # Positions the caller did not give are derived by each device from the layout (and the
    # ring then knows statically which of its steps the mask needs).
    opts, m, sinks = inputs.check(fn, q, k, v, **attention, fill_positions=False)
    names = _axis_names(fn, mesh, axis_name)
    batch_axes = _other_axes(fn, mesh, "batch_axis", batch_axis, names, q.shape[0], "batch")
    head_axes = _other_axes(fn, mesh, "head_axis", head_axis, names, k.shape[2], "KV heads")
    if strategy != "auto":
        _check_axis_form(fn, strategy, axis_name)
    n = math.prod(mesh.shape[a] for a in names)
    layouts.check_layout(fn, layout, q.shape[1], n, "query length")
    layouts.check_layout(fn, layout, k.shape[1], n, "key length")
    given = attention["q_positions"] is not None and attention["kv_positions"] is not None
    lengths = {"query length": q.shape[1], "key length": k.shape[1]}
    permute = layouts.check_input_layout(fn, layout, input_layout, given, lengths, n) is not None
    allgather.check_head_chunks(fn, head_chunks, k.shape[2])
    if head_chunks != 1 and strategy not in ("allgather", "auto"):
        raise ValueError(
            f"{fn}: `head_chunks` applies to strategy 'allgather' only, got {head_chunks} with "
            f"strategy {strategy!r}."
        )
    if strategy == "auto":
        strategy = _choose(q, k, mesh, axis_name, opts.spec, layout)
        _check_axis_form(fn, strategy, axis_name)
    heads_per_device = q.shape[2] // _size(mesh, head_axes)
    if strategy in ("ulysses", "hybrid"):
        ulysses.check_heads(fn, heads_per_device, mesh.shape[names[0]], names[0])

    mesh = sharding.run_mesh(mesh, q, k, v, *(x for x in (*m, sinks) if x is not None))
    axis = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else axis_name
    plan = _Plan(
        fn, opts, mesh, axis, strategy, layout, permute, head_chunks, batch_axes, head_axes
    )
    out, lse = _sharded(plan, q, k, v, m, sinks)
    return (out, lse) if return_lse else out


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about a context-parallel call (hashable: it keys the compiled program)."""

    fn: str
    opts: inputs.Options
    mesh: jax.sharding.Mesh
    axis_name: object
    strategy: str
    layout: str
    permute: bool  # the arrays are in natural order: lay them out inside, and back
    head_chunks: int
    batch_axes: tuple | None
    head_axes: tuple | None


@functools.partial(jax.jit, static_argnums=0)
def _sharded(plan: _Plan, q, k, v, m, sinks):
    """The strategy inside shard_map over global arrays; jitted, so that a caller who does not
    jit (eagerly, or under an eager jax.grad) runs one compiled program instead of every op of
    the strategy dispatched on its own, and compiles it once per static plan."""
    mesh, names = plan.mesh, _axis_names(plan.fn, plan.mesh, plan.axis_name)
    # hybrid: ring-major, so each Ulysses group holds consecutive shards (hybrid.py).
    seq_axes = names[::-1] if plan.strategy == "hybrid" else plan.axis_name
    qkv = P(plan.batch_axes, seq_axes, plan.head_axes, None)

    def seq(x):  # positions may be shared by the batch ([1, T])
        return P(plan.batch_axes if x.shape[0] > 1 else None, seq_axes)

    specs = inputs.MaskArrays(*(None if x is None else seq(x) for x in m))
    m = inputs.MaskArrays(
        *(
            None if x is None else sharding.place(x, mesh, sp)
            for x, sp in zip(m, specs, strict=True)
        )
    )
    sinks_spec = P(plan.head_axes)
    if sinks is not None:
        sinks = sharding.place(sinks, mesh, sinks_spec)
    q, k, v = (sharding.place(x, mesh, qkv) for x in (q, k, v))
    extra = dict(head_chunks=plan.head_chunks) if plan.strategy == "allgather" else {}

    def local(q, k, v, m, sinks):
        if plan.permute:
            q, k, v = (layouts.from_natural(x, plan.layout, seq_axes) for x in (q, k, v))
            m = inputs.MaskArrays(
                *(None if x is None else layouts.from_natural(x, plan.layout, seq_axes) for x in m)
            )
        out, lse = _LOCAL[plan.strategy](
            plan.fn, q, k, v, plan.opts, m, sinks, axis_name=plan.axis_name, layout=plan.layout,
            **extra,
        )  # fmt: skip
        if plan.permute:
            out = layouts.to_natural(out, plan.layout, seq_axes)
            lse = layouts.to_natural(lse, plan.layout, seq_axes, axis=2)
        return out, lse

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(qkv, qkv, qkv, specs, sinks_spec),
        out_specs=(qkv, P(plan.batch_axes, plan.head_axes, seq_axes)),
        check_vma=not dispatch.needs_vma_off(plan.opts.kernel, dispatch.mesh_platform(mesh)),
    )(q, k, v, m, sinks)
