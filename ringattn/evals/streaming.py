"""Streaming perplexity (StreamingLLM, Xiao et al. 2023): a stream far longer than the cache,
decoded one token at a time through a window-only cache and a sink + window cache, against the
exact reference, a sliding window recomputed from scratch for every token (positions 0.. inside
the window), and dense attention over the whole stream (no eviction, positions past training).
Also the attention each layer and head puts on the first tokens (and on a learned sink logit),
which is what makes evicting them matter.

    result = evaluate(cfg, params, streams, cache_len=256)             # "dense", "window", ...
    result = add_model(result, "learned_sinks", cfg2, params2, streams)  # window + recompute
    streams = text_streams(tokenizer, files, 2048)  # a pretrained model: its tokenizer, any text

The recomputed window costs a forward pass of `cache_len` tokens per scored token: on a real
model, `recompute_stride=k` scores every k-th position only, and every method's summary is then
taken over those positions (the per-bin curves of the others keep every position).
    streaming_plots.plot(result, "streaming.png")  # and plot_attention: attention_sinks.png
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ringattn.evals import generate as gen
from ringattn.evals import streaming_plots
from ringattn.nn.model import Transformer
from ringattn.nn.rope import apply_rope
from ringattn.train.corpus import text_stream

METHODS = ("dense", "window", "sink_window", "recompute")
LEARNED_SINKS_METHODS = ("window", "recompute")
# Also run on request: a retrieval cache (ringattn/decode/retrieval.py) attending to cache_len
# tokens per step: the sinks, top_pages pages of page_size, and the rest of cache_len as window.
RETRIEVAL = "retrieval"
PAGES = dict(page_size=16, top_pages=8)


def eval_streams(task_params, length, num_streams):
    """[num_streams, length] int32: the held-out ("eval") files of a text run's task, concatenated
    in `num_streams` orders; starting with BOS when the run trained with `bos`."""
    p = dict(task_params or {})
    return np.stack(
        [
            text_stream(
                p.get("data_dir"),
                "eval",
                seed,
                length=length,
                glob=p.get("glob", "*.py"),
                bos=bool(p.get("bos", False)),
            )
            for seed in range(num_streams)
        ]
    )


def text_streams(tokenizer, files, length):
    """[len(files), length] int32: the first `length` tokens of each text file, encoded with the
    run's tokenizer (ringattn/hf/tokenizer.py) as one document."""
    rows = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            ids = tokenizer.encode(f.read())
        if len(ids) < length:
            raise ValueError(
                f"text_streams: {path} has {len(ids)} tokens, fewer than the stream's {length}."
            )
        rows.append(ids[:length])
    return np.stack(rows).astype(np.int32)


def labels(cache_len, num_sinks, pages=None):
    pages = pages or PAGES
    p, top = pages["page_size"], pages["top_pages"]
    return dict(
        dense="dense, no eviction",
        window=f"window only ({cache_len})",
        sink_window=f"sink + window ({num_sinks} + {cache_len - num_sinks})",
        recompute=f"sliding window, recomputed ({cache_len})",
        retrieval=f"retrieval ({num_sinks} + {cache_len - num_sinks - top * p} + {top} x {p})",
    )


def retrieval_spec(cache_len, num_sinks, length, page_size, top_pages):
    """The retrieval cache of a stream of `length` tokens attending to cache_len per step."""
    window = cache_len - num_sinks - top_pages * page_size
    if window < 1:
        raise ValueError(
            f"streaming: a retrieval cache of cache_len {cache_len} has no room for a window "
            f"after {num_sinks} sinks and {top_pages} pages of {page_size}."
        )
    return gen.CacheSpec(
        RETRIEVAL, max_len=length, num_sinks=num_sinks, window=window, page_size=page_size,
        top_pages=top_pages,
    )  # fmt: skip


def method_nll(
    model, params, streams_BL, method, cache_len, num_sinks, recompute_stride=1, pages=None
):
    """NLL [B, L - 1] of each next token under one of METHODS or "retrieval" (`pages`: its
    page_size and top_pages, PAGES by default; recompute: NaN at the positions its stride
    skips)."""
    if method == RETRIEVAL:
        spec = retrieval_spec(cache_len, num_sinks, streams_BL.shape[1], **(pages or PAGES))
        return np.asarray(stream_nll(model, params, streams_BL, spec))
    if method == "dense":
        return np.asarray(_window_forward(model)(params, jnp.asarray(streams_BL, jnp.int32)))
    if method == "recompute":
        return recompute_nll(model, params, streams_BL, cache_len, stride=recompute_stride)
    if method == "window":
        spec = gen.CacheSpec("window", window=cache_len)
    elif method == "sink_window":
        spec = gen.CacheSpec("sink_window", num_sinks=num_sinks, window=cache_len - num_sinks)
    else:
        raise ValueError(
            f"streaming: `method` must be one of {METHODS + (RETRIEVAL,)}, got {method!r}."
        )
    return np.asarray(stream_nll(model, params, streams_BL, spec))


def evaluate(
    cfg,
    params,
    streams_BL,
    *,
    cache_len,
    num_sinks=4,
    bin_size=128,
    methods=METHODS,
    recompute_stride=1,
    pages=None,
    log=print,
):
    """`methods` on the streams [B, L]: per-bin perplexity, mean perplexity once the cache is
    full (the "summary", over the positions every method scored), and the attention on the first
    `num_sinks` tokens per layer and head. `recompute_stride`: see the module docstring; `pages`:
    the retrieval method's page_size and top_pages (PAGES). The per-token NLLs [B, L - 1] (NaN:
    not scored) are under "nll" (numpy: not for JSON)."""
    if not 0 < num_sinks < cache_len < streams_BL.shape[1]:
        raise ValueError(
            f"streaming: need 0 < num_sinks < cache_len < stream length, got {num_sinks}, "
            f"{cache_len}, {streams_BL.shape[1]}."
        )
    result = dict(
        cache_len=cache_len,
        num_sinks=num_sinks,
        stream_len=int(streams_BL.shape[1]),
        num_streams=int(streams_BL.shape[0]),
        bin_size=bin_size,
        recompute_stride=recompute_stride,
        pages=dict(pages or PAGES),
        methods={},
        summary={},
        attention={},
    )
    return add_model(result, "", cfg, params, streams_BL, methods=methods, log=log)


def add_model(result, name, cfg, params, streams_BL, *, methods=LEARNED_SINKS_METHODS, log=print):
    """`result` with another model's methods added as "<name>_<method>" (its attention under
    `name`; "" for the first model, whose methods keep their plain names)."""
    cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, impl="dense"))
    model = gen.decoding_model(cfg)  # one device: the caches are small
    params = gen.decoding_params(cfg, params)
    cache_len, num_sinks = result["cache_len"], result["num_sinks"]
    pages = result.get("pages")
    names = labels(cache_len, num_sinks, pages)
    nlls, stride = {}, result.get("recompute_stride", 1)
    for method in methods:
        t0 = time.perf_counter()
        nlls[method] = method_nll(
            model, params, streams_BL, method, cache_len, num_sinks, stride, pages
        )
        log(f"{name or 'model'}: {method} in {time.perf_counter() - t0:.0f} s")
    common = np.all([np.isfinite(n) for n in nlls.values()], axis=0)
    scored = common[:, cache_len:]
    for method, nll in nlls.items():
        key = f"{name}_{method}" if name else method
        starts, ppl = binned(nll, result["bin_size"])
        _, ppl_common = binned(np.where(common, nll, np.nan), result["bin_size"])
        result.setdefault("nll", {})[key] = nll
        after = float(np.exp(nll[:, cache_len:][scored].mean()))
        result["methods"][key] = dict(
            model=name,
            method=method,
            label=f"{name}: {names[method]}" if name else names[method],
            bin_start=starts.tolist(),
            perplexity=ppl.tolist(),
            perplexity_common=ppl_common.tolist(),  # on the positions every method scored
            perplexity_after_cache_full=after,
            positions_scored=int(np.isfinite(nll[:, cache_len:]).sum()),
        )
        result["summary"][key] = after
        log(f"{key}: perplexity after the cache is full {after:.3f}")
    probe = jnp.asarray(streams_BL[:, :cache_len])
    first, sink = attention_shares(model, params, probe, num_sinks)
    even = even_share(cache_len, num_sinks)
    result["attention"][name or "model"] = dict(
        first_tokens=first.tolist(),
        sink_logit=None if sink is None else sink.tolist(),
        even_spread=even,
    )
    per_layer = [round(float(x), 3) for x in first.mean(-1)]
    log(f"{name or 'model'}: attention on the first {num_sinks} tokens, per layer {per_layer}")
    log(f"  (an even spread: {even:.3f})")
    return result


def ratios(summary):
    """The comparisons StreamingLLM's claims are about, from a result's summary."""
    pairs = dict(
        window_over_sink_window=("window", "sink_window"),
        sink_window_over_recompute=("sink_window", "recompute"),
        dense_over_recompute=("dense", "recompute"),
        learned_sinks_window_over_recompute=("learned_sinks_window", "learned_sinks_recompute"),
        retrieval_over_dense=("retrieval", "dense"),
        retrieval_over_sink_window=("retrieval", "sink_window"),
    )
    return {k: summary[a] / summary[b] for k, (a, b) in pairs.items() if {a, b} <= set(summary)}


def stream_nll(model, params, tokens_BL, spec: gen.CacheSpec):
    """NLL [B, L - 1] of token t + 1 given the tokens the cache keeps, decoding token by token
    (one lax.scan, one compilation)."""
    b, length = tokens_BL.shape
    caches = gen.init_caches(model.cfg, spec, b)
    return _stream_nll(model, params, jnp.asarray(tokens_BL, jnp.int32), caches)[:, : length - 1]


@functools.partial(jax.jit, static_argnums=0)
def _stream_nll(model, params, tokens_BL, caches):
    def step(caches, t):
        logits, caches = model.apply(
            {"params": params},
            tokens_BL[:, t][:, None],
            jnp.full((tokens_BL.shape[0], 1), t, jnp.int32),
            caches,
            method=Transformer.decode,
        )
        target = tokens_BL[:, jnp.minimum(t + 1, tokens_BL.shape[1] - 1)]
        return caches, optax.softmax_cross_entropy_with_integer_labels(logits[:, 0], target)

    _, nll = jax.lax.scan(step, caches, jnp.arange(tokens_BL.shape[1]))
    return nll.T


def recompute_nll(model, params, tokens_BL, window, chunk=64, stride=1):
    """NLL [B, L - 1] with the model rerun for every token on the last `window` tokens (fewer at
    the start), at positions 0..window-1: the exact sliding-window reference. With `stride` > 1
    only every stride-th window runs (NaN elsewhere), for models too large to rerun per token."""
    tokens_BL = np.asarray(tokens_BL, np.int32)
    b, length = tokens_BL.shape
    head = min(window, length)
    nll = np.full((b, length - 1), np.nan, np.float32)
    prefix = _window_forward(model)(params, tokens_BL[:, :head])  # causal: exact for a prefix
    nll[:, : head - 1] = np.asarray(prefix)[:, : head - 1]
    starts = np.arange(0, length - window, stride)  # window [s, s + window) predicts s + window
    last = _last_nll(model)
    for i in range(0, len(starts), chunk):
        s = starts[i : i + chunk]
        idx = s[:, None] + np.arange(window + 1)[None]  # the window and its next token
        win = tokens_BL[:, idx].reshape(-1, window + 1)
        nll[:, s + window - 1] = np.asarray(last(params, win)).reshape(b, len(s))
    return nll


@functools.cache
def _last_nll(model):
    """jit: tokens [N, W + 1] -> NLL [N] of the last token given the W before it (positions
    0..W-1), with the vocabulary projection of that one position only."""

    def run(module, tokens, pos):
        x = module.embed(tokens)
        for layer in module.layers:
            x, _ = layer(x, pos, jnp.ones_like(tokens))
        return module.logits(x[:, -1:])[:, 0]

    @jax.jit
    def fwd(params, tokens):
        context = tokens[:, :-1]
        pos = jnp.broadcast_to(jnp.arange(context.shape[1], dtype=jnp.int32), context.shape)
        logits = model.apply({"params": params}, context, pos, method=run)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, -1])

    return fwd


@functools.cache
def _window_forward(model):
    """jit: tokens [N, W] -> NLL [N, W - 1] of each next token, positions 0..W-1."""

    @jax.jit
    def fwd(params, tokens):
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        logits = model.apply({"params": params}, tokens, pos, jnp.ones_like(tokens))
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])

    return fwd


@functools.partial(jax.jit, static_argnums=0)
def attention_probs(model, params, tokens_BT):
    """Per layer, the causal attention probabilities [B, H, T, T] of a forward pass at positions
    0..T-1, recomputed from each layer's input (captured) and its query/key weights. With learned
    sinks a row sums to 1 minus the sink logit's share."""
    cfg = model.cfg
    b, t = tokens_BT.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    _, state = model.apply(
        {"params": params},
        tokens_BT,
        pos,
        jnp.ones_like(tokens_BT),
        capture_intermediates=lambda mdl, name: mdl.name == "attn_norm",
        mutable=["intermediates"],
    )
    cap = cfg.attention.logits_soft_cap
    probs = []
    for i in range(cfg.num_layers):
        h_BTE = state["intermediates"][f"layer_{i}"]["attn_norm"]["__call__"][0]
        p = params[f"layer_{i}"]["attn"]
        q = apply_rope(jnp.einsum("bte,ehd->bthd", h_BTE, p["query"]), pos, cfg.rope)
        k = apply_rope(jnp.einsum("bte,ekd->btkd", h_BTE, p["key"]), pos, cfg.rope)
        k = jnp.repeat(k, cfg.num_heads // cfg.num_kv_heads, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.head_dim)
        if cap:
            s = cap * jnp.tanh(s / cap)
        back = np.arange(t)[:, None] - np.arange(t)[None]  # query - key
        window = cfg.layer_window(i)
        visible = (back >= 0) & (back <= (t if window is None else window))
        s = jnp.where(visible, s, -jnp.inf)
        if "sinks" in p:  # one more logit per head, whose value vector is 0
            sink = jnp.broadcast_to(p["sinks"][None, :, None, None], (b, cfg.num_heads, t, 1))
            probs.append(jax.nn.softmax(jnp.concatenate([s, sink], -1), axis=-1)[..., :t])
        else:
            probs.append(jax.nn.softmax(s, axis=-1))
    return probs


def attention_shares(model, params, tokens_BT, num_first=4):
    """(first [layers, heads], sink [layers, heads] or None): the mean attention probability on
    the first `num_first` tokens, and on the learned sink logit, over the queries of the second
    half of the sequence and the batch."""
    t = tokens_BT.shape[1]
    late = [p[:, :, t // 2 :] for p in attention_probs(model, params, tokens_BT)]
    first = np.array([np.asarray(p[..., :num_first].sum(-1).mean((0, 2))) for p in late])
    if not model.cfg.attention.sinks:
        return first, None
    return first, np.array([np.asarray(1 - p.sum(-1).mean((0, 2))) for p in late])


def even_share(t, num_first=4):
    """The share attention spread evenly over the visible keys puts on the first `num_first`,
    averaged over the queries of the second half of t tokens (about 2 ln 2 num_first / t)."""
    seen = np.arange(t // 2, t) + 1
    return float(np.mean(np.minimum(num_first, seen) / seen))


def binned(nll_BL, bin_size):
    """(bin starts, perplexity of each bin averaged over rows and positions)."""
    n = nll_BL.shape[1] // bin_size * bin_size
    per_bin = np.asarray(nll_BL)[:, :n].reshape(nll_BL.shape[0], -1, bin_size)
    scored = np.isfinite(per_bin)  # NaN: positions a strided recompute skipped
    count = scored.sum(axis=(0, 2))
    total = np.where(scored, per_bin, 0.0).sum(axis=(0, 2))
    per_bin = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return np.arange(0, n, bin_size), np.exp(per_bin)


# The plots, where the notebooks and experiments have always found them.
plot, plot_attention = streaming_plots.plot, streaming_plots.plot_attention
