"""The retrieval cache's page store (Quest, Tang et al. 2024; InfLLM, Xiao et al. 2024): every
token of the stream in pages of P tokens, each page with a summary of its keys; and the reads a
step makes of it (retrieval.py scores, selects and attends).

Arrays (global; over n devices each holds NP / n pages):

    k [B, NP, P, K, D]       int8 with k_scale [B, NP, P, K] float32 when quantised
    v [B, NP, P, K, Dv]      likewise v_scale
    pos [B, NP, P] int32     the position held in each slot, -1: empty
    k_min, k_max [B, NP, K, D]  per page and KV head, the channel-wise min / max of its keys
                             but the sinks' (Quest's bound), float32 (float64 for a float64
                             cache); +inf / -inf while the page holds no such key

A token at position p lives in page g = p // P, slot p % P. Pages are striped over the n devices
of a mesh: page g on device g mod n as its local page g // n (array page (g mod n) NP/n + g // n),
so every prefix of the stream is spread evenly and each device holds part of any window.

Nothing is evicted: the store holds max_len tokens; what is bounded is what a step reads. Keys are
stored rotated at their text positions, as in a full cache, so the bounds are bounds of the keys
attention sees and, with every page chosen, the result is the full cache's.

A query at position p sees keys j <= p from three disjoint sets, each read on its own:

    sinks    j < num_sinks                           the first slots (a static slice)
    window   j >= num_sinks and j > p - window       the pages covering the window: consecutive
                                                     local pages, a per-row slice
    pages    num_sinks <= j <= p - window            tokens of the top_pages pages chosen for the
             and page(j) chosen                      query's block and KV head: a gather

`host_pages=True` keeps the page store (k, v, scales, pos) in host memory (memory kind
"pinned_host"); the summaries stay on the device, and each read is computed on the host
(`compute_on("device_host")`) and only what it read is brought to the device.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.compute_on import compute_on

from ringattn import promises
from ringattn.attention.kernels.xla import from_storage, to_storage
from ringattn.decode import cache as cache_lib

HOST = "pinned_host"
STORE = ("k", "v", "k_scale", "v_scale", "pos")  # what host_pages moves to host memory


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["k", "v", "k_scale", "v_scale", "pos", "k_min", "k_max"],
    meta_fields=[
        "num_slots", "num_sinks", "window", "page_size", "top_pages", "selection_block",
        "num_shards", "host_pages",
    ],
)  # fmt: skip
@dataclasses.dataclass(frozen=True)
class RetrievalCache:
    """The arrays of the module docstring (inside shard_map: this device's pages), and the
    static policy: `num_slots` (global tokens held, NP * P), `num_sinks`, `window` (recent tokens
    read exactly), `page_size` P, `top_pages` (pages chosen per step, query block and KV head),
    `selection_block` (queries of a call that share one selection; None: all of them),
    `num_shards` (devices the pages are striped over), `host_pages`."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None
    v_scale: jax.Array | None
    pos: jax.Array
    k_min: jax.Array
    k_max: jax.Array
    num_slots: int
    num_sinks: int
    window: int
    page_size: int
    top_pages: int
    selection_block: int | None = None
    num_shards: int = 1
    host_pages: bool = False

    kind = "retrieval"

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def num_pages(self) -> int:
        return self.num_slots // self.page_size

    @property
    def tokens_attended(self) -> int:
        """Tokens a decode step attends to (per KV head): sinks + window + chosen pages."""
        return self.num_sinks + self.window + self.top_pages * self.page_size


def _positive(fn, name, x, minimum=1):
    if not cache_lib._is_int(x) or x < minimum:
        raise ValueError(f"{fn}: `{name}` must be an int >= {minimum}, got {x!r}.")


def init_cache(
    batch, max_len, num_kv_heads, head_dim, dtype=jnp.float32, *, num_sinks=4, window=252,
    page_size=64, top_pages=12, selection_block=None, quantize=False, v_head_dim=None,
    num_shards=1, host_pages=False,
):  # fmt: skip
    """An empty retrieval cache holding up to `max_len` tokens (rounded up to whole pages on
    every one of `num_shards` devices); each step attends to `num_sinks` + `window` +
    `top_pages` x `page_size` tokens (module docstring). `dtype`, `quantize`, `v_head_dim` as
    in cache.init_cache. `selection_block`: how many consecutive queries of a call (a prefill
    chunk) share one page selection (None: all of the call's)."""
    fn = "init_cache"
    for name, x in (("batch", batch), ("max_len", max_len), ("num_kv_heads", num_kv_heads),
                    ("head_dim", head_dim), ("window", window), ("page_size", page_size),
                    ("top_pages", top_pages), ("num_shards", num_shards)):  # fmt: skip
        _positive(fn, name, x)
    _positive(fn, "num_sinks", num_sinks, 0)
    if selection_block is not None:
        _positive(fn, "selection_block", selection_block)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{fn}: `dtype` must be a floating dtype, got {dtype!r}.")
    for name, x in (("quantize", quantize), ("host_pages", host_pages)):
        if not isinstance(x, (bool, np.bool_)):
            raise ValueError(f"{fn}: `{name}` must be a bool, got {x!r}.")
    if num_sinks >= max_len:
        raise ValueError(f"{fn}: `num_sinks` ({num_sinks}) must be below max_len ({max_len}).")
    per = page_size * num_shards
    pages = -(-max_len // per) * num_shards
    shape = (batch, pages, page_size, num_kv_heads)
    store = jnp.int8 if quantize else dtype
    acc = jnp.promote_types(dtype, jnp.float32)
    scale = jnp.zeros(shape, jnp.float32) if quantize else None
    bound = (batch, pages, num_kv_heads, head_dim)
    cache = RetrievalCache(
        k=jnp.zeros((*shape, head_dim), store),
        v=jnp.zeros((*shape, head_dim if v_head_dim is None else v_head_dim), store),
        k_scale=scale,
        v_scale=scale,
        pos=jnp.full(shape[:3], -1, jnp.int32),
        k_min=jnp.full(bound, jnp.inf, acc),
        k_max=jnp.full(bound, -jnp.inf, acc),
        num_slots=pages * page_size,
        num_sinks=int(num_sinks),
        window=int(window),
        page_size=int(page_size),
        top_pages=int(top_pages),
        selection_block=None if selection_block is None else int(selection_block),
        num_shards=int(num_shards),
        host_pages=bool(host_pages),
    )
    if not host_pages:
        return cache
    return place_store(
        cache, lambda x, on_host: jax.device_put(x, jax.memory.Space.Host) if on_host else x
    )


def kv_shapes(cache: RetrievalCache) -> cache_lib.KVCache:
    """A KVCache of the store's shapes ([B, S, K, D] ...), for the checks cache.py and
    attend.py make of new tokens and queries."""
    b, np_, p, kh, d = cache.k.shape
    s = np_ * p
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    return cache_lib.KVCache(
        k=spec((b, s, kh, d), cache.k.dtype),
        v=spec((b, s, kh, cache.v.shape[-1]), cache.v.dtype),
        k_scale=None,
        v_scale=None,
        pos=spec((b, s), jnp.int32),
        kind="full",
        num_slots=cache.num_slots,
        num_sinks=0,
        window=None,
    )


def view(k, v, k_scale, v_scale, pos) -> cache_lib.KVCache:
    """Tokens read from the store as a KVCache [B, S', K, D] for attend.partial_attention."""
    return cache_lib.KVCache(
        k=k, v=v, k_scale=k_scale, v_scale=v_scale, pos=pos, kind="full",
        num_slots=pos.shape[1], num_sinks=0, window=None,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Reads and writes of the store, computed where it lives.


def _gather(x, idx):
    """x [B, NP, P, ...] at idx [..., 2] (row, page) -> [..., P, ...], or at idx [..., 3]
    (row, page, KV head) of an x [B, NP, P, K, ...] -> [..., P, ...]: whole pages (per head)."""
    lead, per_head = idx.ndim - 1, idx.shape[-1] == 3
    picked = (0, 1, 3) if per_head else (0, 1)
    sizes = tuple(1 if i in picked else s for i, s in enumerate(x.shape))
    dims = lax.GatherDimensionNumbers(
        offset_dims=tuple(range(lead, lead + x.ndim - len(picked))),
        collapsed_slice_dims=picked,
        start_index_map=picked,
    )
    return lax.gather(x, idx, dims, sizes, mode=lax.GatherScatterMode.CLIP)


def _scatter(x, idx, new):
    """x [B, NP, P, ...] with new [B, t, ...] written at idx [B, t, 3] (row, page, slot);
    out-of-range pages are dropped. Narrow floats scatter as their bits (cache.write's reason)."""
    dims = lax.ScatterDimensionNumbers(
        update_window_dims=tuple(range(2, x.ndim - 1)),
        inserted_window_dims=(0, 1, 2),
        scatter_dims_to_operand_dims=(0, 1, 2),
    )
    out = lax.scatter(
        to_storage(x), idx, to_storage(new.astype(x.dtype)), dims,
        mode=lax.GatherScatterMode.FILL_OR_DROP,
    )  # fmt: skip
    return from_storage(out, x.dtype)


def _near_store(cache, fn, x, *args):
    """fn(x, *args) for a store array x: on the host for host_pages (args moved there first,
    only the result brought to the device), else where x is."""
    if not cache.host_pages:
        return fn(x, *args)
    args = [jax.device_put(a, jax.memory.Space.Host) for a in args]
    with compute_on("device_host"):
        out = fn(x, *args)
    return out


def read(cache, x, idx=None, static=None):
    """Pages of the store array x: gathered at idx (_gather), or the static slice
    x[:, :pages, :slots] for static = (pages, slots); on the device, [B, ..., P, ...]."""
    if x is None:
        return None
    if static is not None:
        out = _near_store(cache, lambda x: x[:, : static[0], : static[1]], x)
    else:
        if idx.shape[-1] == 3 and x.ndim == 3:  # pos has no head axis
            idx = idx[..., :2]
        out = _near_store(cache, _gather, x, idx)
    return jax.device_put(out, jax.memory.Space.Device) if cache.host_pages else out


def write(cache: RetrievalCache, k_new, v_new, pos_new, shard=0, num_devices=1):
    """The cache with the new tokens this device (`shard` of `num_devices`) holds written into
    their pages and the pages' bounds widened; padding (position < 0) and positions past the
    store are dropped. Unchecked: retrieval.update checks."""
    p, n, local = cache.page_size, num_devices, cache.k.shape[1]
    pos = jnp.asarray(pos_new, jnp.int32)
    page = jnp.where(pos >= 0, pos, 0) // p
    keep = (pos >= 0) & (pos < cache.num_slots) & (page % n == shard)
    page = jnp.where(keep, page // n, local)  # local: dropped
    rows = jnp.broadcast_to(jnp.arange(pos.shape[0], dtype=jnp.int32)[:, None], pos.shape)
    idx = jnp.stack([rows, page, jnp.where(pos >= 0, pos, 0) % p], axis=-1)
    acc = cache.k_min.dtype
    if cache.quantized:
        k_store, ks = cache_lib.quantize_int8(k_new)
        v_store, vs = cache_lib.quantize_int8(v_new)
        k_seen = k_store.astype(acc) * ks[..., None].astype(acc)  # what attention will see
    else:
        k_store, v_store = k_new, v_new
        k_seen = k_new.astype(cache.k.dtype).astype(acc)
    put = lambda x, new: _near_store(cache, _scatter, x, idx, new)  # noqa: E731
    new = dict(k=put(cache.k, k_store), v=put(cache.v, v_store), pos=put(cache.pos, pos))
    if cache.quantized:
        new.update(k_scale=put(cache.k_scale, ks), v_scale=put(cache.v_scale, vs))
    # The sinks are read every step anyway: their keys (often far from the rest, the reason
    # models sink attention there) do not widen their page's bound.
    bounded = jnp.where(keep & (pos >= cache.num_sinks), page, local)
    new.update(
        k_min=cache.k_min.at[rows, bounded].min(k_seen, mode="drop"),
        k_max=cache.k_max.at[rows, bounded].max(k_seen, mode="drop"),
    )
    return dataclasses.replace(cache, **new)


def place_store(cache, place):
    """The cache with place(x, host) applied to each of its arrays: host says whether x lives in
    host memory (a store array of a host_pages cache). Takes a cache of ShapeDtypeStructs too."""
    new = {}
    for f in dataclasses.fields(cache):
        x = getattr(cache, f.name)
        if x is not None and f.name in STORE + ("k_min", "k_max"):
            new[f.name] = place(x, cache.host_pages and f.name in STORE)
    return dataclasses.replace(cache, **new)


# ---------------------------------------------------------------------------------------------
# A step's three reads (module docstring) on device `shard` of `num_devices`.


def _flat(x):
    """[B, ..., pages, P, ...] -> [B, ..., pages * P, ...] (the page axis is the one before P)."""
    return None if x is None else x.reshape(*x.shape[:1], -1, *x.shape[3:])


def _tokens(cache, k, v, ks, vs, pos):
    """A view of read pages [B, pages, P, ...] with only the visible positions kept."""
    pos = jnp.where(pos >= cache.num_sinks, pos, -1)
    return view(_flat(k), _flat(v), _flat(ks), _flat(vs), _flat(pos))


def sinks_read(cache: RetrievalCache):
    """The sink tokens (positions < num_sinks) as a view, None without sinks: the first slots
    of the first local pages (on other devices they hold later positions: masked out)."""
    ns, p = cache.num_sinks, cache.page_size
    if ns == 0:
        return None
    sink_pages = -(-ns // p)
    static = (-(-sink_pages // cache.num_shards), ns if sink_pages == 1 else p)
    k, v, ks, vs, pos = (read(cache, getattr(cache, a), static=static) for a in STORE)
    pos = jnp.where(pos < ns, pos, -1)
    return view(_flat(k), _flat(v), _flat(ks), _flat(vs), _flat(pos))


def span(q_pos):
    """(lowest, highest) position [B] of each row's queries (0, -1 for a row of padding)."""
    valid = q_pos >= 0
    big = jnp.iinfo(jnp.int32).max
    lo = jnp.min(jnp.where(valid, q_pos, big), axis=1)
    hi = jnp.max(jnp.where(valid, q_pos, -1), axis=1)
    return jnp.where(hi >= 0, lo, 0), hi


def window_read(cache: RetrievalCache, q_pos, shard=0, num_devices=1):
    """The window tokens of the t queries q_pos [B, t] (each row's at consecutive positions):
    the local pages covering positions lowest - window + 1 .. highest, a slice of consecutive
    local pages per row, with the sinks masked out."""
    p, n, local, t = cache.page_size, num_devices, cache.k.shape[1], q_pos.shape[1]
    lo, _ = span(q_pos)
    first = jnp.maximum(lo - cache.window + 1, 0) // p  # the global page of the oldest token
    spread = (cache.window + t + p - 3) // p + 1  # global pages any such span can touch
    count = min(local, -(-spread // n))
    start = jnp.maximum((first - shard + n - 1) // n, 0)
    start = jnp.minimum(start, local - count)  # no page twice
    pages = start[:, None] + jnp.arange(count, dtype=jnp.int32)
    idx = jnp.stack([jnp.broadcast_to(jnp.arange(pages.shape[0])[:, None], pages.shape), pages], -1)
    return _tokens(cache, *(read(cache, getattr(cache, a), idx) for a in STORE))


def pages_read(cache: RetrievalCache, page_BKNC, chosen_BKNC):
    """The chosen pages' tokens per KV head and query block: k [B, K, nb, c * P, D] ..., pos
    [B, K, nb, c * P] (-1 for slots of pages not chosen, and for sinks)."""
    b, kh, nb, c = page_BKNC.shape
    shape = page_BKNC.shape
    rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None, None, None], shape)
    heads = jnp.broadcast_to(jnp.arange(kh, dtype=jnp.int32)[None, :, None, None], shape)
    idx = jnp.stack([rows, page_BKNC, heads], axis=-1)
    k, v, ks, vs, pos = (read(cache, getattr(cache, a), idx) for a in STORE)
    pos = jnp.where(chosen_BKNC[..., None] & (pos >= cache.num_sinks), pos, -1)
    flat = lambda x: None if x is None else x.reshape(b, kh, nb, c * x.shape[4], *x.shape[5:])  # noqa: E731
    return flat(k), flat(v), flat(ks), flat(vs), flat(pos)


# ---------------------------------------------------------------------------------------------
# Scores: an upper bound of q.k per page.


def blocks(cache, t):
    """(queries per selection, selections) for a call of t queries."""
    tb = t if cache.selection_block is None else min(cache.selection_block, t)
    return tb, -(-t // tb)


def page_scores(cache: RetrievalCache, q_BtHD, q_pos, shard=0, num_devices=1):
    """[B, K, nb, pages] float: per KV head and query block, the largest upper bound of q.k
    over the block's queries and the head's query group, for each local page (Quest: for
    channel d, max(q_d min_d, q_d max_d)); -inf for pages that hold no token the block may
    choose (empty, only sinks, or only inside every query's window)."""
    b, t, h, d = q_BtHD.shape
    kh = cache.k_min.shape[2]
    tb, nb = blocks(cache, t)
    acc = cache.k_min.dtype
    q = jnp.pad(q_BtHD.astype(acc), ((0, 0), (0, nb * tb - t), (0, 0), (0, 0)))
    q = q.reshape(b, nb, tb, kh, h // kh, d)
    pos = jnp.pad(q_pos, ((0, 0), (0, nb * tb - t)), constant_values=-1).reshape(b, nb, tb)
    filled = jnp.isfinite(cache.k_min[:, :, 0, 0])  # [B, pages]
    lo = jnp.where(filled[..., None, None], cache.k_min, 0)
    hi = jnp.where(filled[..., None, None], cache.k_max, 0)
    s = jnp.einsum("bntkgd,bpkd->bkntgp", jnp.maximum(q, 0), hi)
    s = s + jnp.einsum("bntkgd,bpkd->bkntgp", jnp.minimum(q, 0), lo)
    s = jnp.where((pos >= 0)[:, None, :, :, None, None], s, -jnp.inf).max(axis=(3, 4))
    newest = jnp.max(pos, axis=2)  # [B, nb]
    start = (jnp.arange(filled.shape[1], dtype=jnp.int32) * num_devices + shard) * cache.page_size
    old = start[None, None] <= (newest - cache.window)[..., None]  # a token outside a window
    choosable = filled[:, None] & old & (start + cache.page_size > cache.num_sinks)
    return jnp.where(choosable[:, None], s, -jnp.inf)


# ---------------------------------------------------------------------------------------------
# Checks and sizes.


def check_fits(fn, cache, pos_new, name="pos_new"):
    """The store holds positions 0 .. num_slots - 1 (as a full cache's max_len)."""
    if np.shape(pos_new)[1] > cache.num_slots:
        raise ValueError(
            f"{fn}: {np.shape(pos_new)[1]} new tokens cannot fit a retrieval cache of "
            f"{cache.num_slots} tokens; make it longer (init_cache's max_len)."
        )
    if promises.needed(pos_new):
        top = jnp.max(jnp.asarray(pos_new, jnp.int32))
        promises.check(
            fn,
            top < cache.num_slots,
            f"`{name}` reaches position {{top}}, past the end of the retrieval cache "
            f"({cache.num_slots} tokens): it would not be stored; make the cache longer.",
            top=top,
        )


def check_consecutive(fn, q_pos):
    """Each row's queries sit at consecutive positions (padding anywhere): the window read
    covers window + t - 1 positions."""
    if not promises.needed(q_pos):
        return
    lo, hi = span(jnp.asarray(q_pos, jnp.int32))
    gap = jnp.max(hi - lo)
    promises.check(
        fn,
        gap < np.shape(q_pos)[1],
        f"the positions of a row's queries must be consecutive (a chunk of the stream), but "
        f"they span {{gap}} + 1 positions for {np.shape(q_pos)[1]} queries.",
        gap=gap,
    )


def bytes_read(cache: RetrievalCache, t=1):
    """Bytes of the cache that each device reads for a call of t queries (the three reads and
    the page bounds), from a (global) cache's shapes alone."""
    b, _, p, kh, d = cache.k.shape
    n = cache.num_shards
    local = cache.num_pages // n
    dv, item = cache.v.shape[-1], cache.k.dtype.itemsize
    head = (d + dv) * item + (8 if cache.quantized else 0)  # one token of one KV head
    token = kh * head + 4  # + its position
    sinks = 0
    if cache.num_sinks:
        sink_pages = -(-cache.num_sinks // p)
        sinks = -(-sink_pages // n) * (cache.num_sinks if sink_pages == 1 else p)
    window = min(local, -(-((cache.window + t + p - 3) // p + 1) // n)) * p
    _, nb = blocks(cache, t)
    chosen = kh * nb * min(cache.top_pages, local) * p * (head + 4)
    bounds = 2 * local * kh * d * cache.k_min.dtype.itemsize
    return b * ((sinks + window) * token + chosen + bounds)
