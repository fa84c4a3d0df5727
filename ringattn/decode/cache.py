"""KV caches for decoding: full, sink + window (StreamingLLM), window only; optionally int8.

A cache is a pytree of arrays, k and v [B, S, K, D] and `pos` [B, S] int32, the position of the
token held in each slot (-1: empty), plus static metadata. Every kind places a token by its
position alone, so rows of a batch may sit at different positions (ragged prompts: give padding
tokens position -1 and they are not written):

    "full":         slot = pos                                   (S = max_len)
    "sink_window":  slot = pos if pos < num_sinks,
                    else num_sinks + (pos - num_sinks) % window  (S = num_sinks + window)
    "window":       sink_window with num_sinks = 0

so the sinks stay forever and the window is a ring buffer whose writes evict the token `window`
positions older. Positions of one row must be distinct within an update and increase from one
update to the next (a stream); a full cache drops tokens at positions >= max_len.

A full cache split over n devices (sharded.py) places positions by its `cache_layout`:

    "contiguous":   slot = pos: shard r holds positions [r S/n, (r+1) S/n), so a prompt fills
                    the shards in order (device 0 first);
    "striped":      shard pos mod n, local slot pos // n (round-robin, `num_shards` = n): every
                    prefix of the stream is spread evenly, so each chunk appended later
                    (chunked.py) finds the cached work balanced over the devices, and the
                    filled slots of every shard are a prefix of it.

Attention reads positions, never slots, so the layout changes where tokens live, not results.
The default is "striped" (with num_shards = 1, the same as "contiguous"); window kinds are ring
buffers, contiguous by construction.

Positions for RoPE (StreamingLLM, Xiao et al. 2023, Sec. 3.2): a window cache rotates keys by
their place in the cache, not in the text. Store keys *un-rotated* and let `attend(..., rope=...)`
rotate q and k with `cache_positions` at attention time; a full cache may store rotated keys.

int8 (`quantize=True`): K and V are stored symmetric per token and head, x ~ q * scale with
scale = max|x| / 127 over D (float32 [B, S, K]): about half the bytes of bf16 with D >= 64.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ringattn import deprecation, promises
from ringattn.attention.kernels.xla import from_storage, to_storage

KINDS = ("full", "sink_window", "window")
LAYOUTS = ("contiguous", "striped")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["k", "v", "k_scale", "v_scale", "pos"],
    meta_fields=["kind", "num_slots", "num_sinks", "window", "cache_layout", "num_shards"],
)
@dataclasses.dataclass(frozen=True)
class KVCache:
    """k, v [B, S, K, D] (int8 when quantised), k_scale/v_scale [B, S, K] float32 or None,
    pos [B, S] int32 (-1: empty slot). Inside shard_map the arrays are a device's shard of the
    sequence axis; `num_slots` is always the global S. `cache_layout` / `num_shards`: where a
    full cache places positions (module docstring)."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None
    v_scale: jax.Array | None
    pos: jax.Array
    kind: str
    num_slots: int
    num_sinks: int
    window: int | None
    cache_layout: str = "striped"
    num_shards: int = 1

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def striped(self) -> bool:
        """Whether positions are spread round-robin over num_shards > 1 stripes (else slot =
        position, as in a contiguous cache)."""
        return self.cache_layout == "striped" and self.num_shards > 1

    @property
    def layout(self) -> str:
        deprecation.warn("KVCache.layout", "KVCache.cache_layout")
        return self.cache_layout


def _is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_positive(fn, name, x):
    if not _is_int(x) or x <= 0:
        raise ValueError(f"{fn}: `{name}` must be a positive int, got {x!r}.")


@deprecation.renamed_keywords({"layout": "cache_layout"})
def init_cache(
    kind,
    batch,
    max_len,
    num_kv_heads,
    head_dim,
    dtype=jnp.float32,
    *,
    num_sinks=0,
    window=None,
    quantize=False,
    v_head_dim=None,
    cache_layout=None,
    num_shards=1,
):
    """An empty cache. "full": `max_len` slots (window must be None). "sink_window":
    `num_sinks` + `window` slots for an unbounded stream (max_len must be None). "window":
    `window` slots (num_sinks must be 0, max_len None). `dtype` is the floating dtype of stored
    K/V, or of the values they stand for when `quantize` (then stored int8 + float32 scales).
    `v_head_dim`: V's head dim when it is not K's (MLA-style models). `cache_layout` "striped" (the
    default for a full cache) spreads its positions round-robin over the `num_shards` devices it
    will be sharded over, "contiguous" keeps slot = position (module docstring); window kinds are
    ring buffers ("contiguous", their only layout)."""
    fn = "init_cache"
    if kind not in KINDS:
        raise ValueError(f"{fn}: `kind` must be one of {KINDS}, got {kind!r}.")
    if cache_layout is None:
        cache_layout = "striped" if kind == "full" else "contiguous"
    if cache_layout not in LAYOUTS:
        raise ValueError(
            f"{fn}: `cache_layout` must be one of {LAYOUTS} or None, got {cache_layout!r}."
        )
    _check_positive(fn, "num_shards", num_shards)
    if cache_layout == "striped" and kind != "full":
        raise ValueError(f"{fn}: only a 'full' cache can be 'striped', got kind={kind!r}.")
    for name, x in (("batch", batch), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        _check_positive(fn, name, x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{fn}: `dtype` must be a floating dtype, got {dtype!r}.")
    if not isinstance(quantize, (bool, np.bool_)):
        raise ValueError(f"{fn}: `quantize` must be a bool, got {quantize!r}.")
    if not _is_int(num_sinks) or num_sinks < 0:
        raise ValueError(f"{fn}: `num_sinks` must be a non-negative int, got {num_sinks!r}.")
    if kind == "full":
        _check_positive(fn, "max_len", max_len)
        if window is not None or num_sinks:
            raise ValueError(
                f"{fn}: a 'full' cache takes no `window` or `num_sinks`, got window={window!r}, "
                f"num_sinks={num_sinks!r}."
            )
        size = int(max_len)
        if cache_layout == "striped" and size % num_shards:
            raise ValueError(
                f"{fn}: a 'striped' cache needs `max_len` ({size}) to be a multiple of "
                f"`num_shards` ({num_shards})."
            )
    else:
        _check_positive(fn, "window", window)
        if max_len is not None:
            raise ValueError(
                f"{fn}: a {kind!r} cache holds num_sinks + window slots for an unbounded stream; "
                f"`max_len` must be None, got {max_len!r}."
            )
        if kind == "window" and num_sinks:
            raise ValueError(f"{fn}: a 'window' cache has `num_sinks` = 0, got {num_sinks!r}.")
        size = int(num_sinks) + int(window)
        window = int(window)
    shape = (batch, size, num_kv_heads, head_dim)
    v_shape = shape[:3] + (head_dim if v_head_dim is None else v_head_dim,)
    store = jnp.int8 if quantize else dtype
    scale = jnp.zeros(shape[:3], jnp.float32) if quantize else None
    return KVCache(
        k=jnp.zeros(shape, store),
        v=jnp.zeros(v_shape, store),
        k_scale=scale,
        v_scale=scale,
        pos=jnp.full((batch, size), -1, jnp.int32),
        kind=kind,
        num_slots=size,
        num_sinks=int(num_sinks),
        window=window,
        cache_layout=cache_layout,
        num_shards=int(num_shards),
    )


def quantize_int8(x):
    """x [..., D] -> (int8 [..., D], float32 scale [...]) with x ~ q * scale, |q| <= 127."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = amax / 127.0
    q = jnp.where(scale[..., None] > 0, x / jnp.where(scale > 0, scale, 1.0)[..., None], 0.0)
    return jnp.clip(jnp.round(q), -127, 127).astype(jnp.int8), scale.astype(jnp.float32)


def cache_kv(cache: KVCache, dtype=jnp.float32):
    """(k, v) [B, S, K, D] as `dtype`, dequantised (for inspection and tests; `attend` folds the
    scales into the scores instead)."""
    if not cache.quantized:
        return cache.k.astype(dtype), cache.v.astype(dtype)
    return tuple(
        (x.astype(jnp.float32) * s[..., None]).astype(dtype)
        for x, s in ((cache.k, cache.k_scale), (cache.v, cache.v_scale))
    )


def cache_bytes(cache) -> int:
    """Bytes of all the cache's arrays (global, all shards together); takes a cache of arrays
    or of jax.ShapeDtypeStruct (`jax.eval_shape(init_cache, ...)`) alike."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache))


def check_new(fn, cache, k_new, v_new, pos_new, names=("k_new", "v_new", "pos_new")):
    """k_new [B, t, K, D] / v_new [B, t, K, Dv] floating, pos_new [B, t] integer, matching the
    cache; errors call them by the caller's `names`."""
    b, _, kh, _ = cache.k.shape
    k_name, v_name, pos_name = names
    for name, x, d in ((k_name, k_new, cache.k.shape[3]), (v_name, v_new, cache.v.shape[3])):
        shape = tuple(np.shape(x))
        if len(shape) != 4 or shape[0] != b or shape[2:] != (kh, d):
            raise ValueError(
                f"{fn}: `{name}` must have shape [batch={b}, t, kv_heads={kh}, head_dim={d}], "
                f"got {shape}."
            )
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"{fn}: `{name}` must be floating, got {jnp.result_type(x)}.")
    if np.shape(v_new)[:2] != np.shape(k_new)[:2]:
        raise ValueError(
            f"{fn}: `{v_name}` must have the batch and length of `{k_name}` "
            f"{np.shape(k_new)[:2]}, got {np.shape(v_new)[:2]}."
        )
    check_positions(fn, pos_name, pos_new, (b, np.shape(k_new)[1]))


def check_fits(fn, cache, pos_new, name="pos_new"):
    """A full cache holds positions 0 .. max_len - 1: a chunk longer than that is refused at
    trace time, a position past the end is a broken promise (promises.py: checked in eager
    calls, and in traced ones under `ringattn.debug_checks()`)."""
    if cache.kind != "full":
        return  # window kinds hold a stream: they evict, by design
    t = np.shape(pos_new)[1]
    if t > cache.num_slots:
        raise ValueError(
            f"{fn}: {t} new tokens cannot fit a 'full' cache of max_len {cache.num_slots}; "
            "make the cache longer (init_cache's max_len) or use a window cache."
        )
    if not promises.needed(pos_new):
        return
    top = jnp.max(jnp.asarray(pos_new, jnp.int32))
    promises.check(
        fn,
        top < cache.num_slots,
        f"`{name}` reaches position {{top}}, past the end of the 'full' cache (max_len "
        f"{cache.num_slots}): those tokens would not be stored; make the cache longer or use a "
        "window cache.",
        top=top,
    )


def check_positions(fn, name, pos, shape):
    if tuple(np.shape(pos)) != tuple(shape):
        raise ValueError(f"{fn}: `{name}` must have shape {tuple(shape)}, got {np.shape(pos)}.")
    if not jnp.issubdtype(jnp.result_type(pos), jnp.integer):
        raise ValueError(f"{fn}: `{name}` must be integer, got {jnp.result_type(pos)}.")


def slots(cache: KVCache, pos_new):
    """Global slot [B, t] of each new token, -1 for those not written: padding (pos < 0), past
    the end of a full cache, or evicted by a later token of the same update (window kinds)."""
    pos = jnp.asarray(pos_new, jnp.int32)
    if cache.kind == "full":
        slot = pos
        if cache.striped:
            n = cache.num_shards
            slot = pos % n * (cache.num_slots // n) + pos // n
        return jnp.where((pos >= 0) & (pos < cache.num_slots), slot, -1)
    ns, w = cache.num_sinks, cache.window
    newest = jnp.max(pos, axis=1, keepdims=True)
    keep = (pos >= 0) & ((pos < ns) | (newest - pos < w))
    slot = jnp.where(pos < ns, pos, ns + (pos - ns) % w)
    return jnp.where(keep, slot, -1)


def write(cache: KVCache, k_new, v_new, pos_new, shard=0):
    """Write the new tokens this shard owns (shard r holds global slots [r S_loc, (r+1) S_loc)).

    A masked scatter: tokens of other shards or not written get an out-of-range index and
    are dropped, so the cache is updated in place and never moves.
    """
    s_loc = cache.pos.shape[1]
    local = slots(cache, pos_new) - shard * s_loc
    idx = jnp.where((local >= 0) & (local < s_loc), local, s_loc)  # s_loc: dropped
    rows = jnp.arange(idx.shape[0])[:, None]

    def put(x, new):
        # Narrow floats scatter as their bits: XLA:CPU would widen the whole cache to f32 and
        # back around a bf16 scatter (a copy of it twice the size); elsewhere it is free.
        out = to_storage(x).at[rows, idx].set(to_storage(new.astype(x.dtype)), mode="drop")
        return from_storage(out, x.dtype)

    if cache.quantized:
        (kq, ks), (vq, vs) = quantize_int8(k_new), quantize_int8(v_new)
        new = dict(k=put(cache.k, kq), v=put(cache.v, vq))
        new.update(k_scale=put(cache.k_scale, ks), v_scale=put(cache.v_scale, vs))
    else:
        new = dict(k=put(cache.k, k_new), v=put(cache.v, v_new))
    pos = put(cache.pos, jnp.asarray(pos_new, jnp.int32))
    return dataclasses.replace(cache, pos=pos, **new)


def update(cache: KVCache, k_new, v_new, pos_new) -> KVCache:
    """The cache with k_new/v_new [B, t, K, D] written at positions pos_new [B, t] int32
    (negative: padding, not written). See the module docstring for where each token goes."""
    check_new("update", cache, k_new, v_new, pos_new)
    check_fits("update", cache, pos_new)
    return write(cache, k_new, v_new, pos_new)


def relative_positions(cache: KVCache, pos, length):
    """StreamingLLM positions: sinks keep theirs, the window follows them in order; `length`
    [B] is 1 + the newest position held (the window holds [max(ns, length - w), length))."""
    if cache.kind == "full":
        return pos
    ns = cache.num_sinks
    start = jnp.maximum(ns, length - cache.window)[:, None]
    return jnp.where(pos < ns, pos, ns + pos - start).astype(jnp.int32)


def cache_positions(cache: KVCache, q_pos=None):
    """(kv_pos [B, S], q_pos [B, t]): the positions to rotate keys and queries with.

    "full": the text positions. Window kinds: positions in the cache (StreamingLLM): sinks
    0..num_sinks-1, then the window's tokens in order; queries (already written by `update`)
    get their own slot's position, so decoding sits at num_sinks + window - 1 once the window is
    full. Empty slots (and padding queries) get -1; without q_pos the second value is None.
    """
    return positions_from_length(cache, q_pos, jnp.max(cache.pos, axis=1) + 1)


def positions_from_length(cache, q_pos, length):
    """`cache_positions` given `length` [B] = 1 + the newest position held (for a sharded cache
    a pmax over the shards)."""
    kv = relative_positions(cache, cache.pos, length)
    kv = jnp.where(cache.pos >= 0, kv, -1)
    if q_pos is None:
        return kv, None
    q_pos = jnp.asarray(q_pos, jnp.int32)
    return kv, jnp.where(q_pos >= 0, relative_positions(cache, q_pos, length), -1)
