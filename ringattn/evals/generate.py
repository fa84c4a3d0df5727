"""Decoding a Transformer with KV caches: caches per layer, prefill, sampling, the decode loop.

Prefill runs the prompt through the model's configured attention (context-parallel on a mesh:
the prompt is laid out over the context axis like a training batch) and writes every layer's
K/V into its cache. On a mesh the caches are sharded along the sequence over the context axis
and stay there: each decode step attends the new token to every device's shard and merges the
partial results through lse (ringattn/decode/sharded.py). Without a mesh, or with dense /
blockwise attention, everything runs on one device.

    model = decoding_model(cfg, mesh)
    caches = init_caches(cfg, CacheSpec("full", max_len=1024), batch=1, mesh=mesh)
    out = generate(model, params, prompt_batch([tokens]), caches, 32, temperature=0.0)

A long prompt can be prefilled in chunks (`prefill_chunk`): each chunk attends to the cache the
previous ones filled (ringattn/decode/chunked.py), so the activations are a chunk's, not the
prompt's; each chunk is compiled for a power-of-two bound on what the caches hold
(`chunk_bound`).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from ringattn import deprecation
from ringattn.decode import cache as cache_lib
from ringattn.decode import retrieval, sharded
from ringattn.nn.config import ModelConfig
from ringattn.nn.layers import cache_batch_axes, shards_cache
from ringattn.nn.model import Transformer
from ringattn.parallel.layouts import to_layout

PAD = 0


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """What cache every layer gets (ringattn/decode/cache.py): "full" holds `max_len` tokens,
    "sink_window" `num_sinks` + `window` (StreamingLLM), "window" the last `window` only;
    "retrieval" (ringattn/decode/retrieval.py) holds `max_len` tokens in pages of `page_size`
    and each step attends to `num_sinks` + `window` + `top_pages` x `page_size` of them
    (`selection_block` queries of a prompt chunk share one page selection; `host_pages` keeps
    the pages in host memory; the first `dense_layers` layers read every page, as Quest keeps
    its lowest two layers dense).
    `dtype`: stored K/V (or, with `quantize`, what int8 + float32 scales stand for).
    `cache_layout`: where a full cache sharded over n devices keeps positions; None is
    `init_cache`'s default, "striped" (round-robin), which keeps every prefix of the stream spread
    evenly, so prompt chunks and decode steps find the cached work balanced (cache.py); window
    kinds are ring buffers."""

    kind: str = "full"
    max_len: int | None = None
    num_sinks: int = 0
    window: int | None = None
    quantize: bool = False
    dtype: str = "float32"
    cache_layout: str | None = None
    layout: dataclasses.InitVar[str | None] = None  # the deprecated name of cache_layout
    page_size: int = 64
    top_pages: int = 12
    selection_block: int | None = 16
    host_pages: bool = False
    dense_layers: int = 0

    def __post_init__(self, layout):
        if layout is not None:
            deprecation.warn("CacheSpec(layout=...)", "CacheSpec(cache_layout=...)")
            object.__setattr__(self, "cache_layout", layout)
        if self.dense_layers and self.kind != "retrieval":
            raise ValueError(
                f"CacheSpec: `dense_layers` ({self.dense_layers}) applies to a 'retrieval' cache "
                f"(its lowest layers read every page); a {self.kind!r} cache has no pages."
            )


def decoding_model(cfg: ModelConfig, mesh=None) -> Transformer:
    """The model with its layers in a loop and no remat (decoding has no backward)."""
    return Transformer(dataclasses.replace(cfg, scan_layers=False, remat="none"), mesh)


def decoding_params(cfg: ModelConfig, params):
    """`params` of a model built with `cfg`, in the layout `decoding_model` expects (scanned
    layers unstacked into layer_0, layer_1 ...)."""
    if not cfg.scan_layers:
        return params
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(cfg.num_layers):
        params[f"layer_{i}"] = jax.tree.map(lambda x: x[i], stacked)  # noqa: B023
    return params


def num_shards(cfg: ModelConfig, mesh) -> int:
    """Devices the cache and the prompt are split over (1 when decoding on one device)."""
    return mesh.shape[cfg.attention.axis] if shards_cache(cfg, mesh) else 1


def init_caches(cfg: ModelConfig, spec: CacheSpec, batch: int, mesh=None):
    """One empty cache per layer; on a mesh, created directly sharded along the sequence over
    the context axis. A full cache's `max_len` is rounded up to a multiple of the shards."""
    n = num_shards(cfg, mesh)
    if spec.kind == "retrieval":
        return _retrieval_caches(cfg, spec, batch, mesh)
    max_len = spec.max_len
    if spec.kind == "full" and isinstance(max_len, int) and max_len > 0:
        max_len = -(-max_len // n) * n
    elif spec.kind != "full" and n > 1 and (spec.num_sinks + (spec.window or 0)) % n:
        raise ValueError(
            f"init_caches: a sharded {spec.kind!r} cache needs num_sinks + window "
            f"({spec.num_sinks} + {spec.window}) to be a multiple of the {n} shards."
        )
    init = functools.partial(
        cache_lib.init_cache,
        spec.kind,
        batch,
        max_len,
        cfg.num_kv_heads,
        cfg.head_dim,
        jnp.dtype(spec.dtype),
        num_sinks=spec.num_sinks,
        window=spec.window,
        quantize=spec.quantize,
        v_head_dim=cfg.value_dim,
        cache_layout=spec.cache_layout,
        num_shards=n,
    )
    if n > 1:
        axes = (cfg.attention.axis, cache_batch_axes(cfg, mesh))
        init = jax.jit(
            init, out_shardings=sharded.cache_sharding(jax.eval_shape(init), mesh, *axes)
        )
    return [init() for _ in range(cfg.num_layers)]  # distinct buffers: each may be donated


def _retrieval_caches(cfg: ModelConfig, spec: CacheSpec, batch: int, mesh):
    """init_caches of a retrieval spec: its pages striped over the shards; the first
    `dense_layers` layers choose every page (their result is the full cache's)."""
    n = num_shards(cfg, mesh)
    if not isinstance(spec.dense_layers, int) or not 0 <= spec.dense_layers <= cfg.num_layers:
        raise ValueError(
            f"init_caches: `dense_layers` must be an int in [0, {cfg.num_layers}] (the model's "
            f"layers), got {spec.dense_layers!r}."
        )

    @functools.cache  # one (jitted) maker per top_pages, shared by the layers
    def maker(top_pages):
        make = functools.partial(
            retrieval.init_cache, batch, spec.max_len, cfg.num_kv_heads, cfg.head_dim,
            jnp.dtype(spec.dtype), num_sinks=spec.num_sinks, window=spec.window,
            page_size=spec.page_size, top_pages=top_pages, selection_block=spec.selection_block,
            quantize=spec.quantize, v_head_dim=cfg.value_dim, num_shards=n,
            host_pages=spec.host_pages,
        )  # fmt: skip
        if n == 1:
            return make
        axes = (cfg.attention.axis, cache_batch_axes(cfg, mesh))
        shardings = retrieval.cache_sharding(jax.eval_shape(make), mesh, *axes)
        return jax.jit(make, out_shardings=shardings)

    every = jax.eval_shape(maker(spec.top_pages)).num_pages
    top = [every] * spec.dense_layers + [spec.top_pages] * (cfg.num_layers - spec.dense_layers)
    return [maker(t)() for t in top]  # distinct buffers: each may be donated


def prompt_batch(prompts, multiple=1):
    """Prompts (token arrays of any lengths) right-padded into one batch whose length is a
    multiple of `multiple`: tokens, positions (-1 on padding), segment ids (0 on padding) [B, T]
    and lengths [B]."""
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    if not prompts or min(map(len, prompts)) == 0:
        raise ValueError("prompt_batch: `prompts` must be non-empty token arrays.")
    lengths = np.array([len(p) for p in prompts], np.int32)
    t = -(-int(lengths.max()) // multiple) * multiple
    real = np.arange(t)[None] < lengths[:, None]
    tokens = np.full((len(prompts), t), PAD, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    positions = np.where(real, np.arange(t)[None], -1).astype(np.int32)
    return dict(
        tokens=tokens, positions=positions, segment_ids=real.astype(np.int32), lengths=lengths
    )


def pad_multiple(cfg: ModelConfig, mesh) -> int:
    """What the prompt length must be a multiple of to be laid out over the context axis."""
    if not shards_cache(cfg, mesh):
        return 1
    n = num_shards(cfg, mesh)
    return 2 * n if cfg.attention.layout == "zigzag" else n  # as layouts.check_layout


def prefill(model, params, batch, caches, cache_bound=None):
    """(logits [B, vocab] after each row's last prompt token, caches). The prompt goes into the
    model's layout order first; the caches place tokens by position, whatever the order.
    `cache_bound`: as in Transformer.prefill (None: the caches may hold anything; 0: they are
    empty, the fast path for a first prompt). A row whose last token is not in `batch` gets the
    logits of its last token in it (zeros if none)."""
    n = num_shards(model.cfg, model.mesh)
    layout = model.cfg.attention.layout
    tokens, positions, segs = (
        to_layout(jnp.asarray(batch[k]), layout, n) if n > 1 else jnp.asarray(batch[k])
        for k in ("tokens", "positions", "segment_ids")
    )
    # The row's newest position here: its last prompt token when this holds it. Only its
    # logits are computed (the LM head is a sixth of a small model's prefill).
    last_BT = positions == jnp.max(positions, axis=1, keepdims=True)
    idx_B = jnp.argmax(last_BT, axis=1)
    logits_B1V, caches = model.apply(
        {"params": params},
        tokens,
        positions,
        segs,
        caches,
        cache_bound,
        idx_B[:, None],
        method=Transformer.prefill,
    )
    return jnp.where(jnp.any(positions >= 0, axis=1)[:, None], logits_B1V[:, 0], 0.0), caches


def chunks(batch, chunk):
    """`batch` (from prompt_batch) cut into pieces of `chunk` tokens (the last one padded):
    (piece, its first position, which rows end in it)."""
    t = batch["tokens"].shape[1]
    lengths = np.asarray(batch["lengths"])
    for start in range(0, t, chunk):
        piece = {}
        for k, pad in (("tokens", PAD), ("positions", -1), ("segment_ids", 0)):
            x = np.asarray(batch[k])[:, start : start + chunk]
            piece[k] = np.pad(x, ((0, 0), (0, chunk - x.shape[1])), constant_values=pad)
        ends_B = (lengths > start) & (lengths <= start + chunk)
        yield piece, start, ends_B


def chunk_bound(start, chunk):
    """The cache bound of the chunk from `start`: the positions cached so far, rounded up to
    chunk x a power of two, so log2(T / chunk) + 2 compilations serve a prompt of T tokens and
    pass_kv sends at most twice what the caches hold."""
    if start == 0:
        return 0
    return chunk * (1 << (-(-start // chunk) - 1).bit_length())


def stream_bound(caches, start, chunk):
    """The cache bound a chunk from `start` is compiled for: `chunk_bound` when a cache is full
    (its chunked prefill reads the bound); for window and retrieval caches, which take chunks as
    decode steps, only empty (0) or not (None) matters: two compilations for any prompt."""
    if any(c.kind == "full" for c in caches):
        return chunk_bound(start, chunk)
    return 0 if start == 0 else None


def prefill_in_chunks(pre, params, batch, caches, chunk):
    """`prefill` of `batch` `chunk` tokens at a time: `pre(params, piece, caches, cache_bound)`
    is prefill (jitted with a static cache_bound, `stream_bound`). Returns (logits after each
    row's last token, caches)."""
    logits_BV = None
    for piece, start, ends_B in chunks(batch, chunk):
        logits, caches = pre(params, piece, caches, stream_bound(caches, start, chunk))
        logits_BV = logits if logits_BV is None else jnp.where(ends_B[:, None], logits, logits_BV)
    return logits_BV, caches


def until_eos(tokens, eos_id):
    """`tokens` [T] cut before the first `eos_id` (all of them when it is None or absent)."""
    tokens = np.asarray(tokens).reshape(-1)
    hits = np.flatnonzero(tokens == eos_id) if eos_id is not None else []
    return tokens[: hits[0]] if len(hits) else tokens


def sample(logits_BV, rng, temperature=0.0, top_k=0):
    """Greedy (temperature 0), else a draw from softmax(logits / temperature), restricted to
    the top_k most likely tokens when top_k > 0. Returns int32 [B]."""
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_k:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def decode_loop(model, params, caches, token_B, position_B, rng, num_steps, temperature, top_k):
    """(tokens [B, num_steps], caches): feed token_B at position_B, sample the next, repeat."""

    def step(carry, rng):
        caches, token_B, pos_B = carry
        logits, caches = model.apply(
            {"params": params},
            token_B[:, None],
            pos_B[:, None],
            caches,
            method=Transformer.decode,
        )
        nxt = sample(logits[:, 0], rng, temperature, top_k)
        return (caches, nxt, pos_B + 1), nxt

    (caches, _, _), tokens = jax.lax.scan(
        step, (caches, token_B, position_B), jax.random.split(rng, num_steps)
    )
    return tokens.T, caches


@functools.cache
def _compiled(model, temperature, top_k, num_steps):
    pre = jax.jit(functools.partial(prefill, model), static_argnums=3)
    loop = jax.jit(
        functools.partial(
            decode_loop, model, num_steps=num_steps, temperature=temperature, top_k=top_k
        ),
        donate_argnums=1,
    )
    return pre, loop


def generate(
    model, params, batch, caches, max_new_tokens, *, temperature=0.0, top_k=0, seed=0,
    prefill_chunk=None,
):  # fmt: skip
    """Prefill `batch` (from `prompt_batch`; in chunks of `prefill_chunk` tokens when given, a
    multiple of `pad_multiple`) and sample `max_new_tokens` per row. Returns tokens [B,
    max_new_tokens] and timings, compilation excluded: prefill_s, decode_s and decode tokens/s
    (the max_new_tokens - 1 decode steps over the whole batch)."""
    if max_new_tokens < 1:
        raise ValueError(f"generate: `max_new_tokens` must be >= 1, got {max_new_tokens}.")
    # The cache holds the prompt and every new token but the last (sampled, never fed back).
    need = int(np.max(batch["lengths"])) + max_new_tokens - 1
    keep_all = [c.num_slots for c in caches if c.kind in ("full", "retrieval")]  # no eviction
    if keep_all and need > min(keep_all):
        raise ValueError(
            f"generate: the longest prompt plus `max_new_tokens` ({max_new_tokens}) needs {need} "
            f"cache positions (every new token but the last is written), but the full "
            f"(or retrieval) caches hold {min(keep_all)}; make them longer (CacheSpec max_len) or "
            "generate fewer."
        )
    multiple = pad_multiple(model.cfg, model.mesh)
    if prefill_chunk is not None and (prefill_chunk < 1 or prefill_chunk % multiple):
        raise ValueError(
            f"generate: `prefill_chunk` must be a positive multiple of {multiple} (the prompt's "
            f"layout over the devices), got {prefill_chunk}."
        )
    pre, loop = _compiled(model, float(temperature), int(top_k), max_new_tokens - 1)
    rng0, rng = jax.random.split(jax.random.key(seed))
    pos_B = jnp.asarray(batch["lengths"], jnp.int32)
    if prefill_chunk is None or prefill_chunk >= batch["tokens"].shape[1]:
        compiled = {0: pre.lower(params, batch, caches, 0).compile()}
        run_prefill = lambda c: compiled[0](params, batch, c)  # noqa: E731
    else:
        pieces = list(chunks(batch, prefill_chunk))
        bounds = {stream_bound(caches, start, prefill_chunk) for _, start, _ in pieces}
        compiled = {b: pre.lower(params, pieces[0][0], caches, b).compile() for b in bounds}
        run_prefill = lambda c: prefill_in_chunks(  # noqa: E731
            lambda p, piece, c, bound: compiled[bound](p, piece, c), params, batch, c,
            prefill_chunk,
        )  # fmt: skip
    t0 = time.perf_counter()
    logits_BV, caches = jax.block_until_ready(run_prefill(caches))
    prefill_s = time.perf_counter() - t0
    first_B = sample(logits_BV, rng0, temperature, top_k)
    tokens = first_B[:, None]
    decode_s = 0.0
    if max_new_tokens > 1:
        loop_args = (params, caches, first_B, pos_B, rng)
        loop = loop.lower(*loop_args).compile()
        t0 = time.perf_counter()
        rest, caches = jax.block_until_ready(loop(*loop_args))
        decode_s = time.perf_counter() - t0
        tokens = jnp.concatenate([tokens, rest], axis=1)
    steps = tokens.shape[0] * (max_new_tokens - 1)
    return dict(
        tokens=np.asarray(tokens),
        caches=caches,
        prefill_s=prefill_s,
        decode_s=decode_s,
        tokens_per_s=steps / decode_s if decode_s else float("nan"),
    )
