"""Every pass of every fused kernel lowered for its hardware on this CPU (probe.lower): our
Pallas kernel and the cuDNN path for CUDA (Triton and cuDNN custom calls), splash attention for
TPU (Mosaic calls), on every mask kind, the variants, head dims, dtypes and tiles; and the kernel
choice under ringattn.target_platform (no probe, the target's chain).

Lowering runs each kernel's whole Pallas lowering (Triton IR, Mosaic), so the compile-time
constraints (block shapes, alignment, dtypes) are checked here; what only the hardware compiler
or a run would find (Triton's or Mosaic's own compile, speed) is not. The cuDNN cases need the
`cudnn_stand_in` fixture (conftest): JAX reads the local cuDNN version while tracing.
"""

import collections
import itertools

import jax
import jax.numpy as jnp
import pytest

import ringattn
from ringattn.attention import inputs
from ringattn.attention.kernels import dispatch, probe
from ringattn.attention.kernels.cudnn import Cudnn
from ringattn.attention.kernels.pallas_gpu import PallasGpu
from ringattn.attention.kernels.splash import PallasTpu
from ringattn.attention.kernels.xla import Xla
from ringattn.attention.masks import MaskSpec
from ringattn.attention.target import Call, custom_calls

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
TRITON, MOSAIC = "__gpu$xla.gpu.triton", "tpu_custom_call"
CUDNN_FWD, CUDNN_BWD = "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"
MASKS = probe.MASK_KINDS
# The passes probe.lower traces: the forward fresh (twice: the whole keys, then their first
# half) and continuing a state (in place), dK/dV and dQ fresh and continuing gradients.
PALLAS_PASSES = collections.Counter(
    {
        Call(TRITON, "ringattn_fwd", False): 2,
        Call(TRITON, "ringattn_fwd", True): 1,
        Call(TRITON, "ringattn_dkv", False): 1,
        Call(TRITON, "ringattn_dkv", True): 1,
        Call(TRITON, "ringattn_dq", False): 1,
        Call(TRITON, "ringattn_dq", True): 1,
    }
)
# The cuDNN path's fallback: its fresh backward is a pass continuing zeros (Kernel.attend_bwd).
FALLBACK_PASSES = collections.Counter(
    {
        Call(TRITON, "ringattn_fwd", False): 2,
        Call(TRITON, "ringattn_fwd", True): 1,
        Call(TRITON, "ringattn_dkv", True): 2,
        Call(TRITON, "ringattn_dq", True): 2,
    }
)


def _case(kern, mask="causal", dtype=BF16, d=128, dv=None, t=None):
    name = f"{mask}-{jnp.dtype(dtype).name}-d{d}" + (f"-dv{dv}" if dv else "")
    return pytest.param(kern, MASKS[mask], dtype, d, dv or d, t, id=name + (f"-t{t}" if t else ""))


def _matrix(kern, dims, dtypes):
    """Every head dim with every dtype (causal), then every mask kind (bf16, D = 128)."""
    cases = [_case(kern, "causal", dtype, d) for d, dtype in itertools.product(dims, dtypes)]
    return cases + [_case(kern, m) for m in MASKS if m != "causal"]


def _lower(kern, kind, dtype, d, dv, t, platform):
    return custom_calls(probe.lower(kern, dtype, d, dv, kind, platform, t))


def _kernels(calls, target):
    return {c.kernel for c in calls if c.target == target}


# -- Our Pallas kernel (Triton) ----------------------------------------------------------------

PALLAS = PallasGpu()
SMALL_TILES = PallasGpu(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=64, num_warps=2)


@pytest.mark.parametrize(
    "kern, kind, dtype, d, dv, t",
    _matrix(PALLAS, (64, 128, 256), (BF16, F16, F32))
    + [
        _case(PALLAS, "causal", BF16, 128, dv=64),  # v's own head dim
        _case(PALLAS, "segments", F16, 80, t=200),  # head dim and length padded
        _case(SMALL_TILES, "window", BF16, 64, t=96),  # other tiles, 16 the least
    ],
)
def test_pallas_passes_lower_to_triton(kern, kind, dtype, d, dv, t):
    assert _lower(kern, kind, dtype, d, dv, t, "cuda") == PALLAS_PASSES


# -- The cuDNN path: cuDNN for unmasked and causal-diagonal steps, our Pallas for the others ---


@pytest.mark.usefixtures("cudnn_stand_in")
@pytest.mark.parametrize(
    "kern, kind, dtype, d, dv, t",
    [
        _case(Cudnn(), m, dtype, d)
        for m, dtype, d in (
            ("none", BF16, 128),
            ("causal", BF16, 64),
            ("causal", F16, 128),
            ("window", F16, 64),
            ("segments", BF16, 128),
        )
    ]
    + [_case(Cudnn(), "causal", BF16, 128, t=200)],  # padded: cuDNN's own padding masks
)
def test_cudnn_passes_lower_to_cudnn_and_triton(kern, kind, dtype, d, dv, t):
    calls = _lower(kern, kind, dtype, d, dv, t, "cuda")
    library = {c for c in calls if c.target != TRITON}
    assert {c.target for c in library} == {CUDNN_FWD, CUDNN_BWD}, calls
    # Every step the switch cannot give cuDNN runs our Pallas kernel, in every pass.
    assert calls - collections.Counter({c: calls[c] for c in library}) == FALLBACK_PASSES


# -- Splash attention (Mosaic) -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kern, kind, dtype, d, dv, t",
    [
        _case(PallasTpu(), m, dtype, d)
        for m, dtype, d in (("causal", BF16, 64), ("causal", BF16, 256), ("causal", F32, 128))
    ]
    + [_case(PallasTpu(), m) for m in ("none", "causal", "window", "segments")]
    + [
        _case(PallasTpu(), "window", F32, 64, t=200),  # padded to whole 128-key tiles
        _case(PallasTpu(block_q=256, block_k=512), "causal", BF16, 128, t=1024),
    ],
)
def test_splash_passes_lower_to_mosaic(kern, kind, dtype, d, dv, t):
    calls = _lower(kern, kind, dtype, d, dv, t, "tpu")
    seg = "segmented_" if kind.segments else ""
    want = {f"splash_mqa_fwd_{seg}residuals", f"splash_mqa_dkv_{seg}no_residuals"}
    assert _kernels(calls, MOSAIC) == want | {f"splash_mqa_dq_{seg}no_residuals"}
    assert {c.target for c in calls} == {MOSAIC}


# -- The kernel choice for a target platform -----------------------------------------------------


def _resolve(kernel="auto", dtype=BF16, d=128, dv=None, cap=None, length=512):
    opts = inputs.Options(MaskSpec(causal=True), d**-0.5, cap, kernel=kernel)
    return dispatch.resolve("fn", opts, dtype, d, dv or d, length, length)


@pytest.fixture
def no_probe(monkeypatch):
    """The probe cannot run another platform's programs: calling it is a failure."""

    def probe_called(*args):
        raise AssertionError(f"the probe ran while lowering: {args}")

    monkeypatch.setattr(probe, "failure", probe_called)


@pytest.mark.usefixtures("cudnn_stand_in", "no_probe")
@pytest.mark.filterwarnings("error")
def test_auto_for_cuda_takes_the_gpu_chain_without_probing():
    with ringattn.target_platform("cuda"):
        assert dispatch.platform() == "gpu"
        assert _resolve() == Cudnn()
        assert _resolve(dtype=F16, d=64) == Cudnn()
        assert _resolve(dtype=F32) == PallasGpu()
        assert _resolve(d=256) == PallasGpu()  # cuDNN <= 128 without a local Hopper (JAX's rule)
        assert _resolve(cap=30.0) == PallasGpu()
        assert _resolve(dv=64) == PallasGpu()
        assert _resolve(dtype=jnp.float64) == Xla(block=1024)  # the GPU's tiles
        assert _resolve("pallas_gpu", length=100) == PallasGpu().fit(100, 100)  # not interpreted
        assert _resolve("cudnn") == Cudnn()
    assert dispatch.platform() == "cpu"


@pytest.mark.usefixtures("no_probe")
@pytest.mark.filterwarnings("error")
def test_auto_for_tpu_takes_splash_where_it_can():
    with ringattn.target_platform("tpu"):
        assert _resolve() == PallasTpu() and _resolve(dtype=F32, d=256) == PallasTpu()
        assert _resolve(dtype=F16) == Xla()  # splash takes no float16
        assert _resolve(cap=30.0) == Xla() and _resolve(dv=64) == Xla()
        assert _resolve("pallas_tpu") == PallasTpu()  # not interpreted
        with pytest.raises(ValueError, match="soft cap"):
            _resolve(PallasTpu(), cap=30.0)


def test_without_cudnn_here_auto_for_cuda_says_so():
    """On a machine without JAX's CUDA plugin nothing of cuDNN can be traced: "auto" lowers
    our Pallas kernel for all steps and warns that a GPU would run cuDNN."""
    dispatch.warn_once.cache_clear()
    with ringattn.target_platform("cuda"), pytest.warns(RuntimeWarning, match="cuDNN not detec"):
        assert _resolve() == PallasGpu()


def test_the_probe_still_runs_without_a_target(monkeypatch):
    """Outside target_platform a fused kernel is probed before its first use, as before."""
    seen = []
    monkeypatch.setattr(probe, "failure", lambda *args: seen.append(args) or "broken")
    monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
    dispatch.warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="failed its check"):
        assert _resolve(dtype=F32) == Xla(block=1024)
    assert [args[0] for args in seen] == [PallasGpu()]


# -- kernel="auto" end to end: blockwise_attention lowered for each platform ---------------------


def _fwd_and_grads(q, k, v):
    def loss(q, k, v):
        out = ringattn.blockwise_attention(q, k, v, causal=True)
        return jnp.sum(out.astype(jnp.float32)), out

    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)


@pytest.mark.usefixtures("cudnn_stand_in")
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_blockwise_auto_lowers_the_targets_kernels(helpers, platform):
    q = jax.ShapeDtypeStruct((2, 384, 4, 128), BF16)  # 384: padded to whole tiles
    k = jax.ShapeDtypeStruct((2, 384, 2, 128), BF16)
    calls = helpers.lowered_calls(platform, _fwd_and_grads, q, k, k)
    if platform == "cuda":
        assert _kernels(calls, TRITON) == {"ringattn_fwd", "ringattn_dkv", "ringattn_dq"}
        assert {c.target for c in calls} == {TRITON, CUDNN_FWD, CUDNN_BWD}
    else:
        assert {c.target for c in calls} == {MOSAIC}
        assert len(_kernels(calls, MOSAIC)) == 3
    # The same function traced for this CPU: the XLA kernel, no custom call (a new trace).
    text = jax.jit(_fwd_and_grads).trace(q, k, k).lower().as_text()
    assert not custom_calls(text)
