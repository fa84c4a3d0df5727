"""context_parallel_attention with every strategy on an 8-device mesh, forward and gradients,
lowered for CUDA and for TPU on this CPU (ringattn.target_platform): each program runs the
target's fused kernels (kernel="auto") in every place a kernel runs, none falls back to XLA.

The mesh holds this machine's CPU devices; lowering for another platform needs only its shape.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

import ringattn

B, T, H, K, D = 1, 2048, 8, 4, 128  # bf16, GQA; 256 tokens per device
TRITON, MOSAIC = "__gpu$xla.gpu.triton", "tpu_custom_call"
CUDNN = {"fwd": {"__cudnn$fmhaSoftmax"}, "grads": {"__cudnn$fmhaSoftmax"}}
CUDNN["grads"] |= {"__cudnn$fmhaSoftmaxBackward"}
PASSES = {"fwd": {"fwd"}, "grads": {"fwd", "dkv", "dq"}}
# Where a kernel pass runs: a ring's loop body and its last step; one pass otherwise.
SITES = {"ring": 2, "allgather": 1, "ulysses": 1, "hybrid": 2}


@functools.cache
def _mesh(strategy):
    cpus = jax.devices("cpu")[:8]
    if strategy == "hybrid":
        return jax.make_mesh((2, 4), ("ulysses", "ring"), devices=cpus), ("ulysses", "ring")
    return jax.make_mesh((8,), ("context",), devices=cpus), "context"


def _program(strategy, what):
    mesh, axis = _mesh(strategy)

    def attn(q, k, v):
        return ringattn.context_parallel_attention(
            q, k, v, mesh=mesh, axis_name=axis, strategy=strategy, causal=True
        )

    if what == "fwd":
        return attn

    def fwd_and_grads(q, k, v):
        out, vjp = jax.vjp(attn, q, k, v)
        return out, vjp(out)

    return fwd_and_grads


def _lower(helpers, platform, strategy, what):
    q = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((B, T, K, D), jnp.bfloat16)
    return helpers.lowered_calls(platform, _program(strategy, what), q, k, k)


@pytest.mark.usefixtures("cudnn_stand_in")
@pytest.mark.parametrize("what", ["fwd", "grads"])
@pytest.mark.parametrize("strategy", list(SITES))
def test_cuda_programs_run_cudnn_and_our_pallas_kernel(helpers, strategy, what):
    calls = _lower(helpers, "cuda", strategy, what)
    triton = {c: n for c, n in calls.items() if c.target == TRITON}
    # Our Pallas kernel for the steps cuDNN cannot run, in every place a step runs.
    want = {f"ringattn_{p}": SITES[strategy] for p in PASSES[what]}
    assert {c.kernel: n for c, n in triton.items()} == want, calls
    assert {c.target for c in calls} - {TRITON} == CUDNN[what], calls
    if strategy in ("ring", "hybrid"):  # a ring continues its state and gradients in place
        assert all(c.in_place for c in triton), calls


@pytest.mark.parametrize("what", ["fwd", "grads"])
@pytest.mark.parametrize("strategy", list(SITES))
def test_tpu_programs_run_splash(helpers, strategy, what):
    calls = _lower(helpers, "tpu", strategy, what)
    assert {c.target for c in calls} == {MOSAIC}, calls
    kinds = {c.kernel.split("_")[2] for c in calls}  # splash_mqa_<pass>_...
    assert kinds == PASSES[what], calls
