"""A model decoding through retrieval caches (ringattn/decode/retrieval.py): a prompt streamed in
chunks then decoded gives the full forward pass when every page is chosen, and the one-device
logits on a mesh when few are; generate and its flags run it."""

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

B, T, CHUNK = 2, 40, 8
LENGTHS = (24, 19)  # ragged prompts
CFG = ModelConfig(
    vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
    mlp_dim=64, attention=AttentionConfig(impl="dense"),
)  # fmt: skip
RING = dataclasses.replace(
    CFG, attention=AttentionConfig(impl="ring", layout="zigzag", block_q=4, block_k=4)
)


def tokens():
    return np.random.default_rng(0).integers(1, CFG.vocab_size, (B, T)).astype(np.int32)


@functools.cache
def params():
    tok = tokens()
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    init = jax.jit(Transformer(CFG).init)
    return nn.unbox(init(jax.random.key(1), tok, pos, np.ones_like(tok)))["params"]


def full_logits():
    tok = tokens()
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    return np.asarray(jax.jit(Transformer(CFG).apply)({"params": params()}, tok, pos, pos * 0 + 1))


@functools.cache
def steps(cfg, mesh):
    model = gen.decoding_model(cfg, mesh)
    pre = jax.jit(functools.partial(gen.prefill, model), static_argnums=3)
    step = jax.jit(
        lambda p, t, pos, c: model.apply({"params": p}, t, pos, c, method=Transformer.decode)
    )
    return pre, step


def streamed_logits(cfg, spec, mesh=None):
    """Logits [B, T, V] from each row's last prompt token on (NaN before): the prompts prefilled
    CHUNK tokens at a time through the caches, then the rest one token per step."""
    tok, (pre, step) = tokens(), steps(cfg, mesh)
    caches = gen.init_caches(cfg, spec, B, mesh)
    batch = gen.prompt_batch([tok[i, :n] for i, n in enumerate(LENGTHS)])
    logits, caches = gen.prefill_in_chunks(pre, params(), batch, caches, CHUNK)
    lens = np.asarray(LENGTHS)
    out = np.full(tok.shape + (CFG.vocab_size,), np.nan, np.float32)
    out[np.arange(B), lens - 1] = logits
    for i in range(T - lens.min()):
        pos = np.minimum(lens + i, T - 1)
        logits, caches = step(params(), tok[np.arange(B), pos][:, None], pos[:, None], caches)
        out[np.arange(B), pos] = logits[:, 0]
    return out, caches


def spec(top_pages, **kw):
    return gen.CacheSpec(
        "retrieval", max_len=T, num_sinks=2, window=5, page_size=4, top_pages=top_pages,
        selection_block=3, **kw,
    )  # fmt: skip


def test_every_page_chosen_is_the_full_forward_pass():
    got, caches = streamed_logits(CFG, spec(top_pages=10))
    want = full_logits()
    seen = ~np.isnan(got)
    assert seen[:, -1].all()
    assert np.abs(got[seen] - want[seen]).max() <= 2e-5 * np.abs(want[seen]).max()
    assert caches[0].kind == "retrieval" and caches[0].num_slots == T


def test_few_pages_on_a_mesh_equal_one_device():
    """2 of 10 pages per step: a (data 2, context 4) mesh, pages striped over context, gives
    the one-device logits; and they differ from the full cache's (pages were left out)."""
    mesh = make_mesh(dict(data=2, context=4))
    got, caches = streamed_logits(RING, spec(top_pages=2), mesh)
    want, _ = streamed_logits(CFG, spec(top_pages=2))
    seen = ~np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), ~seen)
    assert np.abs(got[seen] - want[seen]).max() <= 2e-5 * np.abs(want[seen]).max()
    assert caches[0].k.sharding.spec[:2] == ("data", "context")
    assert np.abs(want[seen] - full_logits()[seen]).max() > 1e-3


def test_generate_with_a_retrieval_cache():
    model = gen.decoding_model(CFG)
    tok = tokens()
    batch = gen.prompt_batch([tok[0, :20], tok[1, :13]])
    full = gen.generate(
        model, params(), batch, gen.init_caches(CFG, gen.CacheSpec("full", max_len=T), B), 8
    )
    out = gen.generate(
        model, params(), batch, gen.init_caches(CFG, spec(top_pages=10), B), 8, prefill_chunk=4
    )
    np.testing.assert_array_equal(out["tokens"], full["tokens"])


def test_dense_layers_read_every_page():
    """The lowest `dense_layers` layers choose every page (Quest keeps its first two dense):
    with both layers dense, 2 pages a step give the full forward pass; with one, only layer 0
    reads every page, and what a step reads and attends to is the two layers' mean."""
    from ringattn.bench import retrieval as bench
    from ringattn.evals import needle

    got, caches = streamed_logits(CFG, spec(top_pages=2, dense_layers=2))
    want = full_logits()
    seen = ~np.isnan(got)
    assert np.abs(got[seen] - want[seen]).max() <= 2e-5 * np.abs(want[seen]).max()
    assert [c.top_pages for c in caches] == [caches[0].num_pages] * 2 == [10, 10]
    one = spec(top_pages=2, dense_layers=1)
    assert [c.top_pages for c in gen.init_caches(CFG, one, B)] == [10, 2]
    sizes = [bench.bytes_per_token(CFG, spec(2, dense_layers=d), T) for d in (0, 1, 2)]
    assert sizes[0] < sizes[1] < sizes[2] and sizes[1] == (sizes[0] + sizes[2]) // 2
    assert needle.tokens_attended(one, T, CFG.num_layers) == round((T + 2 + 5 + 2 * 4) / 2)
    with pytest.raises(ValueError, match="`dense_layers` must be an int in \\[0, 2\\]"):
        gen.init_caches(CFG, spec(2, dense_layers=3), B)
