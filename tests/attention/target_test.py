"""ringattn.target_platform: its checks, where it holds (this thread, nested, restored), that it
keys jitted functions (traced again for another target), and reading custom calls."""

import concurrent.futures

import jax
import jax.numpy as jnp
import pytest

import ringattn
from ringattn.attention import target
from ringattn.attention.kernels import dispatch
from ringattn.attention.target import Call


def test_rejects_unknown_platforms():
    with pytest.raises(ValueError, match=r"`name` must be one of .*'tpu'.*'gpu'.* got 'npu'"):
        with ringattn.target_platform("npu"):
            pass


def test_holds_in_this_thread_only_and_is_restored():
    assert target.current() is None
    with ringattn.target_platform("tpu") as name:
        assert name == "tpu" and target.current() == "tpu" and dispatch.platform() == "tpu"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # where the probe runs
            assert pool.submit(dispatch.platform).result() == "cpu"
        with ringattn.target_platform("cuda"):
            assert dispatch.platform() == "gpu"
        with ringattn.target_platform(None):
            assert target.current() is None
        assert target.current() == "tpu"
    assert target.current() is None
    with pytest.raises(KeyError), ringattn.target_platform("rocm"):
        raise KeyError  # left by an exception: restored too
    assert target.current() is None


def test_a_jitted_function_is_traced_again_for_another_target():
    """The same jitted function (and the inner jit of blockwise_attention): for TPU splash's
    Mosaic calls, for this CPU none, whatever was traced before."""
    f = jax.jit(lambda q: ringattn.blockwise_attention(q, q, q, causal=True))
    q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)

    def calls(platform=None):
        with ringattn.target_platform(platform):
            lowered = f.trace(q).lower(lowering_platforms=(platform or "cpu",))
        return {c.target for c in target.custom_calls(lowered.as_text())}

    assert calls() == set()
    assert calls("tpu") == {"tpu_custom_call"}
    assert calls() == set()


def test_custom_calls_names_kernels_and_in_place_calls():
    text = "\n".join(
        [
            "%1 = stablehlo.custom_call @__gpu$xla.gpu.triton(%0) {mhlo.backend_config = {ir = "
            '"ML\\EFR", name = "ringattn_fwd"}} : (tensor<8xf32>) -> tensor<8xf32>',
            "%2:2 = stablehlo.custom_call @__gpu$xla.gpu.triton(%1, %0) {mhlo.backend_config = "
            '{name = "ringattn_dq"}, output_operand_aliases = [#stablehlo.output_operand_alias<'
            "output_tuple_indices = [0], operand_index = 0, operand_tuple_indices = []>]}",
            '%3 = stablehlo.custom_call @tpu_custom_call(%2) {backend_config = "{\\22custom_call'
            '_config\\22: {}}", kernel_name = "splash_mqa_fwd_residuals"}',
            '%4 = stablehlo.custom_call @__cudnn$fmhaSoftmax(%3) {backend_config = "{}"}',
            '%5 = "stablehlo.custom_call"(%4) <{call_target_name = "__cudnn$fmhaSoftmax"}>',
            "%6 = stablehlo.add %5, %5 : tensor<8xf32>",
        ]
    )
    assert target.custom_calls(text) == {
        Call("__gpu$xla.gpu.triton", "ringattn_fwd", False): 1,
        Call("__gpu$xla.gpu.triton", "ringattn_dq", True): 1,
        Call("tpu_custom_call", "splash_mqa_fwd_residuals", False): 1,
        Call("__cudnn$fmhaSoftmax", "", False): 2,
    }
    assert str(Call("t", "ringattn_dq", True)) == "ringattn_dq (in place)"
    assert str(Call("__cudnn$fmhaSoftmax", "", False)) == "__cudnn$fmhaSoftmax"
