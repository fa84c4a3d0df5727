"""Chunked prefill's entry points: one device, inside jax.shard_map, and over global arrays on a
mesh. The strategies and the mask are chunked.py's; here arguments are checked (before any work,
naming the argument) and "auto" is resolved by the cost model.

    out, cache = prefill_on_mesh(q, k, v, q_pos, cache, mesh=mesh, layout="striped")

One device: `prefill`; inside jax.shard_map: `sharded_prefill`; global arrays: `prefill_on_mesh`.

q [B, c, H, D], k/v [B, c, K, D|Dv] (rotated already, for a full cache that stores rotated keys),
q_pos [B, c] (negative: padding) and segment_ids [B, c] are the chunk's, in `layout` order; the
cache must be a 'full' one. Returns the chunk's attention output (and lse with return_lse) and the
cache with the chunk written.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Unpack

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from ringattn import deprecation, promises
from ringattn.attention import inputs, keywords
from ringattn.attention.kernels import dispatch
from ringattn.attention.masks import public_lse
from ringattn.decode import cache as cache_lib
from ringattn.decode import chunked, sharded
from ringattn.parallel import costs, layouts, sharding

STRATEGIES = chunked.STRATEGIES + ("auto",)


@dataclasses.dataclass(frozen=True)
class _Call:
    """A checked call's static half (hashable: it keys the compiled program)."""

    fn: str
    opts: inputs.Options
    strategy: str
    cache_bound: int | None


def _check(fn, q, k, v, q_pos, cache, strategy, cache_bound, attention):
    """(_Call without the resolved strategy, segments [B, c], sinks) of a call."""
    if not isinstance(cache, cache_lib.KVCache):
        raise TypeError(f"{fn}: `cache` must be a KVCache (init_cache), got {type(cache)}.")
    if cache.kind != "full":
        raise ValueError(
            f"{fn}: chunked prefill needs a 'full' cache, got kind={cache.kind!r}; a window "
            f"cache takes chunks through `update` then `attend` (StreamingLLM)."
        )
    if strategy not in STRATEGIES:
        raise ValueError(f"{fn}: `strategy` must be one of {STRATEGIES}, got {strategy!r}.")
    bad = not isinstance(cache_bound, (int, np.integer)) or isinstance(cache_bound, bool)
    if cache_bound is not None and (bad or cache_bound < 0):
        raise ValueError(f"{fn}: `cache_bound` must be None or an int >= 0, got {cache_bound!r}.")
    cache_lib.check_new(fn, cache, k, v, q_pos, names=("k", "v", "q_pos"))
    cache_lib.check_fits(fn, cache, q_pos, "q_pos")
    if cache_bound is not None and promises.needed(cache.pos):
        held = jnp.max(cache.pos)
        promises.check(
            fn,
            held < cache_bound,
            f"`cache_bound`={cache_bound} promises that the cache holds only positions below it, "
            "but it holds position {held}; pass a larger bound, or None (no promise).",
            held=held,
        )
    opts, m, sinks = inputs.check(fn, q, k, v, q_positions=q_pos, kv_positions=q_pos, **attention)
    seg = m.q_seg if m.q_seg is not None else jnp.ones(np.shape(q_pos), jnp.int32)
    bound = None if cache_bound is None else int(cache_bound)
    return _Call(fn, opts, strategy, bound), seg, sinks


def choose(call: _Call, q, k, n, layout, cache):
    """The strategy `call.strategy` names, or the cost model's cheapest for "auto"
    (estimate_costs with the cached length: the bound, else the cache's whole length)."""
    if call.strategy != "auto":
        return call.strategy
    if n == 1:
        return "pass_kv"  # one step: all three are the same
    (b, t, h, d), kh = q.shape, k.shape[2]
    cached = cache.num_slots if call.cache_bound is None else min(call.cache_bound, cache.num_slots)
    spec = call.opts.spec
    return costs.choose_strategy(
        batch=b, q_len=t * n, kv_len=t * n, num_heads=h, num_kv_heads=kh, head_dim=d,
        dtype=jnp.result_type(q, k), mesh_axis_sizes={"x": n}, axis_name="x",
        causal=spec.causal, local_window_size=spec.window, layout=layout, cached_len=cached,
        cache_layout="striped" if cache.striped else "contiguous", cache_slots=cache.num_slots,
    )  # fmt: skip


def _local(call, strategy, q, k, v, q_pos, seg, cache, sinks, axis_name):
    """(out, lse, cache) of a checked call on this device's shards."""
    n = 1 if axis_name is None else lax.axis_size(axis_name)
    if axis_name is not None:
        sharded.check_shard(call.fn, cache, axis_name)
    dtype = jnp.result_type(q, k, v)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    src = chunked.Source(chunked.prefix(cache, call.cache_bound, n), k, v, q_pos, seg)
    return chunked.run(call.fn, strategy, call.opts, q, src, cache, sinks, axis_name)


def _finish(out, lse, cache, return_lse):
    return ((out, public_lse(lse)) if return_lse else out), cache


@keywords.takes(keywords.PrefillKeywords, causal=True)
def prefill(
    q, k, v, q_pos, cache, *, cache_bound=None, return_lse=False,
    **attention: Unpack[keywords.PrefillKeywords],
):  # fmt: skip
    """(out [B, c, H, Dv], cache): the chunk against the cache (and itself) on one device, then
    written into it. Arguments as in `prefill_on_mesh`."""
    fn = "prefill"
    call, seg, sinks = _check(fn, q, k, v, q_pos, cache, "pass_kv", cache_bound, attention)
    out, lse, cache = _local_jit(call, "pass_kv", q, k, v, q_pos, seg, cache, sinks, None)
    return _finish(out, lse, cache, return_lse)


@keywords.takes(keywords.PrefillKeywords, causal=True)
def sharded_prefill(
    q, k, v, q_pos, cache, *, axis_name, strategy="auto", layout="contiguous", cache_bound=None,
    return_lse=False, **attention: Unpack[keywords.PrefillKeywords],
):  # fmt: skip
    """`prefill_on_mesh` inside jax.shard_map: q/k/v/q_pos/segment_ids are this device's shard
    of the chunk, `cache` its shard of the cache; `layout` (the chunk's token order) only informs
    "auto". Returns this device's rows and its cache shard."""
    fn = "sharded_prefill"
    sharding.check_bound(fn, axis_name, "ringattn.decode.prefill.prefill_on_mesh")
    call, seg, sinks = _check(fn, q, k, v, q_pos, cache, strategy, cache_bound, attention)
    layouts.check_layout_name(fn, layout)
    chosen = choose(call, q, k, lax.axis_size(axis_name), layout, cache)
    out, lse, cache = _local_jit(call, chosen, q, k, v, q_pos, seg, cache, sinks, axis_name)
    return _finish(out, lse, cache, return_lse)


@keywords.takes(keywords.PrefillKeywords, causal=True)
def prefill_on_mesh(
    q, k, v, q_pos, cache, *, mesh, axis_name="context", batch_axis=None, layout="contiguous",
    input_layout=None, strategy="auto", cache_bound=None, return_lse=False,
    **attention: Unpack[keywords.PrefillKeywords],
):  # fmt: skip
    """(out [B, c, H, Dv], cache): a chunk of c new tokens against a cache sharded over
    `axis_name` (P(batch_axis, axis_name)), then written into it; chunked.py describes the
    strategies ("auto": the cost model's choice) and the mask.

    q [B, c, H, D], k/v [B, c, K, D|Dv], q_pos and segment_ids [B, c] are global arrays
    sharded over `axis_name` (c a multiple of the devices, of twice that for zigzag); out comes
    back in their order (and lse [B, H, c] f32 with return_lse). `layout` is the token order the
    devices compute the chunk in; `input_layout` the order the arrays are in: None (their
    positions say where each token is; `layout` then only informs "auto"), "natural" (laid out
    inside and back, as in `ringattn.context_parallel_attention`) or `layout` itself.
    The cache's own layout is its `cache_layout`. `cache_bound`: chunked.py.
    """
    fn = "prefill_on_mesh"
    call, seg, sinks = _check(fn, q, k, v, q_pos, cache, strategy, cache_bound, attention)
    sharded.check_mesh(fn, cache, mesh, axis_name, batch_axis)
    n = mesh.shape[axis_name]
    layouts.check_layout(fn, layout, q.shape[1], n, "chunk length")
    lengths = {"chunk length": q.shape[1]}
    natural = layouts.check_input_layout(fn, layout, input_layout, True, lengths, n) is not None
    call = dataclasses.replace(call, strategy=choose(call, q, k, n, layout, cache))
    order = layout if natural else None  # what to lay the chunk out in, and back
    out, lse, cache = _on_mesh(
        call, mesh, axis_name, batch_axis, order, q, k, v, q_pos, seg, cache, sinks
    )
    return _finish(out, lse, cache, return_lse)


# The names before the three levels were named alike (docs/design.md's naming table).
prefill_attention = deprecation.alias(prefill, "ringattn.decode.prefill.prefill_attention")
sharded_prefill_attention = deprecation.alias(
    sharded_prefill, "ringattn.decode.prefill.sharded_prefill_attention"
)


@functools.partial(jax.jit, static_argnums=(0, 1, 9))
def _local_jit(call, strategy, q, k, v, q_pos, seg, cache, sinks, axis_name):
    """_local compiled once per static call: an eager caller runs one program (inside a
    caller's jit it inlines)."""
    return _local(call, strategy, q, k, v, q_pos, seg, cache, sinks, axis_name)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _on_mesh(call, mesh, axis_name, batch_axis, order, q, k, v, q_pos, seg, cache, sinks):
    rows = P(batch_axis, axis_name)
    seq = P(batch_axis, axis_name, None, None)
    q, k, v = (sharding.place(x, mesh, seq) for x in (q, k, v))
    q_pos, seg = (sharding.place(x, mesh, rows) for x in (q_pos, seg))
    cache = sharded.shard_cache(cache, mesh, axis_name, batch_axis)

    def local(q, k, v, q_pos, seg, cache, sinks):
        if order is not None:
            q, k, v, q_pos, seg = (
                layouts.from_natural(x, order, axis_name) for x in (q, k, v, q_pos, seg)
            )
        out, lse, cache = _local(call, call.strategy, q, k, v, q_pos, seg, cache, sinks, axis_name)
        if order is not None:
            out = layouts.to_natural(out, order, axis_name)
            lse = layouts.to_natural(lse, order, axis_name, axis=2)
        return out, lse, cache

    vma = not dispatch.needs_vma_off(call.opts.kernel, dispatch.mesh_platform(mesh))
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(seq, seq, seq, rows, rows, rows, P()),
        out_specs=(seq, P(batch_axis, None, axis_name), rows),
        check_vma=vma,
    )(q, k, v, q_pos, seg, cache, sinks)
