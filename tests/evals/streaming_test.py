"""Streaming evaluation on tiny random one-layer models (one layer keeps the compilations few):
the methods agree until the cache evicts, dense is a full cache, the window cache is the
recomputed window, the attention shares match their closed forms (uniform attention, a learned
sink logit), BOS-led evaluation streams."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import linen as nn

from ringattn.evals import generate as gen
from ringattn.evals import streaming
from ringattn.nn.config import AttentionConfig, ModelConfig
from ringattn.nn.model import Transformer
from ringattn.train.tokens import BOS

B, L, CACHE, SINKS = 2, 40, 12, 2
CFG = ModelConfig(
    vocab_size=64, num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, head_dim=8,
    mlp_dim=64, attention=AttentionConfig(impl="dense"),
)  # fmt: skip
SINK_CFG = dataclasses.replace(CFG, attention=AttentionConfig(impl="dense", sinks=True))


@functools.cache
def params(cfg=CFG):
    tok = np.ones((1, 8), np.int32)
    pos = np.arange(8, dtype=np.int32)[None]
    return nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), tok, pos, tok))["params"]


def streams(seed=0):
    return np.random.default_rng(seed).integers(2, CFG.vocab_size, (B, L)).astype(np.int32)


def quiet(*_):
    pass


def test_methods_agree_until_eviction_and_dense_is_a_full_cache():
    s = streams()
    result = streaming.evaluate(
        CFG, params(), s, cache_len=CACHE, num_sinks=SINKS, bin_size=4, log=quiet
    )
    assert list(result["summary"]) == list(streaming.METHODS)
    ppl = {k: np.asarray(m["perplexity"]) for k, m in result["methods"].items()}
    for k in ("dense", "window", "sink_window"):  # bins 0-1: no token evicted yet
        np.testing.assert_allclose(ppl[k][:2], ppl["recompute"][:2], rtol=1e-5)
    assert not np.allclose(ppl["window"][-3:], ppl["sink_window"][-3:], rtol=1e-4)
    model = gen.decoding_model(CFG)
    full = streaming.stream_nll(model, params(), s, gen.CacheSpec("full", max_len=L))
    dense = streaming.method_nll(model, params(), s, "dense", CACHE, SINKS)
    np.testing.assert_allclose(dense, full, rtol=1e-4, atol=1e-5)
    assert result["summary"]["dense"] == pytest.approx(np.exp(dense[:, CACHE:].mean()), 1e-6)
    assert set(streaming.ratios(result["summary"])) == {
        "window_over_sink_window", "sink_window_over_recompute", "dense_over_recompute",
    }  # fmt: skip


def test_one_layer_window_cache_is_the_recomputed_window():
    """A single layer's cached K/V do not depend on the context, so evicting by position is
    exactly rerunning the model on the window."""
    model = gen.decoding_model(CFG)
    s = streams(1)
    window = streaming.method_nll(model, params(), s, "window", CACHE, SINKS)
    recompute = streaming.method_nll(model, params(), s, "recompute", CACHE, SINKS)
    np.testing.assert_allclose(window, recompute, rtol=1e-5, atol=1e-6)


def test_attention_shares_closed_forms():
    """Zero query weights make every layer's attention uniform over the visible keys: the share
    on the first tokens is the even spread, and a sink logit c takes e^c / (e^c + keys seen)."""
    t, c = 16, 1.5
    p = jax.tree.map(np.array, params(SINK_CFG))
    for i in range(SINK_CFG.num_layers):
        p[f"layer_{i}"]["attn"]["query"][:] = 0
        p[f"layer_{i}"]["attn"]["sinks"][:] = c
    model = gen.decoding_model(SINK_CFG)
    tok = streams()[:, :t]
    first, sink = streaming.attention_shares(model, p, tok, SINKS)
    seen = np.arange(t // 2, t) + 1
    share = np.exp(c) / (np.exp(c) + seen)
    assert first.shape == sink.shape == (SINK_CFG.num_layers, SINK_CFG.num_heads)
    np.testing.assert_allclose(sink, share.mean(), rtol=1e-5)
    np.testing.assert_allclose(first, np.mean(SINKS / (np.exp(c) + seen)), rtol=1e-5)
    plain = dataclasses.replace(SINK_CFG, attention=AttentionConfig(impl="dense"))
    for i in range(SINK_CFG.num_layers):
        del p[f"layer_{i}"]["attn"]["sinks"]
    first, sink = streaming.attention_shares(gen.decoding_model(plain), p, tok, SINKS)
    assert sink is None
    np.testing.assert_allclose(first, streaming.even_share(t, SINKS), rtol=1e-5)
    assert streaming.even_share(256, 4) == pytest.approx(4 * 2 * np.log(2) / 256, rel=0.01)


def test_eval_streams_start_with_bos_when_trained_with_it():
    with_bos = streaming.eval_streams({"bos": True}, 64, 2)
    without = streaming.eval_streams({}, 64, 2)
    assert with_bos.shape == without.shape == (2, 64)
    assert (with_bos[:, 0] == BOS).all() and (with_bos[:, 1:] != BOS).all()
    np.testing.assert_array_equal(with_bos[:, 1:], without[:, :-1])
    assert (without != BOS).all() and not np.array_equal(without[0], without[1])


def test_strided_recompute_scores_every_kth_window_and_summaries_share_positions(tmp_path):
    model = gen.decoding_model(CFG)
    s = streams(2)
    every = streaming.recompute_nll(model, params(), s, CACHE)
    strided = streaming.recompute_nll(model, params(), s, CACHE, stride=5)
    scored = np.isfinite(strided)
    want = np.zeros_like(scored)
    want[:, : CACHE - 1] = True  # the prefix: one causal pass
    want[:, CACHE - 1 :: 5] = True
    np.testing.assert_array_equal(scored, want)
    np.testing.assert_allclose(strided[scored], every[scored], rtol=1e-5)
    result = streaming.evaluate(
        CFG, params(), s, cache_len=CACHE, num_sinks=SINKS, bin_size=4, recompute_stride=5,
        methods=("window", "recompute"), log=quiet,
    )  # fmt: skip
    at = want[:, CACHE:]
    window = streaming.method_nll(model, params(), s, "window", CACHE, SINKS)
    assert result["summary"]["window"] == pytest.approx(np.exp(window[:, CACHE:][at].mean()))
    assert result["methods"]["recompute"]["positions_scored"] == at.sum()


def test_text_streams_are_each_files_first_tokens(tmp_path):
    from ringattn.hf.tokenizer import ByteTokenizer

    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text("x" * 50)
    files[1].write_text("héllo " * 10)
    got = streaming.text_streams(ByteTokenizer(), files, 40)
    assert got.shape == (2, 40) and got.dtype == np.int32
    assert bytes(got[1].astype(np.uint8)) == ("héllo " * 10).encode()[:40]
    with pytest.raises(ValueError, match="a.txt has 50 tokens"):
        streaming.text_streams(ByteTokenizer(), files, 60)
