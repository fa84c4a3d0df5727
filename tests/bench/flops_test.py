"""The benchmarks' one FLOP count (visible pairs, FlashAttention-2's convention) and the one
hardware table, whose entries the cost model takes as its `ringattn.Hardware`."""

import dataclasses

import numpy as np
import pytest

import ringattn
from ringattn.bench import flops
from ringattn.bench.hardware import HARDWARE, Hardware


@pytest.mark.parametrize("t", [1, 7, 64])
@pytest.mark.parametrize("mask", ["causal", "none", "window"])
def test_visible_pairs_counts_the_mask(t, mask):
    left, right = flops.mask_reach(mask, window=5)
    i, j = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
    visible = np.ones((t, t), bool)
    if left is not None:
        visible &= j >= i - left
    if right is not None:
        visible &= j <= i + right
    assert flops.visible_pairs(t, left, right) == visible.sum()
    assert flops.visible_pairs(t, 2, 3) == ((j >= i - 2) & (j <= i + 3)).sum()


def test_attention_flops():
    causal = flops.mask_reach("causal")
    assert flops.attention_flops(2, 8, 64, 4096, "fwd", causal) == 4096 * 4097 // 2 * 2 * 8 * 64 * 4
    assert flops.attention_flops(1, 1, 1, 10, "fwdbwd") == 100 * 14  # unmasked by default
    assert flops.visible_pairs(32768, None, 0) == 32768 * 32769 // 2  # int64, no overflow
    with pytest.raises(ValueError, match="mode: expected one of .* got 'bwd'"):
        flops.attention_flops(1, 1, 1, 10, "bwd")
    with pytest.raises(ValueError, match="mask: expected one of .* got 'sliding'"):
        flops.mask_reach("sliding")
    with pytest.raises(ValueError, match="needs `window`"):
        flops.mask_reach("window")


def test_hardware_table_entries_are_cost_model_hardware():
    """An entry is a ringattn.Hardware (its constants, the cost model's defaults but for the
    TPU's link), and estimate_costs takes it as one."""
    default = ringattn.Hardware()
    fields = [f.name for f in dataclasses.fields(ringattn.Hardware)]
    cuda, tpu = HARDWARE["cuda"], HARDWARE["tpu"]
    assert isinstance(cuda, ringattn.Hardware) and isinstance(tpu, Hardware)
    assert all(getattr(cuda, f) == getattr(default, f) for f in fields)
    assert tpu.link_bytes_per_s == 50e9 and tpu.flops_per_s == default.flops_per_s
    kw = dict(
        batch=1, q_len=8192, kv_len=8192, num_heads=8, num_kv_heads=8, head_dim=128,
        dtype="bfloat16", mesh_axis_sizes={"c": 8}, axis_name="c", causal=True,
        local_window_size=None, layout="zigzag",
    )  # fmt: skip
    assert ringattn.estimate_costs(**kw, hardware=cuda) == ringattn.estimate_costs(**kw)
    slow_link = ringattn.estimate_costs(**kw, hardware=tpu)["allgather"]
    assert slow_link.exposed_comm_s > ringattn.estimate_costs(**kw)["allgather"].exposed_comm_s
    for hw in HARDWARE.values():  # every target is a path that is timed there
        assert hw.baseline in hw.time_paths
        assert {path for _, path, _ in hw.targets} <= set(hw.time_paths)
