"""A KV cache sharded along its sequence axis over a mesh axis: decoding never moves it.

Shard r of n holds the global slots [r S/n, (r+1) S/n) (S % n == 0): for a contiguous full cache
the positions [r S/n, (r+1) S/n), for a striped one the positions p with p mod n == r
(cache.py). Each step, inside shard_map:
  * update: every device sees the (replicated) new K/V and writes only the tokens whose slot it
    owns (a masked scatter, cache.write);
  * attend: every device attends the (replicated) queries to its own slots, giving (out_r,
    lse_r), and the partials merge exactly through lse (merge.merge_partials): one all-gather
    of [B, t, H, D + 1] values a step, never the cache. Window kinds rotate keys at their
    StreamingLLM positions, which depend on the newest position held: the queries carry it
    (`update` wrote them first), so that costs no collective either.

`sharded_*` are called inside jax.shard_map with the local shard; `*_on_mesh` wrap them over
global arrays: the cache sharded P(batch_axis, axis_name), the new tokens and queries
P(batch_axis) (batch_axis=None: replicated; a tuple of axes: split over all of them), so a
(data, context) mesh shards both.
"""

from __future__ import annotations

import math
from typing import Unpack

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ringattn import deprecation, promises
from ringattn.attention import keywords
from ringattn.decode import attend as attend_lib
from ringattn.decode import cache as cache_lib
from ringattn.decode import merge
from ringattn.parallel import sharding


def check_shard(fn, cache, axis_name):
    """(index, count) of this device's shard, checking that the shards tile the cache."""
    sharding.check_bound(fn, axis_name, f"ringattn.decode.sharded.{_GLOBAL.get(fn, fn)}")
    n = lax.axis_size(axis_name)
    s_loc = cache.pos.shape[1]
    if s_loc * n != cache.num_slots:
        raise ValueError(
            f"{fn}: `cache` must be this device's shard of the sequence axis: {cache.num_slots} "
            f"slots over {n} devices of axis `axis_name` {axis_name!r} is "
            f"{cache.num_slots / n:g} each, got {s_loc}."
        )
    if cache.striped and cache.num_shards != n:
        raise ValueError(
            f"{fn}: a 'striped' cache made for {cache.num_shards} shards is sharded over the {n} "
            f"devices of axis `axis_name` {axis_name!r}; build it with num_shards={n}."
        )
    return lax.axis_index(axis_name), n


# The global-array counterpart of each function that runs on shards (for its errors).
_GLOBAL = dict(sharded_update="update_on_mesh", sharded_attend="attend_on_mesh")


def sharded_update(cache, k_new, v_new, pos_new, *, axis_name):
    """`update` on this device's shard (inside shard_map); k_new/v_new/pos_new replicated."""
    fn = "sharded_update"
    cache_lib.check_new(fn, cache, k_new, v_new, pos_new)
    cache_lib.check_fits(fn, cache, pos_new)
    index, _ = check_shard(fn, cache, axis_name)
    return cache_lib.write(cache, k_new, v_new, pos_new, shard=index)


def sharded_cache_positions(cache, q_pos=None, *, axis_name):
    """`cache_positions` of this device's slots (the newest position is a pmax over shards)."""
    check_shard("sharded_cache_positions", cache, axis_name)
    return cache_lib.positions_from_length(cache, q_pos, _held_length(cache, axis_name))


def _held_length(cache, axis_name):
    """1 + the newest position any shard holds, per row [B] (one all-reduce)."""
    return lax.pmax(jnp.max(cache.pos, axis=1) + 1, axis_name)


def query_cache_positions(fn, cache, q_pos, axis_name):
    """`sharded_cache_positions` from the queries alone: `update` wrote them before they
    attend, and a stream's positions grow, so the newest position held is the newest query's
    (a row of padding only sees nothing, whatever its positions). No collective; the promise is
    checked in eager calls and under `ringattn.debug_checks()`."""
    length = jnp.max(jnp.asarray(q_pos, jnp.int32), axis=1) + 1
    if cache.kind != "full" and promises.needed(q_pos, cache.pos):
        held = _held_length(cache, axis_name)
        promises.check(
            fn,
            (length == held) | (length <= 0),
            "the newest query position ({query}) is not the newest position the window cache "
            "holds ({held}): write the queries' tokens with `sharded_update` first, in a stream "
            "whose positions grow.",
            query=jnp.max(length) - 1,
            held=jnp.max(held) - 1,
        )
    return cache_lib.positions_from_length(cache, q_pos, length)


@deprecation.renamed_keywords({"local_window": "local_window_size"})
@keywords.takes(keywords.DecodeKeywords, causal=True)
def sharded_attend(
    q, q_pos, cache, *, axis_name, rope=None, return_lse=False,
    **attention: Unpack[keywords.DecodeKeywords],
):  # fmt: skip
    """`attend` inside shard_map: q/q_pos (and sinks) replicated, `cache` this device's shard;
    the result (replicated) is the same as attending to the whole cache, for one all-gather.
    As for `attend`, call it after `sharded_update` wrote the queries' tokens: a window cache's
    rotary positions count from the newest query."""
    fn = "sharded_attend"
    rule, sinks = attend_lib.check_attend(fn, q, q_pos, cache, rope, attention)
    check_shard(fn, cache, axis_name)
    kv_rope, q_rope = (None, None)
    if rope is not None:
        kv_rope, q_rope = query_cache_positions(fn, cache, q_pos, axis_name)
    out, lse = attend_lib.partial_attention(q, q_pos, cache, rule, kv_rope, q_rope)
    out, lse = merge.merge_partials(out, lse, axis_name)  # the step's one collective
    return attend_lib.finish(q, out, lse, sinks, return_lse)


def check_mesh(fn, cache, mesh, axis_name, batch_axis):
    if not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(f"{fn}: `mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"{fn}: `axis_name` {axis_name!r} is not an axis of {mesh.axis_names}.")
    batch_axes = batch_axis if isinstance(batch_axis, tuple) else (batch_axis,)
    batch_axes = tuple(a for a in batch_axes if a is not None)
    for axis in batch_axes:
        if axis not in mesh.axis_names:
            raise ValueError(f"{fn}: `batch_axis` {axis!r} is not an axis of {mesh.axis_names}.")
    if axis_name in batch_axes:
        raise ValueError(f"{fn}: `batch_axis` must differ from `axis_name`, got {axis_name!r}.")
    n = mesh.shape[axis_name]
    if cache.num_slots % n:
        raise ValueError(
            f"{fn}: the cache's {cache.num_slots} slots must split evenly over the {n} devices "
            f"of mesh axis `axis_name` {axis_name!r}."
        )
    b, rows = cache.pos.shape[0], math.prod(mesh.shape[a] for a in batch_axes)
    if b % rows:
        raise ValueError(
            f"{fn}: the batch ({b}) must split evenly over the {rows} devices "
            f"of mesh axis `batch_axis` {batch_axis!r}."
        )


def cache_sharding(cache, mesh, axis_name="context", batch_axis=None):
    """NamedShardings of the cache's arrays (a pytree like it; `cache` may hold
    jax.ShapeDtypeStruct), for jit's in/out_shardings, e.g. to create the cache sharded:
    jax.jit(init, out_shardings=cache_sharding(jax.eval_shape(init), mesh))()."""
    check_mesh("cache_sharding", cache, mesh, axis_name, batch_axis)
    return jax.tree.map(lambda _: NamedSharding(mesh, P(batch_axis, axis_name)), cache)


def shard_cache(cache, mesh, axis_name="context", batch_axis=None):
    """The cache with its sequence axis sharded over `axis_name` (P(batch_axis, axis_name))."""
    check_mesh("shard_cache", cache, mesh, axis_name, batch_axis)
    return jax.tree.map(lambda x: sharding.place(x, mesh, P(batch_axis, axis_name)), cache)


def update_on_mesh(cache, k_new, v_new, pos_new, *, mesh, axis_name="context", batch_axis=None):
    """`update` of a global cache sharded over `axis_name`; returns it sharded the same way.
    k_new/v_new/pos_new are replicated over `axis_name` first (for a long prompt that is one
    gather of it)."""
    fn = "update_on_mesh"
    check_mesh(fn, cache, mesh, axis_name, batch_axis)
    cache_lib.check_new(fn, cache, k_new, v_new, pos_new)
    cache_lib.check_fits(fn, cache, pos_new)
    seq, rows = P(batch_axis, axis_name), P(batch_axis)
    new = [sharding.place(jnp.asarray(x), mesh, rows) for x in (k_new, v_new, pos_new)]

    def local(cache, k_new, v_new, pos_new):
        return sharded_update(cache, k_new, v_new, pos_new, axis_name=axis_name)

    return jax.shard_map(local, mesh=mesh, in_specs=(seq, rows, rows, rows), out_specs=seq)(
        shard_cache(cache, mesh, axis_name, batch_axis), *new
    )


@deprecation.renamed_keywords({"local_window": "local_window_size"})
@keywords.takes(keywords.DecodeKeywords, causal=True)
def attend_on_mesh(
    q, q_pos, cache, *, mesh, axis_name="context", batch_axis=None, rope=None, return_lse=False,
    **attention: Unpack[keywords.DecodeKeywords],
):  # fmt: skip
    """`attend` to a global cache sharded over `axis_name`; q, q_pos and the result are
    replicated over it (sharded P(batch_axis) on the batch)."""
    fn = "attend_on_mesh"
    check_mesh(fn, cache, mesh, axis_name, batch_axis)
    attend_lib.check_attend(fn, q, q_pos, cache, rope, attention)
    sinks = attention.pop("sinks")

    def local(q, q_pos, cache, sinks):
        return sharded_attend(
            q, q_pos, cache, axis_name=axis_name, rope=rope, sinks=sinks, return_lse=True,
            **attention,
        )  # fmt: skip

    rows = P(batch_axis)
    new = [sharding.place(jnp.asarray(x), mesh, rows) for x in (q, q_pos)]
    out, lse = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(rows, rows, P(batch_axis, axis_name), P()),
        out_specs=(rows, rows),
    )(*new, shard_cache(cache, mesh, axis_name, batch_axis), sinks)
    return (out, lse) if return_lse else out


# Moved to the one sharding helper every global entry point uses.
__getattr__ = deprecation.moved(__name__, {"place": "ringattn.parallel.sharding:place"})
