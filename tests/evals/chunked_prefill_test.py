"""A prompt prefilled in chunks of uneven sizes, then decoded, gives the logits of one full
forward pass: on 1, 4 and 8 devices, for pass-KV, pass-Q and auto, with contiguous and striped
(balanced) caches; generate's --prefill_chunk gives the tokens of a whole-prompt prefill."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import linen as nn

from ringattn.evals import generate as gen
from ringattn.mesh import make_mesh
from ringattn.nn.config import AttentionConfig, ModelConfig
from ringattn.nn.model import Transformer
from ringattn.parallel.layouts import from_layout, to_layout

B, T = 2, 40
LENGTHS = (34, 27)  # ragged rows: the second ends inside the second chunk
CHUNKS = (8, 16, 16)  # uneven; the last runs past both rows' prompts (padding)
CFG = ModelConfig(
    vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
    mlp_dim=64, attention=AttentionConfig(impl="dense"),
)  # fmt: skip


def tokens():
    return np.random.default_rng(0).integers(1, CFG.vocab_size, (B, T)).astype(np.int32)


@functools.cache
def params():
    tok = tokens()
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    init = jax.jit(Transformer(CFG).init)
    return nn.unbox(init(jax.random.key(1), tok, pos, np.ones_like(tok)))["params"]


@functools.cache
def full_logits():
    tok = tokens()
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    return np.asarray(jax.jit(Transformer(CFG).apply)({"params": params()}, tok, pos, pos * 0 + 1))


@functools.cache
def prefill_fn(model, bound):
    return jax.jit(
        lambda p, t, q, s, c: model.apply(
            {"params": p}, t, q, s, c, bound, method=Transformer.prefill
        )
    )


def chunk_logits(model, caches, start, size, n, bound):
    """All logits [B, size, V] of the chunk of `size` tokens from `start` (positions past a
    row's prompt are padding), prefilled into `caches` in the model's layout."""
    tok = tokens()[:, start : start + size]
    pos = start + np.arange(size, dtype=np.int32)[None].repeat(B, 0)
    real = pos < np.asarray(LENGTHS)[:, None]
    pos, seg = np.where(real, pos, -1), real.astype(np.int32)
    layout = model.cfg.attention.layout
    order = (lambda x: to_layout(x, layout, n)) if n > 1 else np.asarray  # noqa: E731
    pre = prefill_fn(model, bound)
    logits, caches = pre(params(), order(tok), order(pos), order(seg), caches)
    logits = from_layout(logits, layout, n) if n > 1 else logits
    return np.where(real[..., None], np.asarray(logits), np.nan), caches


CELLS = [  # (devices, strategy, cache layout, chunk layout)
    (1, "auto", "contiguous", "contiguous"),
    (4, "pass_q", "contiguous", "zigzag"),
    (4, "pass_kv", "striped", "contiguous"),
    (8, "auto", "striped", "striped"),
    (8, "pass_kv", "contiguous", "contiguous"),
    (8, "pass_q", "striped", "striped"),
]


@pytest.mark.parametrize("n, strategy, cache_layout, layout", CELLS)
def test_chunked_prefill_then_decode_equals_full_forward(n, strategy, cache_layout, layout):
    impl = "blockwise" if n == 1 else "ring"
    attn = AttentionConfig(impl=impl, layout=layout, prefill=strategy, block_q=4, block_k=4)
    cfg = dataclasses.replace(CFG, attention=attn)
    mesh = None if n == 1 else make_mesh(dict(context=n), jax.devices()[:n])
    model = gen.decoding_model(cfg, mesh)
    spec = gen.CacheSpec("full", max_len=T, cache_layout=cache_layout)
    caches = gen.init_caches(cfg, spec, B, mesh)
    got = np.full((B, T, CFG.vocab_size), np.nan, np.float32)
    start = 0
    for size in CHUNKS:
        # No bound after the first chunk (so that 2 programs serve all 3), but in one cell.
        bound = 0 if start == 0 else (start if (n, strategy) == (4, "pass_kv") else None)
        got[:, start : start + size], caches = chunk_logits(model, caches, start, size, n, bound)
        start += size
    np.testing.assert_array_equal(np.asarray(caches[0].pos >= 0).sum(1), LENGTHS)
    # Then one decode step per row, at its next position.
    pos = np.asarray(LENGTHS, np.int32)[:, None]
    step = jax.jit(
        lambda p, t, q, c: model.apply({"params": p}, t, q, c, method=Transformer.decode)
    )
    logits, _ = step(params(), tokens()[np.arange(B), pos[:, 0]][:, None], pos, caches)
    got[np.arange(B), pos[:, 0]] = np.asarray(logits)[:, 0]
    want = full_logits()
    seen = ~np.isnan(got)
    assert seen.sum() == (sum(LENGTHS) + B) * CFG.vocab_size  # every prompt token, one step
    err = np.abs(got[seen] - want[seen]).max()
    assert err <= 2e-5 * np.abs(want).max(), err
    if mesh is not None:
        assert {s.data.shape[1] for s in caches[0].k.addressable_shards} == {T // n}


def test_generate_prefill_chunk_gives_the_whole_prompt_tokens():
    """generate(prefill_chunk=8) on 4 devices: the same greedy tokens as one whole-prompt
    prefill, and a chunk that is no multiple of the layout is refused."""
    attn = AttentionConfig(impl="ring", layout="zigzag", block_q=4, block_k=4)
    cfg = dataclasses.replace(CFG, attention=attn)
    mesh = make_mesh(dict(context=4), jax.devices()[:4])
    model = gen.decoding_model(cfg, mesh)
    batch = gen.prompt_batch([tokens()[0, :30], tokens()[1, :19]], gen.pad_multiple(cfg, mesh))
    spec = gen.CacheSpec("full", max_len=48)
    out = {}
    for chunk in (None, 8):
        caches = gen.init_caches(cfg, spec, B, mesh)
        out[chunk] = gen.generate(model, params(), batch, caches, 6, prefill_chunk=chunk)
    np.testing.assert_array_equal(out[8]["tokens"], out[None]["tokens"])
    with pytest.raises(ValueError, match="`prefill_chunk` must be a positive multiple of 8"):
        gen.generate(model, params(), batch, caches, 2, prefill_chunk=12)


def test_chunked_vs_whole_reports_the_same_distribution():
    """prefill_bench.chunked_vs_whole (what the real-model check runs) on the tiny model: the
    chunked prefill's next-token distribution is the whole prompt's."""
    from ringattn.bench import prefill as prefill_bench

    attn = AttentionConfig(impl="ring", layout="striped", block_q=4, block_k=4)
    cfg = dataclasses.replace(CFG, attention=attn)
    mesh = make_mesh(dict(context=4), jax.devices()[:4])
    row = prefill_bench.chunked_vs_whole(cfg, params(), mesh, tokens()[0, :37], 20, "pass_q")
    assert row["max_abs_logprob_diff"] < 1e-5 and abs(row["kl"]) < 1e-6, row  # float32
    assert row["same_argmax"] and row["same_top10"] and row["chunked_s"] > 0
