"""Chunked prefill: a chunk of new tokens attends to a KV cache that already holds tokens (and to
itself) and is written into it; on a mesh the cache stays sharded along the sequence.

Inside jax.shard_map over the context axis device r holds shard r of a full cache (cache.py says
which positions: contiguous or striped) and shard r of the chunk (its tokens in a context-parallel
`layout`). Device r's *source* is the keys it holds: its cache shard as it was before the chunk,
and its part of the chunk. Every query must meet every source; three ways (Meta's
context-parallel inference, arXiv 2411.01783, Sec. 3):

  pass_kv  the sources travel the ring, the queries stay: n - 1 hops of (cached + chunk) / n
           tokens' K/V, each issued before the compute it overlaps; each device writes the chunk
           tokens it owns as they pass. For chunks long against the cache.
  pass_q   the queries travel with their running (out, lse), the sources stay: n - 1 hops, then
           one hop takes each result home; the chunk is then written (gathered: it is short).
           For short chunks against a long cache: the cache never moves.
  decode   every device gets every query and the chunk's K/V (one all-gather of them all)
           and attends the queries to its source; the partial results merge through lse, each
           device keeping its own rows (one all-to-all): what a decode step does, two
           collectives (the fewest: the queries must reach every source, and the results come
           back), for the shortest chunks.

`strategy="auto"` picks by the cost model (`ringattn.estimate_costs(..., cached_len=)`,
parallel/prefill_costs.py).

Visibility: a query (position >= 0) sees a cached token when the mask rule (causal, window) holds
for their positions, and a token of the chunk when, besides, both carry the same segment id:
packed documents of a chunk each see the cached context (a shared prefix), not each other.
Padding (position < 0) sees nothing, gives 0 and is not written. Every pass runs the attention
kernels (attention/kernels/), so GQA, windows, the soft cap, sinks and the fused kernels are
those of training.

`cache_bound` (static) promises that every position the cache holds is below it: the passes then
read, and pass_kv sends, only the slots of each shard that may hold one (striped: ceil(bound /
n), contiguous: min(bound, S / n)); 0 skips the cache (a first chunk).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ringattn.attention import inputs
from ringattn.attention.blockwise import add_sinks, make_config
from ringattn.attention.kernels import base
from ringattn.attention.kernels.xla import from_storage
from ringattn.decode import cache as cache_lib
from ringattn.decode import merge
from ringattn.parallel import prefill_costs, ring

STRATEGIES = ("pass_kv", "pass_q", "decode")
_NO_QUERY = int(np.iinfo(np.int32).min)  # the segment of a padding query: no key has it
_NO_KEY = _NO_QUERY + 1  # the segment of an empty slot or a padding key: no query has it


class Source(NamedTuple):
    """One device's keys: its cache shard's first slots (a KVCache, None when the cache is
    skipped) and its part of the chunk, k/v [B, c, K, D], positions and segments [B, c]."""

    cached: cache_lib.KVCache | None
    k: jax.Array
    v: jax.Array
    pos: jax.Array
    seg: jax.Array


class Queries(NamedTuple):
    """Queries in the kernel's layout (padded), with positions and segments [B, t]."""

    q_: jax.Array
    pos: jax.Array
    seg: jax.Array


class Keys(NamedTuple):
    """A source prepared once for its kernel passes (what pass_kv sends): each part as
    base.prepare_kv leaves it, (k_, v_, positions, segments) in the kernel's storage, padded to
    whole blocks, segments marking empty slots and padding (_NO_KEY); `cached` None: no cache."""

    cached: tuple | None
    chunk: tuple


def _keys(cfgs, src: Source) -> Keys:
    cached_cfg, chunk_cfg = cfgs
    cached = None
    if src.cached is not None:
        k, v = cache_lib.cache_kv(src.cached, cached_cfg.dtype)  # int8: dequantised once
        held = jnp.where(src.cached.pos >= 0, 1, _NO_KEY)  # any document sees the cache
        cached = base.prepare_kv(cached_cfg, k, v, src.cached.pos, held)
    seg = jnp.where(src.pos >= 0, src.seg, _NO_KEY)
    return Keys(cached, base.prepare_kv(chunk_cfg, src.k, src.v, src.pos, seg))


def _pass(cfg, qu: Queries, q_seg, keys, state):
    """The ring's forward step of the queries (segments q_seg) over prepared keys."""
    return ring.forward_step(cfg, qu.q_, base.make_side(qu.pos, q_seg, cfg.block_q), keys, state)


def _attend(cfgs, qu: Queries, keys: Keys, state):
    """Continue the queries' state over a source: its cached tokens, then its chunk tokens."""
    is_query = qu.pos >= 0
    if keys.cached is not None:
        state = _pass(cfgs[0], qu, jnp.where(is_query, 1, _NO_QUERY), keys.cached, state)
    return _pass(cfgs[1], qu, jnp.where(is_query, qu.seg, _NO_QUERY), keys.chunk, state)


def _chunk_tokens(cfg, keys: Keys, length):
    """The chunk's (k, v, positions) [B, length ...] back from its prepared form (to write)."""
    k_, v_, pos, _ = keys.chunk
    back = lambda x: from_storage(x[:, :length], cfg.dtype)  # noqa: E731
    return back(k_), back(v_), pos[:, :length]


def prefix(cache, bound, n):
    """The cache's slots on this shard (of n) that may hold a position < bound (None: none):
    the first ceil(bound / N) of each of its stripes (a striped cache over N shards: one stripe
    per device on a mesh, all N on one device), or its first min(bound, S / n) slots."""
    if bound is None:
        return cache
    if cache.striped:
        stripes = cache.num_shards // n
        per = prefill_costs.prefix_len(bound, cache.num_shards, "striped", cache.num_slots)
    else:
        stripes = 1
        per = prefill_costs.prefix_len(bound, n, "contiguous", cache.num_slots)
    per = min(per, cache.pos.shape[1] // stripes)
    if per == 0:
        return None

    def cut(x):  # [B, stripes * S', ...] -> [B, stripes * per, ...]
        if x is None:
            return None
        b, rest = x.shape[0], x.shape[2:]
        return x.reshape(b, stripes, -1, *rest)[:, :, :per].reshape(b, stripes * per, *rest)

    arrays = ("k", "v", "k_scale", "v_scale", "pos")
    return dataclasses.replace(cache, **{name: cut(getattr(cache, name)) for name in arrays})


def _configs(fn, opts, q, src: Source):
    """(cached pass Config or None, chunk pass Config): one kernel, fitted to each."""
    m = inputs.MaskArrays(src.pos, src.pos, src.seg, src.seg)  # segments: always (padding)
    chunk = make_config(fn, opts, q, src.k, src.v, m)
    if src.cached is None:
        return None, chunk
    return make_config(fn, opts, q, src.k, src.v, m, kv_len=src.cached.pos.shape[1]), chunk


def _queries(cfg, q, pos, seg, num_kv_heads):
    q_ = base.pad_to_block(cfg.kernel.store_q(q, num_kv_heads), cfg.block_q)
    return Queries(q_, pos, seg)


def run(fn, strategy, opts, q, src: Source, cache, sinks, axis_name):
    """(out [B, t, H, Dv] in q's dtype, lse [B, H, t] f32, cache): the strategy's loop."""
    n = 1 if axis_name is None else lax.axis_size(axis_name)
    index = 0 if axis_name is None else lax.axis_index(axis_name)
    kh, c = src.k.shape[2], src.k.shape[1]
    q_all, pos_all, seg_all = q, src.pos, src.seg
    gathered = None  # the chunk's K/V and positions, gathered once to be written
    if strategy == "decode" and n > 1:
        q_all, pos_all, seg_all, k_all, v_all = merge.gather_packed(
            [q, src.pos, src.seg, src.k, src.v], axis_name
        )
        gathered = (k_all, v_all, pos_all)
    cfgs = _configs(fn, opts, q_all, src)
    kern, cfg = cfgs[1].kernel, cfgs[1]
    qu = _queries(cfg, q_all, pos_all, seg_all, kh)
    keys = _keys(cfgs, src)
    state = kern.init_state(cfg, qu.q_, src.v)
    if strategy == "pass_kv" and n > 1:

        def step(keys, carry):  # the visiting chunk tokens this device owns go in its cache
            state, cache = carry
            cache = cache_lib.write(cache, *_chunk_tokens(cfg, keys, c), shard=index)
            return _attend(cfgs, qu, keys, state), cache

        plan = ring.RingPlan(0, n)
        state, cache = ring.ring_loop(n, axis_name, plan, step, keys, (state, cache))
    elif strategy == "pass_q" and n > 1:

        def step(qu, carry):
            return (_attend(cfgs, qu, keys, carry[0]),)

        plan = ring.RingPlan(0, n)
        (state,) = ring.ring_loop(n, axis_name, plan, step, qu, (state,), send_carry=True)
    else:  # decode, or one device: one step
        state = _attend(cfgs, qu, keys, state)
    o, lse = kern.finish_fwd(cfg, q_all, state)
    if strategy == "decode" and n > 1:
        o, lse = merge.merge_own_rows(o, lse, axis_name)
    if strategy != "pass_kv" or n == 1:
        if gathered is None:  # pass_q: the chunk is short, gather it (one collective)
            gathered = (src.k, src.v, src.pos)
            if n > 1:
                gathered = merge.gather_packed(list(gathered), axis_name)
        cache = cache_lib.write(cache, *gathered, shard=index)
    o, lse = add_sinks(o, lse, sinks)
    return o.astype(q.dtype), lse, cache
