"""The jitted train step of the LM with impl="ring" (bf16, head dim 128, a data x context mesh),
lowered for CUDA and for TPU on this CPU (ringattn.target_platform): the program a GPU or a TPU
would run, with the fused kernels kernel="auto" picks there in the ring's forward and backward."""

import dataclasses

import jax
import jax.numpy as jnp
import optax
import pytest

from ringattn.mesh import make_mesh, mesh_axes_for
from ringattn.nn.config import AttentionConfig, ModelConfig
from ringattn.nn.model import Transformer
from ringattn.train import state, step

CFG = ModelConfig(
    vocab_size=256, num_layers=1, d_model=256, num_heads=2, num_kv_heads=1, head_dim=128,
    mlp_dim=512, dtype="bfloat16", attention=AttentionConfig(impl="ring"),
)  # fmt: skip
B, T = 2, 1024  # packed documents (segment ids), 256 tokens per context shard


def _train_step(cfg):
    """(the jitted train step of `cfg` on a (data 2, context 4) mesh, its abstract arguments)."""
    mesh = make_mesh(dict(data=2, context=4), jax.devices("cpu")[:8])
    model, tx = Transformer(cfg, mesh), optax.adamw(1e-3)
    abstract_state, shardings = state.state_shardings(model, tx, mesh, cfg.rules)
    data = step.batch_sharding(mesh, mesh_axes_for(cfg.rules, "act_batch"))
    dtypes = dict(weights=jnp.float32, answer_mask=jnp.bool_)
    batch = {
        name: jax.ShapeDtypeStruct((B, T), dtypes.get(name, jnp.int32), sharding=data)
        for name in step.BATCH_KEYS
    }
    return step.jit_train_step(model, tx, shardings, data, mesh), (abstract_state, batch)


def _lower(helpers, platform):
    train_step, args = _train_step(CFG)
    return helpers.lowered_calls(platform, train_step, *args)


@pytest.mark.usefixtures("cudnn_stand_in")
def test_ring_train_step_lowers_for_cuda(helpers):
    calls = _lower(helpers, "cuda")
    triton = {c.kernel: n for c, n in calls.items() if c.target == "__gpu$xla.gpu.triton"}
    # The ring's loop body and its last step, forward and backward, continuing in place.
    assert triton == {"ringattn_fwd": 2, "ringattn_dkv": 2, "ringattn_dq": 2}, calls
    assert all(c.in_place for c in calls if c.kernel)
    assert {c.target for c in calls if not c.kernel} == {
        "__cudnn$fmhaSoftmax",
        "__cudnn$fmhaSoftmaxBackward",
    }


def test_ring_train_step_lowers_for_tpu(helpers):
    calls = _lower(helpers, "tpu")
    assert {c.target for c in calls} == {"tpu_custom_call"}, calls
    assert {c.kernel for c in calls} == {  # segment ids: splash's segmented kernels
        "splash_mqa_fwd_segmented_residuals",
        "splash_mqa_dkv_segmented_no_residuals",
        "splash_mqa_dq_segmented_no_residuals",
    }


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.usefixtures("cudnn_stand_in")
def test_remat_offload_keeps_block_inputs_in_host_memory(platform):
    """remat="offload" (scanned layers): the train step lowered for CUDA and for TPU moves each
    layer's input [B, T, E] to pinned host memory for the backward and brings it back; remat
    "full" keeps it on the device."""
    import re

    import ringattn

    def placements(remat):
        cfg = dataclasses.replace(CFG, num_layers=2, scan_layers=True, remat=remat)
        train_step, args = _train_step(cfg)
        with ringattn.target_platform(platform) as name:
            lowered = train_step.trace(*args).lower(lowering_platforms=(name,))
        pattern = r'_xla_buffer_placement = "(\w+)"\}\} : \(tensor<([^>]*)>'
        return re.findall(pattern, lowered.as_text())

    block_input = f"{B}x{T}x{CFG.d_model}xbf16"
    offloaded = placements("offload")
    assert ("pinned_host", block_input) in offloaded
    assert ("device", block_input) in offloaded  # brought back for the backward
    assert not any(kind == "pinned_host" for kind, _ in placements("full"))
