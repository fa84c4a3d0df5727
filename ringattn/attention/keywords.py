"""The keywords the attention functions share, written once.

Every public attention function (one device, inside `jax.shard_map`, over a mesh; attention,
decoding, prefill) takes the same mask, score and kernel keywords. They are declared here once,
as typed dicts (so editors complete and type-check `**attention: Unpack[AttentionKeywords]`),
with one default and one line of documentation each; `takes` gives a function its full,
readable signature for `help()` and `inspect`, appends the keywords' documentation to its
docstring, rejects unknown keywords by name and hands the function the complete dict:

    @keywords.takes(keywords.AttentionKeywords)
    def blockwise_attention(q, k, v, *, return_lse=False, **attention):
        opts, m, sinks = inputs.check("blockwise_attention", q, k, v, **attention)

A function whose default differs (decoding and prefill are causal) says so in `takes`, and its
help() says so too.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TypedDict

from jax.typing import ArrayLike

Window = int | tuple[int, int] | None


class MaskKeywords(TypedDict, total=False):
    causal: bool
    local_window_size: Window


class DocumentKeywords(TypedDict, total=False):
    segment_ids: ArrayLike | None
    kv_segment_ids: ArrayLike | None
    q_positions: ArrayLike | None
    kv_positions: ArrayLike | None


class ScoreKeywords(TypedDict, total=False):
    scale: float | None
    logits_soft_cap: float | None
    sinks: ArrayLike | None


class KernelKeywords(TypedDict, total=False):
    block_q: int | None
    block_k: int | None
    kernel: str | object


class DenseKeywords(MaskKeywords, DocumentKeywords, ScoreKeywords, total=False):
    """`reference_attention`'s keywords: the mask and the scores."""


class AttentionKeywords(DenseKeywords, KernelKeywords, total=False):
    """The keywords of every attention function that runs a kernel."""

    tile_callback: Callable | None


class DecodeKeywords(MaskKeywords, ScoreKeywords, total=False):
    """New queries against a KV cache (positions are the call's and the cache's)."""


class PrefillKeywords(MaskKeywords, ScoreKeywords, KernelKeywords, total=False):
    """A prompt chunk against a KV cache (positions are the chunk's and the cache's)."""

    segment_ids: ArrayLike | None


DEFAULTS = dict(
    causal=False,
    local_window_size=None,
    segment_ids=None,
    kv_segment_ids=None,
    q_positions=None,
    kv_positions=None,
    scale=None,
    logits_soft_cap=None,
    sinks=None,
    block_q=None,
    block_k=None,
    kernel="auto",
    tile_callback=None,
)

DOCS = dict(
    causal="key j is visible to query i only if pos(j) <= pos(i).",
    local_window_size="int w or (left, right): pos(i) - left <= pos(j) <= pos(i) + right, as in "
    "jax.nn.dot_product_attention (w keys to the left when causal); None: no window.",
    segment_ids="int [B, T]: keys are visible only within the query's segment (packed documents).",
    kv_segment_ids="int [B, S]: the keys' segments (default: `segment_ids`).",
    q_positions="int [T] or [B, T]: the queries' positions (default: in order, or the layout's).",
    kv_positions="int [S] or [B, S]: the keys' positions (default as for `q_positions`).",
    scale="the scores' factor (default 1 / sqrt(head_dim)).",
    logits_soft_cap="c > 0: scores s become c tanh(s / c) before the mask (Gemma 2).",
    sinks="float [H]: one learnable logit per query head, of value 0, in every softmax (gpt-oss); "
    "lse includes it.",
    block_q="the XLA kernel's query tile (None: the platform's default).",
    block_k="the XLA kernel's key tile (None: the platform's default).",
    kernel='"auto", "xla", "pallas_gpu", "cudnn", "pallas_tpu" or a kernel object.',
    tile_callback="f(pass, q_pos, kv_pos, masked), called on the host for every tile computed.",
)


def names(keywords) -> tuple[str, ...]:
    """The keyword names of one of the typed dicts above, in DEFAULTS' order."""
    keys = keywords.__required_keys__ | keywords.__optional_keys__
    return tuple(n for n in DEFAULTS if n in keys)


def takes(keywords, **defaults):
    """Decorator for `fn(..., **attention)`: `attention` arrives holding every keyword of
    `keywords` (one of the typed dicts above), the caller's or its default; `defaults` overrides
    defaults (e.g. causal=True). Unknown keywords are a TypeError naming them."""
    accepted = names(keywords)
    unknown = set(defaults) - set(accepted)
    if unknown:
        raise ValueError(f"takes: {sorted(unknown)} are not keywords of {keywords.__name__}.")
    default = {n: defaults.get(n, DEFAULTS[n]) for n in accepted}
    # The annotations as written (ArrayLike, not its expansion), for a readable help().
    hints = {n: getattr(h, "__forward_arg__", h) for n, h in keywords.__annotations__.items()}

    def decorate(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
        own_names = {p.name for p in own}
        extra = [
            inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=hints[n])
            for n, d in default.items()
        ]
        signature = sig.replace(parameters=own + extra)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bad = [k for k in kwargs if k not in own_names and k not in default]
            if bad:
                raise TypeError(
                    f"{fn.__name__}() got unexpected keyword argument(s) {bad}; its attention "
                    f"keywords are {list(accepted)}."
                )
            attention = {n: kwargs.pop(n, d) for n, d in default.items()}
            return fn(*args, **kwargs, **attention)

        wrapper.__signature__ = signature
        wrapper.__doc__ = (fn.__doc__ or "") + _doc(keywords, default)
        return wrapper

    return decorate


def _doc(keywords, default):
    lines = [f"\n\n    Attention keywords (ringattn.attention.keywords.{keywords.__name__}):"]
    for n, d in default.items():
        differs = "" if d == DEFAULTS[n] else f" Default here: {d!r}."
        lines.append(f"      {n} = {d!r}: {DOCS[n]}{differs}")
    return "\n".join(lines) + "\n"
