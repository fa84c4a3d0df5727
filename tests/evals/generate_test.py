"""Model decoding with KV caches: prefill + steps equal the full forward pass, the sharded cache
equals one device, the sink cache equals recomputation on the tokens it keeps, int8 error bound,
sampling."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ringattn.evals import generate as gen
from ringattn.mesh import make_mesh
from ringattn.nn.config import AttentionConfig, ModelConfig
from ringattn.nn.model import Transformer

B, T, PROMPT = 2, 24, 12
CFG = ModelConfig(
    vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
    mlp_dim=64, attention=AttentionConfig(impl="dense"),
)  # fmt: skip
RING = dataclasses.replace(
    CFG, attention=AttentionConfig(impl="ring", layout="zigzag", block_q=4, block_k=4)
)


def tokens(seed=0, t=T):
    return np.random.default_rng(seed).integers(1, CFG.vocab_size, (B, t)).astype(np.int32)


@functools.cache
def params(cfg=CFG):
    tok = tokens()
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    init = jax.jit(Transformer(cfg).init)  # eager init runs op by op: seconds
    return nn.unbox(init(jax.random.key(1), tok, pos, np.ones_like(tok)))["params"]


@functools.cache
def forward(cfg=CFG):
    return jax.jit(lambda p, t, pos: Transformer(cfg).apply({"params": p}, t, pos, (pos >= 0) + 0))


def full_logits(tok, cfg=CFG):
    pos = np.broadcast_to(np.arange(tok.shape[1], dtype=np.int32), tok.shape)
    return np.asarray(forward(cfg)(params(cfg), tok, pos))


@functools.cache
def stepper(cfg, mesh):
    model = gen.decoding_model(cfg, mesh)
    pre = jax.jit(functools.partial(gen.prefill, model, cache_bound=0))  # empty caches
    step = jax.jit(
        lambda p, t, pos, c: model.apply({"params": p}, t, pos, c, method=Transformer.decode)
    )
    return pre, step


def decode_logits(cfg, spec, mesh=None, prompt_lens=(PROMPT, PROMPT - 3), tok=None):
    """Logits [B, T, V] at every position from prompt_len - 1 on (NaN before): prefill the
    ragged prompts, then feed the rest of `tok` one token at a time."""
    tok = tokens() if tok is None else tok
    pre, step = stepper(cfg, mesh)
    p = params(dataclasses.replace(cfg, attention=CFG.attention))
    caches = gen.init_caches(cfg, spec, B, mesh)
    batch = gen.prompt_batch(
        [tok[i, :n] for i, n in enumerate(prompt_lens)], gen.pad_multiple(cfg, mesh)
    )
    out = np.full(tok.shape + (cfg.vocab_size,), np.nan, np.float32)
    lens = np.asarray(prompt_lens)
    logits, caches = pre(p, batch, caches)
    out[np.arange(B), lens - 1] = logits
    for i in range(tok.shape[1] - lens.min()):
        pos = np.minimum(lens + i, tok.shape[1] - 1)  # a row already done repeats its last
        logits, caches = step(p, tok[np.arange(B), pos][:, None], pos[:, None], caches)
        out[np.arange(B), pos] = logits[:, 0]
    return out, caches


def assert_close_where_decoded(got, want, rtol=2e-5):
    seen = ~np.isnan(got)
    assert seen[:, -1].all()
    err = np.abs(got[seen] - want[seen]).max()
    assert err <= rtol * np.abs(want[seen]).max(), err


def test_prefill_then_steps_equal_full_forward():
    got, caches = decode_logits(CFG, gen.CacheSpec("full", max_len=T))
    assert_close_where_decoded(got, full_logits(tokens()))
    np.testing.assert_array_equal(caches[0].pos, np.arange(T)[None].repeat(B, 0))


def test_chunked_decode_equals_full_forward():
    """Several new tokens per call (t = 5) see each other causally."""
    _, step = stepper(CFG, None)
    pre, _ = stepper(CFG, None)
    tok = tokens()
    caches = gen.init_caches(CFG, gen.CacheSpec("full", max_len=T), B)
    _, caches = pre(params(), gen.prompt_batch(list(tok[:, :PROMPT])), caches)
    pos = np.broadcast_to(np.arange(PROMPT, PROMPT + 5, dtype=np.int32), (B, 5))
    logits, _ = step(params(), tok[:, PROMPT : PROMPT + 5], pos, caches)
    want = full_logits(tok)[:, PROMPT : PROMPT + 5]
    np.testing.assert_allclose(logits, want, atol=2e-5 * np.abs(want).max())


def test_sharded_cache_decoding_equals_single_device():
    """Ring-attention prefill (zigzag) and decode steps on a (data 2, context 4) mesh, the cache
    sharded along the sequence over context, give the single-device logits."""
    mesh = make_mesh(dict(data=2, context=4))
    spec = gen.CacheSpec("full", max_len=T)
    got, caches = decode_logits(RING, spec, mesh)
    want, _ = decode_logits(CFG, spec)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert_close_where_decoded(got, want)
    assert caches[0].k.sharding.spec[:2] == ("data", "context")
    assert {s.data.shape[1] for s in caches[0].k.addressable_shards} == {T // 4}


SINK = gen.CacheSpec("sink_window", num_sinks=2, window=14)  # 16 slots: 4 a device


def test_sharded_sink_cache_decoding_equals_single_device():
    """A sink + window cache sharded over context: the window's StreamingLLM positions, taken
    from the queries (no collective), give the single-device logits after the window wraps."""
    mesh = make_mesh(dict(data=2, context=4))
    got, _ = decode_logits(RING, SINK, mesh)
    want, _ = decode_logits(CFG, SINK)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert_close_where_decoded(got, want)


@pytest.mark.parametrize("spec", [gen.CacheSpec("full", max_len=T), SINK], ids=["full", "sink"])
def test_sharded_decode_step_is_one_collective_per_layer(helpers, spec):
    """The whole model's compiled decode step on a (data 2, context 4) mesh: one all-gather per
    layer, of the partial (out, lse) of the row's one query [4 devices, B / 2, 1, H, D + 1],
    and no other collective (the step's activations stay replicated over context)."""
    mesh = make_mesh(dict(data=2, context=4))
    _, step = stepper(RING, mesh)
    caches = gen.init_caches(RING, spec, B, mesh)
    tok, pos = tokens()[:, :1], np.full((B, 1), 3, np.int32)
    hlo = step.lower(params(), tok, pos, caches).compile().as_text()
    h, d = RING.num_heads, RING.head_dim
    merge = ("all-gather", {(4, B // 2, 1, h, d + 1)})
    assert helpers.collectives(hlo) == [merge] * RING.num_layers


@pytest.mark.parametrize("num_sinks", [0, 2])
def test_sink_cache_equals_recomputation_on_kept_tokens(num_sinks):
    """One layer (so cached K/V do not depend on what earlier tokens saw): decoding through a
    sink + window cache gives, at every step, the logits of the full forward pass on the tokens
    the cache keeps (sinks, then the last window), at positions 0.. in that order (StreamingLLM);
    window-only (num_sinks 0) likewise on the last window."""
    cfg = dataclasses.replace(CFG, num_layers=1)
    w = 6
    kind = "sink_window" if num_sinks else "window"
    spec = gen.CacheSpec(kind, num_sinks=num_sinks, window=w)
    tok = tokens(1)
    got, _ = decode_logits(cfg, spec, prompt_lens=(4, 4), tok=tok)
    for t in range(num_sinks + w, T):
        kept = np.concatenate([tok[:, :num_sinks], tok[:, t - w + 1 : t + 1]], axis=1)
        want = full_logits(kept, cfg)[:, -1]
        np.testing.assert_allclose(got[:, t], want, atol=2e-5 * np.abs(want).max(), err_msg=t)


def test_int8_cache_logits_error_is_bounded():
    """int8 K/V (per token and head scales): logits within 2% of their range of the float cache's
    (measured: about 0.5%), and the argmax (greedy token) mostly unchanged."""
    want, _ = decode_logits(CFG, gen.CacheSpec("full", max_len=T))
    got, _ = decode_logits(CFG, gen.CacheSpec("full", max_len=T, quantize=True))
    seen = ~np.isnan(want)
    err = np.abs(got - want)[seen].max() / np.abs(want[seen]).max()
    assert 0 < err < 2e-2, err
    agree = np.argmax(got, -1) == np.argmax(want, -1)
    assert agree[seen[..., 0]].mean() >= 0.9


def test_generate_greedy_is_argmax_of_the_forward_pass():
    tok = tokens(2)
    model = gen.decoding_model(CFG)
    caches = gen.init_caches(CFG, gen.CacheSpec("full", max_len=T), B)
    batch = gen.prompt_batch([tok[0, :PROMPT], tok[1, : PROMPT - 2]])
    out = gen.generate(model, params(), batch, caches, 6)
    assert out["tokens"].shape == (B, 6) and out["tokens_per_s"] > 0
    for i, n in enumerate(batch["lengths"]):
        seq = np.concatenate([tok[i, :n], out["tokens"][i]])[None]
        seq = np.pad(seq, ((0, 1), (0, T - seq.shape[1])), constant_values=1)
        np.testing.assert_array_equal(
            np.argmax(full_logits(seq)[0, n - 1 : n + 5], -1), out["tokens"][i]
        )


def test_sample_temperature_and_top_k():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 64)), jnp.float32)
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    keys = jax.random.split(jax.random.key(0), 50)
    draws = np.asarray(jax.vmap(lambda r: gen.sample(logits, r, temperature=1.0, top_k=3))(keys)).T
    assert all(set(d) <= set(t) for d, t in zip(draws, top3, strict=True))
    assert len(set(draws.ravel())) > 4  # not always the argmax
    greedy = gen.sample(logits, jax.random.key(0), temperature=1.0, top_k=1)
    np.testing.assert_array_equal(greedy, np.argmax(logits, -1))
    np.testing.assert_array_equal(gen.sample(logits, None), np.argmax(logits, -1))


def test_decoding_rejects_scanned_model_and_wrong_cache_count():
    tok = tokens()[:, :4]
    pos = np.broadcast_to(np.arange(4, dtype=np.int32), tok.shape)
    caches = gen.init_caches(CFG, gen.CacheSpec("full", max_len=8), B)
    scanned = Transformer(dataclasses.replace(CFG, scan_layers=True))
    scanned_params = jax.eval_shape(scanned.init, jax.random.key(0), tok, pos, pos + 1)
    with pytest.raises(ValueError, match="scan_layers=False"):
        jax.eval_shape(
            lambda p: scanned.apply(p, tok, pos, caches, method=Transformer.decode), scanned_params
        )
    with pytest.raises(ValueError, match="one cache per layer \\(2\\), got 1"):
        Transformer(CFG).apply({"params": params()}, tok, pos, caches[:1], method="decode")
    mesh = make_mesh(dict(context=4), jax.devices()[:4])
    with pytest.raises(ValueError, match="multiple of the 4 shards"):
        gen.init_caches(RING, gen.CacheSpec("window", window=6), B, mesh)


def test_prompt_padding_follows_the_layout():
    one = make_mesh(dict(context=1), jax.devices()[:1])
    assert gen.pad_multiple(RING, one) == 2  # zigzag over 1 shard: 2 chunks
    assert gen.pad_multiple(RING, make_mesh(dict(context=4), jax.devices()[:4])) == 8
    assert gen.pad_multiple(CFG, None) == 1
    batch = gen.prompt_batch([np.arange(1, 6), np.arange(1, 3)], 4)
    np.testing.assert_array_equal(
        batch["positions"], [[0, 1, 2, 3, 4, -1, -1, -1], [0, 1] + [-1] * 6]
    )
    np.testing.assert_array_equal(batch["lengths"], [5, 2])


def test_until_eos():
    np.testing.assert_array_equal(gen.until_eos(np.array([[5, 2, 7, 2]]), 2), [5])
    np.testing.assert_array_equal(gen.until_eos([5, 7], 2), [5, 7])
    np.testing.assert_array_equal(gen.until_eos([5, 2], None), [5, 2])
