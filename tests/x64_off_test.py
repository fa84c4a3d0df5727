"""The public API, the model and decoding with float64 off, as users run JAX (RINGATTN_X64=0
runs only these; with x64 on they run too). References are NumPy float64, whatever JAX's mode."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import ringattn
from ringattn.evals import generate as gen
from ringattn.mesh import make_mesh
from ringattn.nn.config import AttentionConfig, ModelConfig
from ringattn.nn.model import Transformer

pytestmark = pytest.mark.x64_off

B, T, H, K, D = 1, 64, 4, 2, 16
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def attention_f64(q, k, v, do):
    """Causal GQA attention and its gradients in NumPy float64 (the math of docs/design.md)."""
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    g = q.shape[2] // k.shape[2]
    kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scale = 1 / np.sqrt(q.shape[-1])
    s = np.einsum("bthd,bshd->bhts", q, kr) * scale
    s = np.where(np.tril(np.ones((q.shape[1], k.shape[1]), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", p, vr)
    dv = np.einsum("bhts,bthd->bshd", p, do)
    dp = np.einsum("bthd,bshd->bhts", do, vr)
    ds = p * (dp - np.einsum("bthd,bthd->bht", do, out)[..., None])
    dq = np.einsum("bhts,bshd->bthd", ds, kr) * scale
    dk = np.einsum("bhts,bthd->bshd", ds, q) * scale
    fold = lambda x: x.reshape(*x.shape[:2], K, g, D).sum(3)  # noqa: E731
    return out, dq, fold(dk), fold(dv)


def data(dtype):
    rng = np.random.default_rng(0)
    x = [rng.standard_normal((B, T, h, D)) for h in (H, K, K, H)]
    return [jnp.asarray(a, dtype) for a in x[:3]], x[3]


def assert_matches_f64(got, want, dtype, names=("out", "dq", "dk", "dv")):
    for name, a, w in zip(names, got, want, strict=True):
        assert a.dtype == dtype, (name, a.dtype)
        err = np.abs(np.asarray(a, np.float64) - w).max() / np.abs(w).max()
        assert err <= TOL[dtype], (name, err)


def grads(f, q, k, v, do):
    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(jnp.asarray(do, out.dtype)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_blockwise(dtype):
    (q, k, v), do = data(dtype)
    f = functools.partial(ringattn.blockwise_attention, causal=True, block_q=16, block_k=16)
    got = jax.jit(functools.partial(grads, f))(q, k, v, do)
    assert_matches_f64(got, attention_f64(q, k, v, do), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_context_parallel_natural_order(dtype):
    """zigzag over 8 devices, arrays in natural order, eager grad (no jit)."""
    (q, k, v), do = data(dtype)
    mesh = jax.make_mesh((8,), ("context",))
    f = functools.partial(
        ringattn.context_parallel_attention, mesh=mesh, causal=True, layout="zigzag",
        input_layout="natural", block_q=4, block_k=4,
    )  # fmt: skip
    assert_matches_f64(grads(f, q, k, v, do), attention_f64(q, k, v, do), dtype)


CFG = ModelConfig(
    vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
    mlp_dim=64, attention=AttentionConfig(impl="dense"),
)  # fmt: skip


@functools.cache
def model_params():
    tok = np.ones((1, 16), np.int32)
    pos = np.arange(16, dtype=np.int32)[None]
    init = jax.jit(Transformer(CFG).init)
    return nn.unbox(init(jax.random.key(1), tok, pos, tok))["params"]


def test_model_ring_equals_dense_and_decoding_equals_the_forward():
    """f32 end to end: the ring model's logits equal the dense model's; prefill (ring, 8 devices,
    sharded cache) then decode steps give the forward pass's next-token logits."""
    params = model_params()
    tok = np.random.default_rng(1).integers(1, 64, (1, 32)).astype(np.int32)
    pos = np.arange(32, dtype=np.int32)[None]
    dense = Transformer(CFG).apply({"params": params}, tok, pos, np.ones_like(tok))
    assert dense.dtype == jnp.float32
    ring_cfg = dataclasses.replace(
        CFG, attention=AttentionConfig(impl="ring", layout="zigzag", block_q=4, block_k=4)
    )
    mesh = make_mesh(dict(context=8))
    perm = ringattn.to_layout(jnp.asarray(tok), "zigzag", 8)
    ppos = ringattn.to_layout(jnp.asarray(pos), "zigzag", 8)
    seg = jnp.ones_like(perm)
    ring = jax.jit(Transformer(ring_cfg, mesh).apply)({"params": params}, perm, ppos, seg)
    ring = ringattn.from_layout(np.asarray(ring), "zigzag", 8)
    scale = np.abs(np.asarray(dense)).max()
    assert np.abs(ring - np.asarray(dense)).max() <= 2e-5 * scale

    model = gen.decoding_model(ring_cfg, mesh)
    caches = gen.init_caches(ring_cfg, gen.CacheSpec("full", max_len=32), 1, mesh)
    pre = jax.jit(functools.partial(gen.prefill, model, cache_bound=0))
    logits, caches = pre(params, gen.prompt_batch([tok[0, :16]], 16), caches)
    step = jax.jit(lambda p, t, q, c: model.apply({"params": p}, t, q, c, method=model.decode))
    got = [np.asarray(logits[0])]
    for t in range(16, 23):
        out, caches = step(params, tok[:, t : t + 1], pos[:, t : t + 1], caches)
        got.append(np.asarray(out[0, 0]))
    want = np.asarray(dense[0, 15:23])
    assert np.abs(np.stack(got) - want).max() <= 2e-5 * scale


def test_generate_on_one_and_eight_devices():
    """Greedy generation with float64 off: the same tokens on 1 device and on 8 with a sharded
    cache; a prompt the caches cannot hold is refused."""
    params = model_params()
    prompts = [np.arange(1, 13, dtype=np.int32), np.arange(5, 14, dtype=np.int32)]
    ring_cfg = dataclasses.replace(
        CFG, attention=AttentionConfig(impl="ring", layout="zigzag", block_q=4, block_k=4)
    )
    outs = []
    for cfg, mesh in ((CFG, None), (ring_cfg, make_mesh(dict(context=8)))):
        model = gen.decoding_model(cfg, mesh)
        batch = gen.prompt_batch(prompts, gen.pad_multiple(cfg, mesh))
        caches = gen.init_caches(cfg, gen.CacheSpec("full", max_len=32), 2, mesh)
        outs.append(np.asarray(gen.generate(model, params, batch, caches, 6)["tokens"]))
        with pytest.raises(ValueError, match="needs 33 cache positions"):
            gen.generate(model, params, batch, caches, 22)
    np.testing.assert_array_equal(outs[0], outs[1])
