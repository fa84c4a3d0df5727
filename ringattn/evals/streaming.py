"""Streaming perplexity (StreamingLLM, Xiao et al. 2023): a stream far longer than the cache,
decoded one token at a time through a sink + window cache, a window-only cache, and the exact
reference they are compared with, a sliding window recomputed from scratch for every token
(positions 0.. inside the window). Also the attention mass each layer puts on the first tokens,
which is what makes sinks matter."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ringattn.evals import generate as gen
from ringattn.nn.model import Transformer
from ringattn.nn.rope import apply_rope


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


def recompute_nll(model, params, tokens_BL, window, chunk=64):
    """NLL [B, L - 1] with the model rerun for every token on the last `window` tokens (fewer at
    the start), at positions 0..window-1: the exact sliding-window reference."""
    tokens_BL = np.asarray(tokens_BL, np.int32)
    b, length = tokens_BL.shape
    fwd = _window_forward(model)
    head = min(window, length)
    nll = [np.asarray(fwd(params, tokens_BL[:, :head]))[:, : head - 1]]  # a prefix: causal
    starts = np.arange(length - window)  # window [s, s + window) predicts token s + window
    for i in range(0, len(starts), chunk):
        s = starts[i : i + chunk]
        idx = s[:, None] + np.arange(window + 1)[None]  # the window and its next token
        win = tokens_BL[:, idx].reshape(-1, window + 1)
        last = np.asarray(fwd(params, win))[:, -1]
        nll.append(last.reshape(b, len(s)))
    return np.concatenate(nll, axis=1)


@functools.cache
def _window_forward(model):
    """jit: tokens [N, W] -> NLL [N, W - 1] of each next token, positions 0..W-1."""

    @jax.jit
    def fwd(params, tokens):
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        logits = model.apply({"params": params}, tokens, pos, jnp.ones_like(tokens))
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])

    return fwd


def attention_probs(model, params, tokens_BT):
    """Per layer, the causal attention probabilities [B, H, T, T] of a forward pass at positions
    0..T-1, recomputed from each layer's input (captured) and its query/key weights."""
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
    causal = jnp.tril(jnp.ones((t, t), bool))
    probs = []
    for i in range(cfg.num_layers):
        h_BTE = state["intermediates"][f"layer_{i}"]["attn_norm"]["__call__"][0]
        p = params[f"layer_{i}"]["attn"]
        q = apply_rope(jnp.einsum("bte,ehd->bthd", h_BTE, p["query"]), pos, cfg.rope)
        k = apply_rope(jnp.einsum("bte,ekd->btkd", h_BTE, p["key"]), pos, cfg.rope)
        k = jnp.repeat(k, cfg.num_heads // cfg.num_kv_heads, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.head_dim)
        probs.append(jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1))
    return probs


def first_token_attention(model, params, tokens_BT, num_first=4):
    """Per layer, the mean attention probability (over heads and the queries of the second half
    of the sequence) on its first `num_first` tokens: [num_layers]. (Spread evenly, the mass
    would be about num_first / (0.75 T).)"""
    t = tokens_BT.shape[1]
    return [
        float(jnp.mean(p[:, :, t // 2 :, :num_first].sum(-1)))
        for p in attention_probs(model, params, tokens_BT)
    ]


def binned(nll_BL, bin_size):
    """(bin starts, perplexity of each bin averaged over rows and positions)."""
    n = nll_BL.shape[1] // bin_size * bin_size
    per_bin = np.asarray(nll_BL)[:, :n].reshape(nll_BL.shape[0], -1, bin_size).mean(axis=(0, 2))
    return np.arange(0, n, bin_size), np.exp(per_bin)


def plot(result, path=None):
    """Perplexity against position for every method (left) and each cached method's ratio to
    the recomputed reference (right: drift shows as a departure from 1); the cache length
    marked."""
    import matplotlib.pyplot as plt

    fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(11, 3.8))
    methods = result["methods"]
    ref = np.asarray(list(methods.values())[-1]["perplexity"])
    for name, r in methods.items():
        ax.plot(r["bin_start"], r["perplexity"], marker="o", ms=3, label=name)
        ax_ratio.plot(r["bin_start"], np.asarray(r["perplexity"]) / ref, marker="o", ms=3)
    for a in (ax, ax_ratio):
        a.axvline(result["cache_len"], color="gray", ls="--", lw=1)
        a.set_xlabel("position in the stream (tokens; dashed: the cache is full)")
    ax.set_ylabel(f"perplexity (bins of {result['bin_size']})")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax_ratio.set_ylabel("perplexity / recomputed window")
    fig.suptitle(
        f"Streaming: cache of {result['cache_len']} tokens ({result['num_sinks']} sinks), "
        f"{result['num_streams']} streams of {result['stream_len']}",
        fontsize=10,
    )
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def evaluate(cfg, params, streams_BL, *, cache_len, num_sinks=4, bin_size=128, log=print):
    """Every method on the streams [B, L]: per-bin perplexity, mean perplexity after the cache
    is full, and the attention mass each layer puts on the first tokens."""
    cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, impl="dense"))
    model = gen.decoding_model(cfg)  # one device: the caches are small
    params = gen.decoding_params(cfg, params)
    methods = {
        f"sink + window ({num_sinks} + {cache_len - num_sinks})": gen.CacheSpec(
            "sink_window", num_sinks=num_sinks, window=cache_len - num_sinks
        ),
        f"window only ({cache_len})": gen.CacheSpec("window", window=cache_len),
        f"sliding window, recomputed ({cache_len})": None,
    }
    out = dict(
        cache_len=cache_len,
        num_sinks=num_sinks,
        stream_len=int(streams_BL.shape[1]),
        num_streams=int(streams_BL.shape[0]),
        bin_size=bin_size,
        methods={},
    )
    for name, spec in methods.items():
        if spec is None:
            nll = recompute_nll(model, params, streams_BL, cache_len)
        else:
            nll = np.asarray(stream_nll(model, params, streams_BL, spec))
        starts, ppl = binned(nll, bin_size)
        after = float(np.exp(nll[:, cache_len:].mean()))
        out["methods"][name] = dict(
            bin_start=starts.tolist(), perplexity=ppl.tolist(), perplexity_after_cache_full=after
        )
        log(f"{name}: perplexity after the cache is full {after:.3f}")
    probe = jnp.asarray(streams_BL[:, :cache_len])
    out["first_token_attention"] = first_token_attention(model, params, probe, num_sinks)
    log(
        f"attention mass on the first {num_sinks} tokens, per layer: {out['first_token_attention']}"
    )
    return out
