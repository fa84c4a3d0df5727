"""A run directory's config.json: configs written before `local_window_size` still read (with a
warning), a missing one is a clear error, and the old import paths of the run directory's
functions keep working for one release, with a warning naming the new one."""

import importlib
import json

import pytest

from configs import default
from ringattn.nn.config import ModelConfig
from ringattn.run import directory, load, params
from ringattn.run.checkpoint import Checkpointer


@pytest.mark.parametrize("old, new", [(0, None), (1, 0), (4096, 4095)])
def test_old_config_json_with_sliding_window_reads(tmp_path, old, new):
    """config.json as runs and imports wrote it (SmolLM2's has sliding_window 0)."""
    model = default.get_config("test").model.to_dict()
    model["attention"] = dict(impl="ring", layout="zigzag", block_q=16, block_k=16)
    model["attention"] |= dict(sliding_window=old, global_every=0, sinks=False)
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model": model, "seq_len": 128}, f)
    with pytest.warns(DeprecationWarning, match="sliding_window.*local_window_size"):
        config = directory.read_config(str(tmp_path))
    assert "sliding_window" not in config.model.attention
    assert ModelConfig.from_config(config.model).attention.local_window_size == new


def test_a_missing_config_is_a_clear_error(tmp_path):
    assert directory.read_config(str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="config.json does not exist.*--config="):
        directory.load_config(str(tmp_path))
    assert directory.load_config(str(tmp_path), config="given") == "given"


@pytest.mark.parametrize(
    "old, name, new",
    [
        ("ringattn.train.rundir", "load_config", directory.load_config),
        ("ringattn.train.rundir", "with_overrides", directory.with_overrides),
        ("ringattn.train.rundir", "restore_params", params.restore_params),
        ("ringattn.train.checkpoint", "Checkpointer", Checkpointer),
        ("ringattn.evals.restore", "load_run", load.load_run),
        ("ringattn.evals.restore", "Run", load.Run),
    ],
)
def test_old_import_paths_warn_and_work(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=f"{old}.{name} is deprecated.*use ringattn.run"):
        assert getattr(module, name) is new


def test_trainer_model_config_is_a_deprecated_alias():
    from ringattn.train import trainer

    model = default.get_config("test").model
    with pytest.warns(DeprecationWarning, match="trainer.model_config.*ModelConfig.from_config"):
        assert trainer.model_config(model) == ModelConfig.from_config(model)
