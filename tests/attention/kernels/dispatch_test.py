"""kernel=: names to kernel objects by platform and dtype, errors that name what would work,
and the default keeping the XLA kernel on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ringattn
from ringattn.attention.kernels import cudnn, dispatch
from ringattn.attention.kernels.cudnn import Cudnn
from ringattn.attention.kernels.pallas_gpu import PallasGpu
from ringattn.attention.kernels.splash import PallasTpu

F32, BF16 = jnp.float32, jnp.bfloat16


def _resolve(kernel, dtype=F32, head_dim=64, tile_callback=None):
    return dispatch.resolve("fn", kernel, dtype, head_dim, 256, 256, tile_callback)


def test_cpu_defaults_to_xla():
    assert dispatch.platform() == "cpu"
    assert _resolve("auto") is None and _resolve("xla") is None


def test_named_kernels_on_cpu_are_interpreted():
    with pytest.warns(RuntimeWarning, match="Pallas interpreter"):
        dispatch.warn_once.cache_clear()
        kern = _resolve("pallas_gpu", BF16)
    assert kern == PallasGpu(interpret=True)  # fitted tiles: the defaults fit 256 tokens
    assert dispatch.interpreted("pallas_gpu", "cpu") and not dispatch.interpreted("xla", "cpu")
    assert dispatch.interpreted(Cudnn(fallback=PallasGpu(interpret=True)), "gpu")
    assert not dispatch.interpreted(PallasGpu(), "gpu")
    assert dispatch.needs_vma_off("auto", "tpu") and not dispatch.needs_vma_off("auto", "gpu")
    with pytest.warns(RuntimeWarning, match="TPU interpreter"):
        assert _resolve("pallas_tpu", F32) == PallasTpu(interpret=True)


@pytest.mark.parametrize(
    "kernel, dtype, pattern",
    [
        ("cudnn", BF16, r"needs a CUDA GPU .*'xla', 'pallas_gpu'"),
        ("pallas_tpu", jnp.float16, "float32/bfloat16"),
        ("flash", F32, "`kernel` must be one of"),
    ],
)
def test_unsupported_combinations_name_alternatives(kernel, dtype, pattern):
    with pytest.raises(ValueError, match=pattern):
        _resolve(kernel, dtype)


def test_tile_callback_is_xla_only():
    assert _resolve("auto", tile_callback=print) is None
    with pytest.raises(ValueError, match="tile_callback"):
        _resolve(PallasGpu(interpret=True), tile_callback=print)


def test_gpu_rules(monkeypatch):
    """On a (pretend) CUDA platform: cuDNN for half precision, Pallas for f32, XLA for f64; a
    missing cuDNN API falls back to Pallas with a warning, once."""
    monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
    monkeypatch.setattr(cudnn, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cudnn, "max_head_dim", lambda: 128)
    assert _resolve("auto", BF16) == Cudnn()
    assert _resolve("auto", F32) == PallasGpu()
    assert _resolve("auto", jnp.float64) is None
    assert _resolve("auto", BF16, head_dim=100) == PallasGpu()
    with pytest.raises(ValueError, match="bfloat16/float16"):
        _resolve("cudnn", F32)
    monkeypatch.setattr(cudnn, "unavailable_reason", lambda: "JAX changed")
    dispatch.warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="JAX changed"):
        assert _resolve("cudnn", BF16) == PallasGpu()
    assert _resolve("auto", BF16) == PallasGpu()


def test_cudnn_unavailable_without_gpu():
    assert "GPU" in cudnn.unavailable_reason()


def test_fit_shrinks_tiles_to_short_shards():
    kern = _resolve(Cudnn(fallback=PallasGpu(interpret=True)))
    assert kern.fallback.block_q == 128 and kern.pad_q == 128
    kern = dispatch.resolve("fn", Cudnn(), BF16, 64, 20, 40)
    assert (kern.pad_q, kern.pad_k) == (32, 64)


def test_blockwise_rejects_bad_kernel():
    x = np.zeros((1, 8, 2, 4), np.float32)
    with pytest.raises(ValueError, match="`kernel` must be one of"):
        jax.eval_shape(lambda x: ringattn.blockwise_attention(x, x, x, kernel="fast"), x)
