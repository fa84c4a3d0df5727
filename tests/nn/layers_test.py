"""AttentionConfig.kernel reaches every attention the model computes with the configured
implementation (blockwise; context-parallel on a mesh; a prompt chunk against a cache): traced,
with the kernel dispatch recording what each call asks for."""

import dataclasses

import jax
import numpy as np
import pytest

from ringattn.attention.kernels import dispatch
from ringattn.decode.cache import init_cache
from ringattn.mesh import make_mesh
from ringattn.nn.config import AttentionConfig, ModelConfig
from ringattn.nn.model import Transformer

CFG = ModelConfig(vocab_size=64, num_layers=1, d_model=32, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64)  # fmt: skip
B, T = 2, 16


@pytest.fixture
def asked(monkeypatch):
    """The `kernel` of every call the dispatch resolves."""
    kernels, resolve = [], dispatch.resolve

    def spy(fn, opts, *args, **kwargs):
        kernels.append(opts.kernel)
        return resolve(fn, opts, *args, **kwargs)

    monkeypatch.setattr(dispatch, "resolve", spy)
    return kernels


def _trace(impl, method=None, **kw):
    cfg = dataclasses.replace(CFG, attention=AttentionConfig(impl=impl, kernel="xla", **kw))
    model = Transformer(cfg, make_mesh(dict(data=2, context=4)) if impl == "ring" else None)
    tokens = np.ones((B, T), np.int32)
    pos, seg = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)), np.ones((B, T), np.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens, pos, seg)
    if method is None:
        return jax.eval_shape(model.apply, params, tokens, pos, seg)
    caches = [init_cache("full", B, 2 * T, 2, 8) for _ in range(CFG.num_layers)]
    return jax.eval_shape(
        lambda p: model.apply(p, tokens, pos, seg, caches, None, method=method), params
    )


@pytest.mark.parametrize("impl", ["blockwise", "ring"])
def test_the_configured_kernel_reaches_attention(asked, impl):
    _trace(impl)
    assert asked and set(asked) == {"xla"}


def test_the_configured_kernel_reaches_a_prompt_chunk(asked):
    _trace("blockwise", method="prefill")  # cache_bound None: a chunk against the cache
    assert asked and set(asked) == {"xla"}


def test_a_bad_kernel_is_refused():
    with pytest.raises(ValueError, match=r"`kernel` must be one of \('auto', 'xla', .*got 'flash'"):
        AttentionConfig(kernel="flash")
