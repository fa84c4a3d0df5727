"""Needle in a haystack: passkey prompts over a grid of lengths x depths, answered by KV-cache
decoding (context-parallel prefill, greedy steps against the sharded cache) and scored by exact
match; RoPE scalings to read past the training length; the accuracy heatmap.

Our byte-level runs get the passkey prompts they were trained on. A pretrained model (a run with
a tokenizer) gets the natural-language passkey prompt of the long-context literature (Mohtashami
& Jaggi 2023's, used as is): an instruction, a repeated filler, "The pass key is 12345. Remember
it. 12345 is the pass key." at the depth, and "What is the pass key? The pass key is"; it is
right when the first number it writes is the key."""

from __future__ import annotations

import dataclasses
import re
import time

import jax
import numpy as np

from ringattn.decode import cache as cache_lib
from ringattn.evals import generate as gen
from ringattn.nn.config import ModelConfig
from ringattn.train import data as data_lib

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MAX_DIGITS = 7  # passkey's default key lengths are 5..7 digits
INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there."
)
FILLER = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
CHUNK = 256  # prompt tokens per prefill step through a bounded cache


def with_rope_scaling(cfg: ModelConfig, scaling, length, train_len) -> ModelConfig:
    """cfg whose RoPE reads `length` tokens. "none" leaves RoPE as trained. Another scaling
    stretches it by length / L from L: the run's RoPE original length when it was trained with a
    scaling (a context-extended run, which at its training length gets exactly its trained RoPE
    back), else its training length `train_len`; never below the trained factor."""
    if scaling == "none":
        return cfg
    scaled = cfg.rope.scaling != "none" and cfg.rope.factor > 1
    base = cfg.rope.original_len if scaled else train_len
    factor = max(length / base, cfg.rope.factor if scaled else 1.0)
    rope = dataclasses.replace(cfg.rope, scaling=scaling, factor=factor, original_len=int(base))
    return dataclasses.replace(cfg, rope=rope)


def prompts(length, depth, num_samples, seed=0, tokenizer=None):
    """`num_samples` passkey prompts of `length` tokens (prompt + key) with the needle at
    `depth`: [(tokens, key)], each from its own seeded generator; with a `tokenizer` (a
    pretrained model's), `text_prompt`s of at most `length` tokens."""
    rngs = [
        np.random.default_rng([seed, length, round(depth * 1000), i]) for i in range(num_samples)
    ]
    if tokenizer is not None:
        return [text_prompt(tokenizer, rng, length, depth) for rng in rngs]
    return [data_lib.passkey_prompt(rng, length, depth) for rng in rngs]


def text_prompt(tokenizer, rng, length, depth, num_digits=5):
    """(tokens, key): the natural-language passkey prompt (module docstring) with as many filler
    sentences as fit in `length` tokens and the needle after `depth` of them. Pieces are encoded
    one by one (each starts with a space) and their ids concatenated."""
    key = str(rng.integers(10 ** (num_digits - 1), 10**num_digits))
    intro, filler, needle, question = (
        tokenizer.encode(t, add_special_tokens=i == 0)
        for i, t in enumerate((INTRO, FILLER, NEEDLE.format(key=key), QUESTION))
    )
    fixed = len(intro) + len(needle) + len(question)
    n = (length - fixed) // len(filler)
    if n < 1:
        raise ValueError(f"text_prompt: `length` {length} leaves no room for the filler.")
    at = round(depth * n)
    pieces = [intro, *[filler] * at, needle, *[filler] * (n - at), question]
    return np.concatenate(pieces).astype(np.int32), key


def cache_for(cache, length, quantize=False):
    """The CacheSpec of one batch: `cache` (a CacheSpec template; None: a full cache) holding
    `length` tokens when it holds them all (full, retrieval)."""
    cache = cache or gen.CacheSpec("full")
    if cache.kind in ("full", "retrieval"):
        cache = dataclasses.replace(cache, max_len=length)
    return dataclasses.replace(cache, quantize=quantize or cache.quantize)


def tokens_attended(spec, length, num_layers):
    """Tokens a decode step of a `length`-token context attends to (per KV head), averaged
    over the model's `num_layers` layers (a retrieval cache's lowest `dense_layers` read every
    token)."""
    if spec.kind == "full":
        return length
    if spec.dense_layers > num_layers:
        raise ValueError(
            f"tokens_attended: `dense_layers` ({spec.dense_layers}) exceeds the model's "
            f"{num_layers} layers."
        )
    pages = spec.top_pages * spec.page_size if spec.kind == "retrieval" else 0
    bounded = min(length, spec.num_sinks + spec.window + pages)
    dense = spec.dense_layers
    return round((dense * length + (num_layers - dense) * bounded) / num_layers)


def cache_bytes(cfg, spec, length):
    """Bytes of one prompt's caches (every layer) for a `length`-token context."""
    shapes = jax.eval_shape(lambda: gen.init_caches(cfg, cache_for(spec, length), 1))
    return sum(cache_lib.cache_bytes(c) for c in shapes)


def answer_accuracy(
    model, params, cases, mesh=None, quantize=False, tokenizer=None, cache=None, prefill_chunk=None
):  # fmt: skip
    """(exact-match accuracy, the answers) of greedy decoding: the first len(key) generated
    bytes are the key (with a `tokenizer`: the first number in the decoded answer is).
    `quantize`: an int8 KV cache. `cache`: a CacheSpec template (None: full); a bounded one
    (not "full") streams the prompt through itself `prefill_chunk` tokens at a time, so no
    prompt is attended densely (the first chunk, attended whole, fits in sinks + window)."""
    cfg = model.cfg
    batch = gen.prompt_batch([p for p, _ in cases], gen.pad_multiple(cfg, mesh))
    steps = MAX_DIGITS + (tokenizer is not None)  # a space before the digits
    length = batch["tokens"].shape[1] + steps
    spec = cache_for(cache, length, quantize)
    chunk = None
    if spec.kind != "full":
        chunk = prefill_chunk or CHUNK
        if chunk > spec.num_sinks + spec.window:
            raise ValueError(
                f"needle: `prefill_chunk` ({chunk}) must fit the {spec.kind} cache's sinks + "
                f"window ({spec.num_sinks + spec.window}): the first chunk is attended whole."
            )
    caches = gen.init_caches(cfg, spec, len(cases), mesh)
    out = gen.generate(model, params, batch, caches, steps, prefill_chunk=chunk)
    if tokenizer is None:
        answers = [data_lib.decode(t) for t in out["tokens"]]
        right = [a[: len(k)] == k for a, (_, k) in zip(answers, cases, strict=True)]
    else:
        answers = [tokenizer.decode(t) for t in out["tokens"]]
        right = [re.findall(r"\d+", a)[:1] == [k] for a, (_, k) in zip(answers, cases, strict=True)]
    return float(np.mean(right)), answers


def evaluate(
    cfg: ModelConfig,
    params,
    mesh,
    *,
    train_len,
    lengths,
    depths=DEPTHS,
    scalings=("none",),
    num_samples=16,
    batch_size=16,
    seed=0,
    quantize=False,
    tokenizer=None,
    caches=(None,),
    prefill_chunk=None,
    log=print,
):
    """[{cache, tokens_attended, cache_mib, rope_scaling, length, depth, accuracy,
    num_samples}] over the grid, for each of `caches` (CacheSpec templates; None: full; see
    answer_accuracy for `prefill_chunk`); at the training length every scaling is the identity,
    so it is measured once and shared. `quantize`: decode with int8 KV caches. `tokenizer`: a
    pretrained model's, for the natural-language prompt."""
    params = gen.decoding_params(cfg, params)
    rows = []
    for spec in caches:
        rows += _evaluate_cache(
            cfg, params, mesh, spec or gen.CacheSpec("full"), train_len, lengths, depths,
            scalings, num_samples, batch_size, seed, quantize, tokenizer, prefill_chunk, log,
        )  # fmt: skip
    return rows


def _evaluate_cache(
    cfg, params, mesh, spec, train_len, lengths, depths, scalings, num_samples, batch_size, seed,
    quantize, tokenizer, prefill_chunk, log,
):  # fmt: skip
    rows, cache, seconds, said_by = [], {}, {}, {}
    for scaling in scalings:
        for length in lengths:
            key = "none" if length <= train_len else scaling
            scaled = with_rope_scaling(cfg, key, length, train_len)
            model = gen.decoding_model(scaled, mesh)
            for depth in depths:
                if (key, length, depth) not in cache:
                    t0 = time.perf_counter()
                    cases = prompts(length, depth, num_samples, seed, tokenizer)
                    right, answers = 0.0, []
                    for i in range(0, num_samples, batch_size):
                        part = cases[i : i + batch_size]
                        acc, said = answer_accuracy(
                            model, params, part, mesh, quantize, tokenizer, spec, prefill_chunk
                        )
                        right, answers = right + acc * len(part), answers + said
                    cache[key, length, depth] = right / num_samples
                    keys = [k for _, k in cases]
                    said_by[key, length, depth] = [list(x) for x in zip(keys, answers, strict=True)]
                    seconds[key, length, depth] = time.perf_counter() - t0
                row = dict(
                    cache=spec.kind,
                    tokens_attended=tokens_attended(spec, length, cfg.num_layers),
                    cache_mib=round(cache_bytes(cfg, spec, length) / 2**20, 2),
                    rope_scaling=scaling,
                    length=int(length),
                    depth=float(depth),
                    accuracy=cache[key, length, depth],
                    num_samples=num_samples,
                    seconds=round(seconds[key, length, depth], 1),
                    answers=said_by[key, length, depth][:4],  # [key, what the model wrote]
                )
                rows.append(row)
                log(
                    f"{spec.kind:>11} {scaling:>7} length {length:6d} depth {depth:.2f}: "
                    f"accuracy {row['accuracy']:.3f} ({row['seconds']:.0f} s)"
                )
    return rows


def plot_heatmap(rows, path=None, title="Needle in a haystack: exact match"):
    """One panel per RoPE scaling (or per cache, when the rows have several): depth (rows) x
    length (columns), accuracy in each cell."""
    import matplotlib.pyplot as plt

    by_cache = len({r.get("cache", "full") for r in rows}) > 1
    panel = lambda r: r.get("cache", "full") if by_cache else r["rope_scaling"]  # noqa: E731
    scalings = list(dict.fromkeys(map(panel, rows)))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(
        1,
        len(scalings),
        figsize=(1.8 + 1.1 * len(lengths) * len(scalings), 3.4),
        squeeze=False,
        sharey=True,
        constrained_layout=True,
    )
    for ax, scaling in zip(axes[0], scalings, strict=True):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for r in rows:
            if panel(r) == scaling:
                grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["accuracy"]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), a in np.ndenumerate(grid):
            ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        attended = {r.get("tokens_attended") for r in rows if panel(r) == scaling}
        name = f"{scaling} ({'/'.join(map(str, sorted(attended)))} tokens/step)"
        ax.set_title(name if by_cache else f"RoPE: {scaling}", fontsize=10)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(title, fontsize=11)
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
    return fig
