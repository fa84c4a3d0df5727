"""The cuDNN path: on CPU, its step logic with cuDNN's two calls replaced by exact stand-ins
(dense math with cuDNN's conventions); on a CUDA GPU, the real thing and compiled Pallas.

The stand-in tests poison the fallback kernel (NaN) where every step should go to cuDNN: a
wrong step classification, merge, scale or dtype conversion then shows as an error or a NaN.
"""

import dataclasses
import warnings
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ringattn
from ringattn.attention.kernels import cudnn, dispatch, fused, probe
from ringattn.attention.kernels.cudnn import Cudnn
from ringattn.attention.kernels.pallas_gpu import PallasGpu

B, T, H, KH, D = 2, 64, 4, 2, 16
BLOCKS16 = dict(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)


def _dense(q, k, v, scale, causal, lengths):
    """Scores [B, H, T, S], the mask cuDNN applies, and the k/v heads repeated to H (the
    stand-ins are tests only). `lengths` (q_len, kv_len): cuDNN's padding masks."""
    g = q.shape[2] // k.shape[2]
    k_, v_ = (jnp.repeat(x.astype(jnp.float32), g, axis=2) for x in (k, v))
    s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k_) * scale
    i, j = jnp.arange(s.shape[-2])[:, None], jnp.arange(s.shape[-1])[None]
    mask = jnp.ones(s.shape[-2:], bool)
    if causal:  # cuDNN's causal mask is on array indices, top-left aligned
        mask &= j <= i
    if lengths is not None:
        mask &= (i < lengths[0]) & (j < lengths[1])
    return jnp.where(mask, s, -jnp.inf), mask, k_, v_, g


def fake_fwd(q, k, v, scale, causal, lengths=None):
    """cuDNN's training forward: out in q's dtype, natural-log lse [B, H, T] f32 (-inf on
    padded rows)."""
    s, mask, _, v_, _ = _dense(q, k, v, scale, causal, lengths)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
    out = jnp.einsum("bhts,bshd->bthd", p, v_)
    return out.astype(q.dtype), lse


def fake_bwd(q, k, v, out, lse, do, scale, causal, lengths=None):
    """cuDNN's backward given residuals: delta from out and do, grads in the input dtypes."""
    s, mask, k_, v_, g = _dense(q, k, v, scale, causal, lengths)
    p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
    do32 = do.astype(jnp.float32)
    delta = jnp.einsum("bthd,bthd->bht", do32, out.astype(jnp.float32))
    ds = p * (jnp.einsum("bthd,bshd->bhts", do32, v_) - delta[..., None])
    dq = jnp.einsum("bhts,bshd->bthd", ds, k_) * scale
    fold = lambda x: x.reshape(*x.shape[:2], -1, g, x.shape[-1]).sum(3)  # noqa: E731
    dk = fold(jnp.einsum("bhts,bthd->bshd", ds, q.astype(jnp.float32)) * scale)
    dv = fold(jnp.einsum("bhts,bthd->bshd", p, do32))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@dataclasses.dataclass(frozen=True)
class Poison(PallasGpu):
    """A fallback that must not run: NaN state and gradients."""

    name: ClassVar[str] = "poison"

    def fwd_pass(self, cfg, q_, k_, v_, qs, ks, state):
        return tuple(x * jnp.nan for x in state)

    def bwd_pass(self, cfg, q_, k_, v_, bwd, qs, ks, grads):
        return tuple(g * jnp.nan for g in grads)


@pytest.fixture
def stand_ins(monkeypatch):
    monkeypatch.setattr(cudnn, "cudnn_fwd", fake_fwd)
    monkeypatch.setattr(cudnn, "cudnn_bwd", fake_bwd)


def _data(helpers, dtype=np.float32, t=T):
    return helpers.random_inputs(np.random.default_rng(0), B, t, t, H, KH, D, dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_steps_cudnn_expresses_run_cudnn(helpers, stand_ins, causal):
    """Unmasked and plain causal attention: every step is cuDNN's (the fallback is poisoned)."""
    q, k, v, do, dlse = _data(helpers)
    dlse = np.zeros_like(dlse)
    kernel = Cudnn(fallback=Poison(interpret=True, **BLOCKS16))
    got = helpers.run_attention(
        ringattn.blockwise_attention, q, k, v, do, dlse, kernel=kernel, causal=causal
    )
    want = helpers.reference_f64(q, k, v, do, dlse, causal=causal)
    helpers.assert_all_close(got, want, np.float32)


@pytest.mark.parametrize("causal", [False, True])
def test_padded_lengths_stay_cudnn_steps(helpers, stand_ins, causal):
    """A length that is not a multiple of the tiles (50 tokens, padded to 64): cuDNN masks the
    padding itself (sequence lengths), so every step is still cuDNN's (fallback poisoned)."""
    q, k, v, do, dlse = _data(helpers, t=50)
    dlse = np.zeros_like(dlse)
    kernel = Cudnn(fallback=Poison(interpret=True, **BLOCKS16))
    assert (kernel.fit(50, 50).pad_q, kernel.fit(50, 50).pad_k) == (16, 16)
    kernel = Cudnn(fallback=Poison(interpret=True, block_q=64, block_k=32))
    got = helpers.run_attention(
        ringattn.blockwise_attention, q, k, v, do, dlse, kernel=kernel, causal=causal
    )
    want = helpers.reference_f64(q, k, v, do, dlse, causal=causal)
    helpers.assert_all_close(got, want, np.float32)


def test_nonzero_dlse_falls_back(helpers, stand_ins):
    """Causal with an lse cotangent: the forward is cuDNN's, the backward the fallback's."""
    q, k, v, do, dlse = _data(helpers)
    kernel = Cudnn(fallback=PallasGpu(interpret=True, **BLOCKS16))
    got = helpers.run_attention(
        ringattn.blockwise_attention, q, k, v, do, dlse, kernel=kernel, causal=True
    )
    helpers.assert_all_close(got, helpers.reference_f64(q, k, v, do, dlse, causal=True), np.float32)


def test_ring_steps_cudnn(helpers, stand_ins):
    """A causal contiguous ring over 4 devices: the diagonal step is cuDNN-causal, the earlier
    shards cuDNN-unmasked, the later ones skipped; the fallback never runs."""
    n = 4
    q, k, v, do, dlse = _data(helpers)
    dlse = np.zeros_like(dlse)
    kernel = Cudnn(fallback=Poison(interpret=True, **BLOCKS16))
    seq = P(None, "ring")

    def local(q, k, v):
        return ringattn.ring_attention(
            q, k, v, axis_name="ring", causal=True, kernel=kernel, return_lse=True
        )

    ring = jax.shard_map(
        local,
        mesh=helpers.ring_mesh(n),
        in_specs=(seq,) * 3,
        out_specs=(seq, P(None, None, "ring")),
        check_vma=False,  # the fallback is a Pallas interpreter kernel
    )

    @jax.jit
    def run(q, k, v, do, dlse):
        (out, lse), vjp = jax.vjp(ring, q, k, v)
        return (out, lse, *vjp((do, dlse)))

    got = run(q, k, v, do, dlse)
    helpers.assert_all_close(got, helpers.reference_f64(q, k, v, do, dlse, causal=True), np.float32)


def test_step_class():
    """The step rule: FULL, the causal diagonal (not with a window, segments or unsorted
    positions) and PARTIAL otherwise."""
    from ringattn.attention.kernels import base
    from ringattn.attention.masks import FULL, PARTIAL, MaskSpec

    def cls(spec, q_pos, kv_pos, seg=None, allow=False):
        cfg = base.Config(spec, 1.0, None, 16, 16, len(kv_pos), jnp.float32, Cudnn())

        @jax.jit
        def run(q_pos, kv_pos, seg):
            side = lambda p: base.make_side(p[None].astype(jnp.int32), seg, 16)  # noqa: E731
            return fused.step_class(cfg, side(q_pos), side(kv_pos), allow)

        return int(run(q_pos, kv_pos, seg))

    pos = np.arange(32)
    assert cls(MaskSpec(causal=True), pos + 32, pos) == FULL
    assert cls(MaskSpec(causal=True), pos, pos) == fused.DIAG
    assert cls(MaskSpec(causal=True, window=(8, 0)), pos, pos) == PARTIAL
    assert cls(MaskSpec(causal=True), pos[::-1], pos[::-1]) == PARTIAL
    seg = jnp.asarray([[0] * 16 + [1] * 16])
    assert cls(MaskSpec(causal=True), pos, pos, seg) == PARTIAL
    assert cls(MaskSpec(causal=True), pos, pos, seg, allow=True) == fused.DIAG


# ---------------------------------------------------------------------------------------------
# The fallback chain on a pretend CUDA platform: our Pallas kernel cannot compile on this CPU,
# cuDNN is a stand-in. A user's jitted function runs whatever fails, and says so once.


@pytest.fixture
def pretend_cuda(monkeypatch):
    monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
    monkeypatch.setattr(cudnn, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cudnn, "max_head_dim", lambda: 128)
    dispatch.warn_once.cache_clear()
    probe.failure.cache_clear()
    jax.clear_caches()  # compiled programs hold earlier kernel choices
    yield
    probe.failure.cache_clear()
    jax.clear_caches()


def _user_fn():
    """A fresh function each time: jit's trace cache would keep an earlier kernel choice."""
    return lambda q, k, v: ringattn.blockwise_attention(q, k, v, causal=True, return_lse=True)


def _warnings(fn, *args):
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        result = fn(*args)
    return result, [str(r.message) for r in records if "failed its check" in str(r.message)]


def test_a_working_cudnn_runs_with_xla_for_the_rest(helpers, stand_ins, pretend_cuda):
    """Pallas fails to compile, so cuDNN runs its steps with the XLA kernel for the others;
    bf16 result against the float64 reference; one warning (Pallas)."""
    q, k, v, _, _ = _data(helpers, jnp.bfloat16)
    (out, lse), failed = _warnings(jax.jit(_user_fn()), q, k, v)
    assert len(failed) == 1 and "'pallas_gpu'" in failed[0], failed
    want, want_lse = ringattn.reference_attention(
        *(jnp.asarray(x, jnp.float64) for x in (q, k, v)), causal=True, return_lse=True
    )
    helpers.assert_close(out, want, 2e-2, "out")
    helpers.assert_close(lse, want_lse, 2e-2, "lse")


def test_a_wrong_cudnn_is_skipped(helpers, stand_ins, pretend_cuda, monkeypatch):
    """A cuDNN that returns a wrong lse fails its check too: the chain ends at the XLA kernel,
    whose result the user gets exactly; each failure is reported once."""
    wrong = lambda *args: (lambda o, lse: (o, lse + 0.5))(*fake_fwd(*args))  # noqa: E731
    monkeypatch.setattr(cudnn, "cudnn_fwd", wrong)
    q, k, v, _, _ = _data(helpers, jnp.bfloat16)
    got, failed = _warnings(jax.jit(_user_fn()), q, k, v)
    assert len(failed) == 2 and "'cudnn'" in failed[1] and "lse" in failed[1], failed
    want = ringattn.blockwise_attention(q, k, v, causal=True, return_lse=True, kernel="xla")
    np.testing.assert_array_equal(got[0], want[0])
    _, again = _warnings(jax.jit(_user_fn()), q, k, v)
    assert again == []


# ---------------------------------------------------------------------------------------------
# On a CUDA GPU only.


def _has_cuda():
    try:
        return any(d.platform == "gpu" for d in jax.devices("gpu"))
    except RuntimeError:
        return False


requires_gpu = pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")


@requires_gpu
@pytest.mark.parametrize("kernel", ["cudnn", "pallas_gpu"])
@pytest.mark.parametrize("static", [dict(), dict(causal=True), dict(local_window_size=(100, 0))])
def test_gpu_kernels_bf16(helpers, kernel, static):
    """Compiled kernels on the GPU, bf16, D = 64, against the float64 reference."""
    if kernel == "cudnn" and cudnn.unavailable_reason() is not None:
        pytest.skip(cudnn.unavailable_reason())
    gpu = jax.devices("gpu")[0]
    rng = np.random.default_rng(0)
    data = helpers.random_inputs(rng, 2, 512, 512, 8, 2, 64, jnp.bfloat16)
    data = [jax.device_put(x, gpu) for x in data]
    got = helpers.run_attention(ringattn.blockwise_attention, *data, kernel=kernel, **static)
    helpers.assert_all_close(got, helpers.reference_f64(*data, **static), jnp.bfloat16)


def test_api_guard_names_what_changed():
    """The guard reads the private module's surface: forward keywords, mask and layout enum
    members, backward arguments; a change in any is reported before cuDNN is ever called."""
    import enum
    import types

    class Mask(enum.Enum):
        NO_MASK, CAUSAL, PADDING, PADDING_CAUSAL = range(4)

    class Layout(enum.Enum):
        BTNH = 0

    def fwd(q, k, v, q_seqlen=None, kv_seqlen=None, *, scale, mask_type, qkv_layout,
            return_residual):  # fmt: skip
        pass

    def bwd(query, key, value, bias, q_seqlen, kv_seqlen, activation, fwd_output, grad_output,
            scale, seed, dropout_rate, variadic_args, mask_type, layout):  # fmt: skip
        pass

    good = dict(
        dot_product_attention=fwd, MaskType=Mask, AttentionLayout=Layout,
        check_cudnn_version=lambda: 90000, _dot_product_attention_bwd_p_wrapper=object(),
        _dot_product_attention_bwd_impl=bwd,
    )  # fmt: skip
    assert cudnn._api_problem(types.SimpleNamespace(**good)) is None
    no_padding = enum.Enum("Mask", ["NO_MASK", "CAUSAL"])
    bad = [
        (dict(MaskType=no_padding), "PADDING"),
        (dict(dot_product_attention=lambda q, k, v, *, scale: 0), "q_seqlen"),
        (dict(_dot_product_attention_bwd_impl=lambda query, key, new_arg: 0), "new_arg"),
    ]
    for change, word in bad:
        assert word in cudnn._api_problem(types.SimpleNamespace(**{**good, **change})), word
    del good["check_cudnn_version"]
    assert "check_cudnn_version" in cudnn._api_problem(types.SimpleNamespace(**good))
