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

import numpy as np

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


def answer_accuracy(model, params, cases, mesh=None, quantize=False, tokenizer=None):
    """(exact-match accuracy, the answers) of greedy decoding: the first len(key) generated
    bytes are the key (with a `tokenizer`: the first number in the decoded answer is).
    `quantize`: an int8 KV cache."""
    cfg = model.cfg
    batch = gen.prompt_batch([p for p, _ in cases], gen.pad_multiple(cfg, mesh))
    steps = MAX_DIGITS + (tokenizer is not None)  # a space before the digits
    length = batch["tokens"].shape[1] + steps
    spec = gen.CacheSpec("full", max_len=length, quantize=quantize)
    caches = gen.init_caches(cfg, spec, len(cases), mesh)
    out = gen.generate(model, params, batch, caches, steps)
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
    log=print,
):
    """[{rope_scaling, length, depth, accuracy, num_samples}] over the grid; at the training
    length every scaling is the identity, so it is measured once and shared. `quantize`: decode
    with int8 KV caches. `tokenizer`: a pretrained model's, for the natural-language prompt."""
    rows, cache, seconds, said_by = [], {}, {}, {}
    params = gen.decoding_params(cfg, params)
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
                        acc, said = answer_accuracy(model, params, part, mesh, quantize, tokenizer)
                        right, answers = right + acc * len(part), answers + said
                    cache[key, length, depth] = right / num_samples
                    keys = [k for _, k in cases]
                    said_by[key, length, depth] = [list(x) for x in zip(keys, answers, strict=True)]
                    seconds[key, length, depth] = time.perf_counter() - t0
                row = dict(
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
                    f"{scaling:>7} length {length:6d} depth {depth:.2f}: "
                    f"accuracy {row['accuracy']:.3f} ({row['seconds']:.0f} s)"
                )
    return rows


def plot_heatmap(rows, path=None, title="Needle in a haystack: exact match"):
    """One panel per RoPE scaling: depth (rows) x length (columns), accuracy in each cell."""
    import matplotlib.pyplot as plt

    scalings = list(dict.fromkeys(r["rope_scaling"] for r in rows))
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
            if r["rope_scaling"] == scaling:
                grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["accuracy"]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), a in np.ndenumerate(grid):
            ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(f"RoPE: {scaling}", fontsize=10)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(title, fontsize=11)
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
    return fig
