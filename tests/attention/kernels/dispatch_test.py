"""kernel=: names to kernel objects by platform and dtype, errors that name what would work,
the default keeping the XLA kernel on CPU, and the fallback chain when a kernel fails its probe
(failures injected on CPU: our Pallas kernel compiled for a GPU, a cuDNN stand-in with a wrong
lse)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ringattn
from ringattn.attention import inputs
from ringattn.attention.kernels import cudnn, dispatch, probe
from ringattn.attention.kernels.cudnn import Cudnn
from ringattn.attention.kernels.pallas_gpu import PallasGpu
from ringattn.attention.kernels.splash import PallasTpu
from ringattn.attention.kernels.xla import Xla
from ringattn.attention.masks import MaskSpec

F32, BF16 = jnp.float32, jnp.bfloat16


def _resolve(kernel, dtype=F32, head_dim=64, tile_callback=None, q_len=256, kv_len=256, cap=None):
    opts = inputs.Options(MaskSpec(), 1.0, cap, kernel=kernel, tile_callback=tile_callback)
    return dispatch.resolve("fn", opts, dtype, head_dim, head_dim, q_len, kv_len)


def test_cpu_defaults_to_xla():
    assert dispatch.platform() == "cpu"
    assert _resolve("auto") == Xla() and _resolve("xla") == Xla()


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
    assert _resolve("auto", tile_callback=print) == Xla()
    with pytest.raises(ValueError, match="tile_callback"):
        _resolve(PallasGpu(interpret=True), tile_callback=print)


def test_gpu_rules(monkeypatch):
    """On a (pretend) CUDA platform whose kernels all pass their probes: cuDNN for half
    precision, Pallas for f32 and for what cuDNN cannot express (a soft cap), XLA for f64; a
    missing cuDNN API falls back to Pallas with a warning, once."""
    monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
    monkeypatch.setattr(cudnn, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cudnn, "max_head_dim", lambda: 128)
    monkeypatch.setattr(probe, "failure", lambda *a: None)
    assert _resolve("auto", BF16) == Cudnn()
    assert _resolve("auto", F32) == PallasGpu()
    assert _resolve("auto", jnp.float64) == Xla(block=1024)  # the GPU's default tiles
    assert _resolve("auto", BF16, head_dim=100) == PallasGpu()
    assert _resolve("auto", BF16, cap=30.0) == PallasGpu()
    with pytest.raises(ValueError, match="soft cap"):
        _resolve("cudnn", BF16, cap=30.0)
    with pytest.raises(ValueError, match="bfloat16/float16"):
        _resolve("cudnn", F32)
    monkeypatch.setattr(cudnn, "unavailable_reason", lambda: "JAX changed")
    dispatch.warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="JAX changed"):
        assert _resolve("cudnn", BF16) == PallasGpu()
    assert _resolve("auto", BF16) == PallasGpu()


def test_fit_shrinks_tiles_to_short_shards():
    kern = _resolve(Cudnn(fallback=PallasGpu(interpret=True)))
    assert kern.fallback.block_q == 128 and kern.pad_q == 128
    kern = _resolve(Cudnn(fallback=PallasGpu(interpret=True)), BF16, q_len=20, kv_len=40)
    assert (kern.fallback.pad_q, kern.fallback.pad_k) == (32, 64)
    assert (kern.pad_q, kern.pad_k) == (64, 64)  # cuDNN pads q and k/v alike


def test_cudnn_unavailable_without_gpu():
    assert "GPU" in cudnn.unavailable_reason()


def test_a_cudnn_object_gets_the_checks_its_name_gets(monkeypatch):
    """A Cudnn() object with float32 inputs is refused like kernel='cudnn' (it used to reach
    cuDNN and fail at trace time)."""
    monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
    monkeypatch.setattr(cudnn, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cudnn, "max_head_dim", lambda: 128)
    with pytest.raises(ValueError, match="bfloat16/float16"):
        _resolve(Cudnn(), F32)
    with pytest.raises(ValueError, match="soft cap"):
        _resolve(Cudnn(), BF16, cap=10.0)


def test_blockwise_rejects_bad_kernel():
    x = np.zeros((1, 8, 2, 4), np.float32)
    with pytest.raises(ValueError, match="`kernel` must be one of"):
        jax.eval_shape(lambda x: ringattn.blockwise_attention(x, x, x, kernel="fast"), x)


def _count(records, text):
    return sum(text in str(r.message) for r in records)


def test_auto_skips_a_kernel_that_fails_to_compile(helpers, monkeypatch):
    """On a pretend CUDA platform without cuDNN, 'auto' tries our Pallas kernel, whose Triton
    lowering cannot run on this CPU: the user's jitted function still runs, on the XLA kernel
    (bit for bit), with one warning naming the kernel and what failed, however often it is
    traced."""
    monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
    dispatch.warn_once.cache_clear()
    probe.failure.cache_clear()
    jax.clear_caches()  # compiled programs hold earlier kernel choices
    q, k, v, _, _ = helpers.random_inputs(np.random.default_rng(0), 1, 64, 64, 2, 1, 16)
    user = lambda q, k, v, bq: ringattn.blockwise_attention(q, k, v, causal=True, block_q=bq)  # noqa: E731
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        got = [jax.jit(user, static_argnums=3)(q, k, v, bq) for bq in (16, 32)]  # 2 traces
    assert _count(records, "kernel 'pallas_gpu' failed its check") == 1, records
    want = ringattn.blockwise_attention(q, k, v, causal=True, block_q=16, kernel="xla")
    np.testing.assert_array_equal(got[0], want)


def test_a_named_kernel_that_fails_raises(helpers):
    """A kernel asked for explicitly (here our Pallas kernel compiled for a GPU, on this CPU)
    that fails its probe raises, naming the cause and the kernels that would work."""
    probe.failure.cache_clear()
    with pytest.raises(
        ValueError, match=r"(?s)failed its check .*Kernels that would work: \['xla'"
    ):
        _resolve(PallasGpu())
