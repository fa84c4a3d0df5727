"""A run's parameters: restored from a checkpoint of parameters only; converted between layer
structures (scanned or not, local/global groups, sinks) so that the model computes the same
logits; restored into another structure than the run stored them in."""

import dataclasses
import functools

import jax
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from ringattn.mesh import make_mesh
from ringattn.nn.config import AttentionConfig, ModelConfig
from ringattn.nn.model import Transformer
from ringattn.run import directory
from ringattn.run.checkpoint import Checkpointer
from ringattn.run.params import convert_layers, restore_model_params, restore_params

T = 16
CFG = ModelConfig(
    vocab_size=64, num_layers=4, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
    mlp_dim=64, attention=AttentionConfig(impl="dense", local_window_size=3, global_every=2),
)  # fmt: skip


def structure(scan=False, sinks=False, every=2):
    a = dataclasses.replace(CFG.attention, sinks=sinks, global_every=every)
    return dataclasses.replace(CFG, scan_layers=scan, attention=a)


def tokens():
    x = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, T)).astype(np.int32)
    return x, np.broadcast_to(np.arange(T), x.shape), np.ones_like(x)


@functools.cache
def params(cfg):
    return nn.unbox(Transformer(cfg).init(jax.random.key(1), *tokens())["params"])


def logits(cfg, p):
    return np.asarray(jax.jit(Transformer(cfg).apply)({"params": p}, *tokens()))


@pytest.mark.parametrize("every", [0, 2])
def test_scanned_and_unscanned_parameters_compute_the_same(every):
    flat, scanned = structure(every=every), structure(scan=True, every=every)
    p = params(flat)
    stacked = convert_layers(p, flat, scanned)
    assert set(stacked) == {"embedding", "final_norm", "layers"}
    if every:
        assert set(stacked["layers"]) == {"block_0", "block_1"}
    # The same numbers (float32: the scan runs the same ops), and back again bit for bit.
    np.testing.assert_allclose(logits(scanned, stacked), logits(flat, p), rtol=1e-5, atol=1e-5)
    back = convert_layers(stacked, scanned, flat)
    jax.tree.map(np.testing.assert_array_equal, back, p)


def test_sinks_asked_for_start_at_zero_and_dropped_when_not():
    plain, sinks = structure(), structure(sinks=True)
    with_sinks = convert_layers(params(plain), plain, sinks)
    assert all(np.all(with_sinks[f"layer_{i}"]["attn"]["sinks"] == 0) for i in range(4))
    # A fresh model with sinks has the same tree (sinks initialised at 0 too).
    assert jax.tree.structure(with_sinks) == jax.tree.structure(params(sinks))
    dropped = convert_layers(params(sinks), sinks, plain)
    assert jax.tree.structure(dropped) == jax.tree.structure(params(plain))


def write_run(workdir, cfg, p):
    ckpt = Checkpointer(str(workdir), async_save=False)
    ckpt.save(5, {"params": p}, {})
    ckpt.close()
    model = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "rules"}
    directory.write_config(str(workdir), ml_collections.ConfigDict({"model": model}))


def test_restore_into_another_structure(tmp_path):
    """A run stored one layer at a time restores as stacked layers, and the reverse."""
    mesh = make_mesh(dict(fsdp=-1))
    flat, scanned = structure(), structure(scan=True)
    write_run(tmp_path / "flat", flat, params(flat))
    flat_dir = str(tmp_path / "flat")
    step, got = restore_model_params(flat_dir, scanned, mesh, directory.read_config(flat_dir))
    assert step == 5
    jax.tree.map(np.testing.assert_array_equal, got, convert_layers(params(flat), flat, scanned))
    assert got["layers"]["block_0"]["attn"]["query"].sharding.mesh == mesh
    write_run(tmp_path / "scanned", scanned, got)
    scanned_dir = str(tmp_path / "scanned")
    _, back = restore_model_params(scanned_dir, flat, mesh, directory.read_config(scanned_dir))
    jax.tree.map(np.testing.assert_array_equal, back, params(flat))


def test_restore_params_from_a_params_only_checkpoint(tmp_path):
    p = {"w": np.arange(8.0, dtype=np.float32)}
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(3, {"params": p}, {})
    ckpt.close()
    replicated = jax.sharding.NamedSharding(jax.make_mesh((jax.device_count(),), ("x",)), jax.P())
    abstract = {"w": jax.ShapeDtypeStruct((8,), np.float32, sharding=replicated)}
    step, got = restore_params(str(tmp_path), abstract)
    assert step == 3
    np.testing.assert_array_equal(got["w"], p["w"])
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        restore_params(str(tmp_path / "nothing"), abstract)
