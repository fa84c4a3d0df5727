"""Run directories: training from another run's parameters (init_from) takes its parameters and
model shape and nothing else; parameters restore from a checkpoint that holds nothing else."""

import jax
import numpy as np
import pytest

from configs import default
from ringattn.train import rundir, trainer
from ringattn.train.checkpoint import Checkpointer


def small_config(steps):
    c = default.get_config("test")
    c.num_train_steps = steps
    c.checkpoint_every_steps = steps or 1
    c.eval_every_steps = 100
    return c


def restore_state(workdir, config):
    exp = trainer.Experiment(config)
    ckpt = Checkpointer(str(workdir), async_save=False)
    try:
        return ckpt.restore_latest(exp.abstract_state)
    finally:
        ckpt.close()


def test_merge_model_takes_the_shape_from_the_source():
    source = default.get_config("test").model.to_dict()
    ours = default.get_config().model.to_dict()
    ours["attention"]["impl"] = "dense"
    ours["rope"]["scaling"] = "yarn"
    merged = rundir.merge_model(ours, source)
    for name in ("num_layers", "d_model", "mlp_dim", "num_heads", "num_kv_heads", "head_dim"):
        assert merged[name] == source[name]
    assert merged["d_model"] == 32 and ours["d_model"] == 128
    assert merged["attention"]["impl"] == "dense" and merged["rope"]["scaling"] == "yarn"
    assert merged["attention"]["block_q"] == ours["attention"]["block_q"]


def test_init_from_restores_the_params_only(tmp_path, capsys):
    source = tmp_path / "source"
    trainer.train_and_evaluate(small_config(4), str(source))
    _, trained, _ = restore_state(source, small_config(4))
    assert int(trained.step) == 4

    # A config of another shape and attention: the shape comes from the source, the attention
    # from the config; 0 steps save the starting state as checkpoint 0.
    c = small_config(0)
    c.model.d_model, c.model.num_layers = 64, 3
    c.model.attention.impl, c.model.attention.layout = "allgather", "contiguous"
    c.init_from = str(source)
    trainer.train_and_evaluate(c, str(tmp_path / "tuned"))
    out = capsys.readouterr().out
    assert "init_from: model.d_model = 32" in out and "model.attention.impl = 'allgather'" in out
    saved = rundir.load_config(str(tmp_path / "tuned"))
    assert saved.model.d_model == 32 and saved.model.attention.impl == "allgather"

    step, state, _ = restore_state(tmp_path / "tuned", saved)
    assert step == 0 and int(state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, state.params, trained.params)
    # A fresh optimizer: every count and moment 0 (the source's are not).
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state))
    assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(trained.opt_state))


def test_restore_params_from_a_params_only_checkpoint(tmp_path):
    params = {"w": np.arange(8.0, dtype=np.float32)}
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(3, {"params": params}, {})
    ckpt.close()
    abstract = {"w": jax.ShapeDtypeStruct((8,), np.float32, sharding=_replicated())}
    step, got = rundir.restore_params(str(tmp_path), abstract)
    assert step == 3
    np.testing.assert_array_equal(got["w"], params["w"])
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        rundir.restore_params(str(tmp_path / "nothing"), abstract)


def _replicated():
    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    return jax.sharding.NamedSharding(mesh, jax.P())
