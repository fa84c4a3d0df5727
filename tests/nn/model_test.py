"""The LM with context-parallel attention equals the LM with dense attention, logits and
parameter gradients, on the same parameters; causality through gradients; config checks."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import ringattn
from ringattn.mesh import make_mesh
from ringattn.nn.config import AttentionConfig, ModelConfig
from ringattn.nn.model import Transformer
from ringattn.run.params import convert_layers

B, T = 2, 32
CFG = ModelConfig(
    vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
    mlp_dim=64, mlp_chunk_size=8, attention=AttentionConfig(impl="dense"),
)  # fmt: skip


def inputs(seed=0):
    """Two packed documents per row, positions restarting in each."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)
    cut = np.array([11, 20])
    idx = np.arange(T)[None]
    seg = np.where(idx < cut[:, None], 1, 2).astype(np.int32)
    pos = np.where(idx < cut[:, None], idx, idx - cut[:, None]).astype(np.int32)
    w = rng.normal(size=(B, T, CFG.vocab_size)).astype(np.float32)  # a loss over all logits
    return tokens, pos, seg, w


# Gemma 2 / gpt-oss / MLA-style: soft cap, learned sinks, a v head dim of its own, and local
# layers (5 keys to a query's left: 6 tokens seen) alternating with global ones.
VARIANTS = dict(logits_soft_cap=4.0, sinks=True, local_window_size=5, global_every=2)


def config(variants=False, **attention):
    a = dict(VARIANTS if variants else {}, **attention)
    cfg = dataclasses.replace(CFG, attention=AttentionConfig(**a))
    return dataclasses.replace(cfg, v_head_dim=12, num_layers=4) if variants else cfg


@functools.cache
def params(variants=False):
    tokens, pos, seg, _ = inputs()
    model = Transformer(config(variants, impl="dense"))
    p = nn.unbox(model.init(jax.random.key(1), tokens, pos, seg))["params"]
    if variants:  # sinks start at 0: make them matter
        p = jax.tree_util.tree_map_with_path(
            lambda path, x: x + 0.7 if "sinks" in jax.tree_util.keystr(path) else x, p
        )
    return p


def _stacked(p, cfg):
    """The same parameters stacked along a leading layer axis (groups of `global_every`)."""
    return convert_layers(p, dataclasses.replace(cfg, scan_layers=False), cfg)


def _unstacked(grads, cfg):
    return convert_layers(grads, cfg, dataclasses.replace(cfg, scan_layers=False))


@functools.cache
def logits_and_grads(impl, layout, scan=False, remat="none", variants=False):
    """Logits and parameter gradients in natural token order."""
    mesh = make_mesh(dict(data=2, context=4))
    cfg = dataclasses.replace(
        config(variants, impl=impl, layout=layout, block_q=4, block_k=4),
        scan_layers=scan,
        remat=remat,
    )
    model = Transformer(cfg, None if impl == "dense" else mesh)
    p = params(variants)
    if scan:
        p = _stacked(p, cfg)
    to = lambda x: np.asarray(ringattn.to_layout(x, layout, 4))  # noqa: E731
    tokens, pos, seg, w = (to(x) for x in inputs())

    @jax.jit
    def run(p):
        def loss(p):
            logits = model.apply({"params": p}, tokens, pos, seg)
            return jnp.sum(logits * w), logits

        return jax.grad(loss, has_aux=True)(p)

    grads, logits = run(p)
    if scan:
        grads = _unstacked(grads, cfg)
    return np.asarray(ringattn.from_layout(logits, layout, 4)), grads


def assert_same(got, want, rtol=2e-4, atol=2e-5):
    np.testing.assert_allclose(got[0], want[0], rtol=rtol, atol=atol)
    for path, g in jax.tree_util.tree_leaves_with_path(got[1]):
        w = functools.reduce(lambda t, k: t[k.key], path, want[1])
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("layout", ringattn.LAYOUTS)
def test_ring_model_equals_dense(layout):
    assert_same(logits_and_grads("ring", layout), logits_and_grads("dense", "contiguous"))


@pytest.mark.parametrize("impl", ["allgather", "ulysses", "blockwise"])
def test_other_strategies_equal_dense(impl):
    layout = "contiguous" if impl == "blockwise" else "zigzag"
    assert_same(logits_and_grads(impl, layout), logits_and_grads("dense", "contiguous"))


def test_scan_and_remat_equal_the_loop():
    assert_same(
        logits_and_grads("ring", "zigzag", scan=True, remat="full"),
        logits_and_grads("dense", "contiguous"),
    )


@pytest.mark.parametrize(
    "impl, layout, scan", [("ring", "zigzag", False), ("ulysses", "striped", True)]
)
def test_variant_model_equals_dense(impl, layout, scan):
    """Soft cap, learned sinks (their gradients too), v head dim 12 and alternating local and
    global layers: the context-parallel model equals the dense one (scanned in groups too)."""
    got = logits_and_grads(impl, layout, scan=scan, variants=True)
    want = logits_and_grads("dense", "contiguous", variants=True)
    assert "sinks" in want[1]["layer_0"]["attn"]
    assert want[1]["layer_0"]["attn"]["value"].shape == (32, 2, 12)
    assert_same(got, want)


def _sensitivity(cfg):
    """jit((x, t) -> |d logits[:, t] / d x| summed over the embedding [B, T]) of the model of
    `cfg` on the (data 2, context 4) mesh, with the shared parameters."""
    model = Transformer(cfg, make_mesh(dict(data=2, context=4)))
    tokens, pos, seg, _ = inputs()
    p = {"params": params()}

    @jax.jit
    def sensitivity(x, t):
        f = lambda x: jnp.sum(  # noqa: E731
            model.apply(p, x, pos, seg, method=Transformer.from_embeddings)[:, t] ** 2
        )
        return jnp.abs(jax.grad(f)(x)).sum(-1)

    x = model.apply(p, tokens, method=Transformer.embed)
    return lambda t: sensitivity(x, t)


def test_local_layers_see_only_their_window():
    """Layer windows follow the pattern (local, global, local, global), and a model of local
    layers only (5 keys back, two of them: a reach of 10 tokens back) on the ring: d logits[t] /
    d x[s] is nonzero exactly for t - 10 <= s <= t within t's document."""
    assert [config(True).layer_window(i) for i in range(4)] == [5, None, 5, None]
    sensitivity = _sensitivity(config(impl="ring", block_q=4, block_k=4, local_window_size=5))
    seg = inputs()[2]
    for t in (9, 25, T - 1):
        s = np.asarray(sensitivity(t))
        near = (np.arange(T)[None] <= t) & (np.arange(T)[None] >= t - 10)
        visible = (seg == seg[:, t : t + 1]) & near
        assert np.all(s[~visible] == 0), t
        assert np.all(s[visible] > 0), t


def test_gradients_are_causal_within_documents():
    """d logits[t] / d x[s] is nonzero exactly for s <= t in t's document (ring, zigzag)."""
    sensitivity = _sensitivity(config(impl="ring", block_q=4, block_k=4))
    seg = inputs()[2]
    for t in (0, 10, 11, 25, T - 1):
        s = np.asarray(sensitivity(t))
        visible = (seg == seg[:, t : t + 1]) & (np.arange(T)[None] <= t)
        assert np.all(s[~visible] == 0), t
        assert np.all(s[visible] > 0), t


def test_bad_config():
    with pytest.raises(ValueError, match="`num_heads` \\(6\\) must be a multiple"):
        ModelConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="`impl` must be one of"):
        AttentionConfig(impl="flash")
    with pytest.raises(ValueError, match="`remat` must be one of"):
        ModelConfig(remat="some")
    with pytest.raises(ValueError, match="needs a mesh"):
        Transformer(dataclasses.replace(CFG, attention=AttentionConfig(impl="ring"))).init(
            jax.random.key(0), *inputs()[:3]
        )
    with pytest.raises(ValueError, match="`mlp_chunk_size` \\(7\\) must divide"):
        Transformer(dataclasses.replace(CFG, mlp_chunk_size=7)).init(
            jax.random.key(0), *inputs()[:3]
        )


def test_hidden_and_head_are_the_logits():
    """The head API: `hidden` (final-normed states) through `head` is `__call__`; `head_weights`
    is the untied matrix, or the tied embedding transposed (scaled, or not: Hugging Face's)."""
    tokens, pos, seg, _ = inputs()
    for tied, scaled in ((False, True), (True, True), (True, False)):
        cfg = dataclasses.replace(CFG, tie_embeddings=tied, scale_tied_logits=scaled)
        model = Transformer(cfg)
        p = {"params": nn.unbox(model.init(jax.random.key(1), tokens, pos, seg))["params"]}
        h = model.apply(p, tokens, pos, seg, method=Transformer.hidden)
        assert h.shape == (B, T, CFG.d_model)
        logits = model.apply(p, h, method=Transformer.head)
        np.testing.assert_array_equal(logits, model.apply(p, tokens, pos, seg))
        w = np.asarray(model.apply(p, method=Transformer.head_weights))
        want = p["params"]["embedding"].T if tied else p["params"]["unembedding"]
        np.testing.assert_allclose(w, want / (np.sqrt(CFG.d_model) if tied and scaled else 1))
        np.testing.assert_allclose(logits, np.asarray(h) @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mesh", [False, True])
def test_prefill_logits_of_chosen_tokens(mesh):
    """Prefill with `logits_index` gives the logits of those tokens only ([B, k, V]): those of
    the full prefill, on one device and with the prompt sharded over a ring of 4 (zigzag)."""
    from ringattn.evals import generate as gen

    tokens, pos, seg, _ = inputs()
    impl = "ring" if mesh else "dense"
    cfg = config(impl=impl, layout="zigzag", block_q=4, block_k=4)
    mesh = make_mesh(dict(context=4), jax.devices()[:4]) if mesh else None
    model = gen.decoding_model(cfg, mesh)
    to = lambda x: ringattn.to_layout(x, "zigzag", 4) if mesh else x  # noqa: E731
    tokens, pos, seg = to(tokens), to(pos), to(seg)
    index = np.array([[5, 0, 31], [17, 17, 2]], np.int32)

    @functools.partial(jax.jit, static_argnums=2)
    def run(p, index, chosen):
        caches = gen.init_caches(cfg, gen.CacheSpec("full", max_len=T), B, mesh)
        args = (tokens, pos, seg, caches, 0) + ((index,) if chosen else ())
        logits, _ = model.apply({"params": p}, *args, method=Transformer.prefill)
        return logits

    full = np.asarray(run(params(), index, False))
    got = np.asarray(run(params(), index, True))
    assert full.shape == (B, T, CFG.vocab_size) and got.shape == (B, 3, CFG.vocab_size)
    np.testing.assert_allclose(got, np.take_along_axis(full, index[..., None], 1), rtol=1e-6)
    with pytest.raises(ValueError, match="`logits_index`|logits_index: must be"):
        run(params(), index[0], True)


def test_scanned_remat_keeps_block_inputs_as_bits():
    """Scanned bfloat16 layers under remat "full": the compiled backward slices the saved layer
    inputs from a uint16 stack [layers, B, T, E] and holds no float32 one (XLA's CPU compiler
    made a float32 copy of a bfloat16 stack: ringattn/nn/remat.py); the gradients equal those
    of the same layers without remat."""
    cfg = dataclasses.replace(CFG, scan_layers=True, dtype="bfloat16")
    tokens, pos, seg, w = inputs()
    p = _stacked(params(), cfg)

    def grads(remat):
        model = Transformer(dataclasses.replace(cfg, remat=remat))
        loss = lambda p: jnp.sum(model.apply({"params": p}, tokens, pos, seg) * w)  # noqa: E731
        return jax.jit(jax.grad(loss)).lower(p).compile()

    compiled = grads("full")
    stack = f"[{cfg.num_layers},{B},{T},{CFG.d_model}]"
    assert f"u16{stack}" in compiled.as_text()
    assert f"f32{stack}" not in compiled.as_text()
    got, want = compiled(p), grads("none")(p)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)
