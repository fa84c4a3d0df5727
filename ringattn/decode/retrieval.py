"""Decoding with a retrieval cache (Quest, Tang et al. 2024; InfLLM, Xiao et al. 2024): the
sinks and a recent window attended exactly, and of the older tokens only the pages whose key
bounds promise the largest scores; a bounded read per step whatever the context.

    cache = init_cache(batch, max_len, num_kv_heads, head_dim, num_sinks=4, window=252,
                       page_size=64, top_pages=12)       # 4 + 252 + 12 x 64 = 1024 per step
    cache = update(cache, k_new, v_new, pos_new)         # keys rotated at their positions
    out = attend(q, pos_new, cache)

Each call (a decode step, or a chunk of a prompt) scores every page against its queries: an
upper bound of q.k (pages.page_scores; per KV head, the max over the head's query group and a
block of `selection_block` consecutive queries), takes the top `top_pages` per KV head and
block, gathers only those pages, and attends over sinks + window + chosen pages; the three
partial results merge through their lse. With `top_pages` covering every page the result is the
full cache's; with fewer it is exact attention over the chosen pages (pages.py says which keys a
query sees).

On a mesh (`sharded_*` inside jax.shard_map, `*_on_mesh` over global arrays) the pages are
striped over the context axis; each device scores its own pages and keeps its top ones, one
all-gather of those scores ([B, K, blocks, top_pages] per device) picks the global top pages,
each device attends to the chosen pages it holds (no page's K/V moves) and to its part of the
sinks and window, and the partial results merge through lse (attend.merge_partials): a step
moves the scores and the per-query results, nothing of the cache. Each device gathers up to
top_pages pages (all the global top ones may be its own), so a step's time on n devices is at
most one device's reading top_pages pages and window / n.

RoPE: keys are stored rotated at their text positions and queries rotate at theirs, as in a full
cache (InfLLM gives retrieved blocks one fixed position instead); so `attend` takes no `rope`.
"""

from __future__ import annotations

from typing import Unpack

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ringattn.attention import keywords
from ringattn.attention.kernels.fused import merge
from ringattn.decode import attend as attend_lib
from ringattn.decode import cache as cache_lib
from ringattn.decode import pages, sharded
from ringattn.decode.pages import RetrievalCache, init_cache  # noqa: F401 (the public names)
from ringattn.parallel import sharding

_FAR = 2**30  # a window edge no position difference reaches


def _check_cache(fn, cache):
    if not isinstance(cache, RetrievalCache):
        raise TypeError(f"{fn}: `cache` must be a RetrievalCache (init_cache), got {type(cache)}.")


def _check_new(fn, cache, k_new, v_new, pos_new):
    _check_cache(fn, cache)
    cache_lib.check_new(fn, pages.kv_shapes(cache), k_new, v_new, pos_new)
    pages.check_fits(fn, cache, pos_new)


def _check_attend(fn, q, q_pos, cache, attention):
    _check_cache(fn, cache)
    rule, sinks = attend_lib.check_attend(fn, q, q_pos, pages.kv_shapes(cache), None, attention)
    if not rule.causal:
        raise ValueError(f"{fn}: a retrieval cache attends causally; `causal` must be True.")
    pages.check_consecutive(fn, q_pos)
    return rule, sinks


def _check_devices(fn, cache, axis_name):
    """(index, count) of this device, checking that `cache` is its share of the pages."""
    sharding.check_bound(fn, axis_name, f"ringattn.decode.retrieval.{fn.replace('sharded_', '')}")
    n = lax.axis_size(axis_name)
    if cache.num_shards != n or cache.k.shape[1] * n != cache.num_pages:
        raise ValueError(
            f"{fn}: `cache` must be this device's share of a retrieval cache striped over the {n} "
            f"devices of axis `axis_name` {axis_name!r} (init_cache(num_shards={n})); it was made "
            f"for {cache.num_shards} and holds {cache.k.shape[1]} of {cache.num_pages} pages."
        )
    return lax.axis_index(axis_name), n


def _one_device(fn, cache):
    if cache.num_shards != 1:
        raise ValueError(
            f"{fn}: a retrieval cache striped over {cache.num_shards} devices is used on a mesh "
            "(update_on_mesh / attend_on_mesh); on one device make it with num_shards=1."
        )


# ---------------------------------------------------------------------------------------------
# Selection and attention on one device's pages.


def select(cache, q, q_pos, shard=0, axis_name=None):
    """(local pages [B, K, nb, c], chosen [B, K, nb, c] bool): this device's candidates (its
    top c = min(top_pages, its pages) by bound) and which of them are among the top_pages of
    all devices' pages (one all-gather of the candidates' scores); never a page without a
    token the block may see."""
    n = 1 if axis_name is None else lax.axis_size(axis_name)
    scores = pages.page_scores(cache, q, q_pos, shard, n)
    c = min(cache.top_pages, scores.shape[-1])
    top, local = lax.top_k(scores, c)
    chosen = top > -jnp.inf
    if n > 1:
        every = lax.all_gather(top, axis_name, axis=3, tiled=True)  # [B, K, nb, n * c]
        _, best = lax.top_k(every, min(cache.top_pages, n * c))
        ours = (best // c == shard)[..., :, None] & ((best % c)[..., :, None] == jnp.arange(c))
        chosen &= jnp.any(ours, axis=-2)
    return local, chosen


def _pages_attention(cache, q, q_pos, rule, page_BKNC, chosen_BKNC):
    """(out [B, t, H, Dv], lse [B, H, t]) over the chosen pages: per KV head and query block,
    partial_attention over that head's pages, for the tokens older than each query's window."""
    b, t, h, d = q.shape
    kh = cache.k.shape[3]
    tb, nb = pages.blocks(cache, t)
    k, v, ks, vs, pos = pages.pages_read(cache, page_BKNC, chosen_BKNC)
    q = jnp.pad(q, ((0, 0), (0, nb * tb - t), (0, 0), (0, 0))).reshape(b, nb, tb, kh, h // kh, d)
    q_pos = jnp.pad(q_pos, ((0, 0), (0, nb * tb - t)), constant_values=-1).reshape(b, nb, tb)
    left = _FAR if rule.window is None else rule.window[0]
    right = -cache.window if rule.window is None else min(rule.window[1], -cache.window)
    old = rule._replace(window=(left, right))  # j <= p - window: outside the query's window

    def one(q, q_pos, k, v, ks, vs, pos):  # q [B, tb, G, D], k [B, S, D], pos [B, S]
        one_head = lambda x: None if x is None else x[:, :, None]  # noqa: E731
        tokens = pages.view(one_head(k), one_head(v), one_head(ks), one_head(vs), pos)
        return attend_lib.partial_attention(q, q_pos, tokens, old)

    per_head = jax.vmap(one, in_axes=(2, None, 1, 1, 1, 1, 1), out_axes=(2, 1))
    per_block = jax.vmap(per_head, in_axes=(1, 1, 2, 2, 2, 2, 2), out_axes=(1, 3))
    out, lse = per_block(q, q_pos, k, v, ks, vs, pos)  # [B, nb, tb, K, G, Dv], [B, K, G, nb, tb]
    out = out.reshape(b, nb * tb, h, -1)[:, :t]
    return out, lse.reshape(b, h, nb * tb)[..., :t]


def by_position(q, q_pos):
    """(q, q_pos, order): each row's queries sorted by position, padding last, so that blocks
    of consecutive queries are blocks of consecutive positions whatever the order the queries
    came in (a context-parallel layout); `order` puts them back (_unsort)."""
    key = jnp.where(q_pos >= 0, q_pos, jnp.iinfo(jnp.int32).max)
    order = jnp.argsort(key, axis=1, stable=True)
    q = jnp.take_along_axis(q, order[..., None, None], 1)
    return q, jnp.take_along_axis(q_pos, order, 1), order


def _unsort(out_BtHD, lse_BHt, order):
    back = jnp.argsort(order, axis=1)
    out = jnp.take_along_axis(out_BtHD, back[..., None, None], 1)
    return out, jnp.take_along_axis(lse_BHt, back[:, None], 2)


def _local(cache, q, q_pos, rule, shard=0, axis_name=None):
    """(out, lse) of the queries over this device's sinks, window and chosen pages."""
    n = 1 if axis_name is None else lax.axis_size(axis_name)
    q_pos = jnp.asarray(q_pos, jnp.int32)
    q = q.astype(jnp.promote_types(q.dtype, cache.k_min.dtype))
    left = _FAR if rule.window is None else rule.window[0]
    near = rule._replace(window=(min(cache.window - 1, left), 0))  # j > p - window
    window = pages.window_read(cache, q_pos, shard, n)
    out, lse = attend_lib.partial_attention(q, q_pos, window, near)
    sinks = pages.sinks_read(cache)
    if sinks is not None:
        out, lse = merge(out, lse, *attend_lib.partial_attention(q, q_pos, sinks, rule))
    sorted_q, sorted_pos, order = by_position(q, q_pos)
    page, chosen = select(cache, sorted_q, sorted_pos, shard, axis_name)
    far = _pages_attention(cache, sorted_q, sorted_pos, rule, page, chosen)
    return merge(out, lse, *_unsort(*far, order))


# ---------------------------------------------------------------------------------------------
# One device.


def update(cache: RetrievalCache, k_new, v_new, pos_new) -> RetrievalCache:
    """The cache with k_new / v_new [B, t, K, D] (keys rotated at their positions) written at
    positions pos_new [B, t] (negative: padding, not written)."""
    _check_new("update", cache, k_new, v_new, pos_new)
    _one_device("update", cache)
    return pages.write(cache, k_new, v_new, pos_new)


@keywords.takes(keywords.DecodeKeywords, causal=True)
def attend(q, q_pos, cache, *, return_lse=False, **attention: Unpack[keywords.DecodeKeywords]):
    """Attention of q [B, t, H, D] (rotated at q_pos) at positions q_pos [B, t] (consecutive in
    each row; negative: padding, output 0) to the sinks, the window and the chosen pages of the
    cache (module docstring); call after `update` wrote the t new tokens. out [B, t, H, Dv] in
    q's dtype; the soft cap, learned sinks and a layer's local window apply as in attend.attend."""
    rule, sinks = _check_attend("attend", q, q_pos, cache, attention)
    _one_device("attend", cache)
    out, lse = _local(cache, q, q_pos, rule)
    return attend_lib.finish(q, out, lse, sinks, return_lse)


def chosen_pages(q, q_pos, cache):
    """[B, K, nb, top_pages] int32: the pages (global index) each KV head and query block (in
    position order) of a one-device `attend` reads besides sinks and window, -1 for a slot left
    empty."""
    _check_attend("chosen_pages", q, q_pos, cache, dict(keywords.DEFAULTS, causal=True))
    q, q_pos, _ = by_position(q.astype(cache.k_min.dtype), jnp.asarray(q_pos, jnp.int32))
    page, chosen = select(cache, q, q_pos)
    return jnp.where(chosen, page, -1)


# ---------------------------------------------------------------------------------------------
# On a mesh.


def sharded_update(cache, k_new, v_new, pos_new, *, axis_name):
    """`update` on this device's pages (inside shard_map); k_new / v_new / pos_new replicated."""
    fn = "sharded_update"
    _check_new(fn, cache, k_new, v_new, pos_new)
    shard, n = _check_devices(fn, cache, axis_name)
    return pages.write(cache, k_new, v_new, pos_new, shard, n)


@keywords.takes(keywords.DecodeKeywords, causal=True)
def sharded_attend(
    q, q_pos, cache, *, axis_name, return_lse=False, **attention: Unpack[keywords.DecodeKeywords]
):
    """`attend` inside shard_map: q / q_pos (and sinks) replicated, `cache` this device's pages;
    the result (replicated) is the one-device cache's."""
    fn = "sharded_attend"
    rule, sinks = _check_attend(fn, q, q_pos, cache, attention)
    shard, _ = _check_devices(fn, cache, axis_name)
    out, lse = _local(cache, q, q_pos, rule, shard, axis_name)
    out, lse = attend_lib.merge_partials(out, lse, axis_name)
    return attend_lib.finish(q, out, lse, sinks, return_lse)


def cache_sharding(cache, mesh, axis_name="context", batch_axis=None):
    """NamedShardings of the cache's arrays (`cache` may hold ShapeDtypeStructs): pages over
    `axis_name`, the store in host memory for host_pages."""
    sharded.check_mesh("cache_sharding", cache, mesh, axis_name, batch_axis)
    spec = P(batch_axis, axis_name)
    return pages.place_store(
        cache, lambda _, host: NamedSharding(mesh, spec, memory_kind=pages.HOST if host else None)
    )


def shard_cache(cache, mesh, axis_name="context", batch_axis=None):
    """The cache with its pages split over `axis_name` (as cache_sharding says)."""
    sharded.check_mesh("shard_cache", cache, mesh, axis_name, batch_axis)
    spec = P(batch_axis, axis_name)

    def place(x, host):
        if host:
            return jax.device_put(x, NamedSharding(mesh, spec, memory_kind=pages.HOST))
        return sharding.place(x, mesh, spec)

    return pages.place_store(cache, place)


def _specs(cache, batch_axis, axis_name):
    return jax.tree.map(lambda _: P(batch_axis, axis_name), cache)


def update_on_mesh(cache, k_new, v_new, pos_new, *, mesh, axis_name="context", batch_axis=None):
    """`update` of a global cache whose pages are split over `axis_name`."""
    fn = "update_on_mesh"
    _check_cache(fn, cache)
    sharded.check_mesh(fn, cache, mesh, axis_name, batch_axis)
    _check_new(fn, cache, k_new, v_new, pos_new)
    rows = P(batch_axis)
    new = [sharding.place(jnp.asarray(x), mesh, rows) for x in (k_new, v_new, pos_new)]

    def local(cache, k_new, v_new, pos_new):
        return sharded_update(cache, k_new, v_new, pos_new, axis_name=axis_name)

    specs = _specs(cache, batch_axis, axis_name)
    return jax.shard_map(local, mesh=mesh, in_specs=(specs, rows, rows, rows), out_specs=specs)(
        shard_cache(cache, mesh, axis_name, batch_axis), *new
    )


@keywords.takes(keywords.DecodeKeywords, causal=True)
def attend_on_mesh(
    q, q_pos, cache, *, mesh, axis_name="context", batch_axis=None, return_lse=False,
    **attention: Unpack[keywords.DecodeKeywords],
):  # fmt: skip
    """`attend` to a global cache whose pages are split over `axis_name`; q, q_pos and the
    result are replicated over it (split P(batch_axis) on the batch)."""
    fn = "attend_on_mesh"
    _check_cache(fn, cache)
    sharded.check_mesh(fn, cache, mesh, axis_name, batch_axis)
    _check_attend(fn, q, q_pos, cache, attention)
    sinks = attention.pop("sinks")

    def local(q, q_pos, cache, sinks):
        return sharded_attend(
            q, q_pos, cache, axis_name=axis_name, sinks=sinks, return_lse=True, **attention
        )

    rows = P(batch_axis)
    new = [sharding.place(jnp.asarray(x), mesh, rows) for x in (q, q_pos)]
    out, lse = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(rows, rows, _specs(cache, batch_axis, axis_name), P()),
        out_specs=(rows, rows),
    )(*new, shard_cache(cache, mesh, axis_name, batch_axis), sinks)
    return (out, lse) if return_lse else out
