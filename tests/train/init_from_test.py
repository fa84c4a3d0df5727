"""Training from another run's parameters (--config.init_from): an imported model keeps what its
parameters compute (RoPE theta, window) unless the config requests otherwise, and its first
training loss is the imported model's; requested changes are shown and recorded; a shape field
set to another value is an error; the optimizer starts afresh."""

import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest
from flax import linen as nn

from configs import default
from ringattn.hf import weights as weights_lib
from ringattn.hf.config import model_fields
from ringattn.hf.convert import import_checkpoint
from ringattn.nn.config import ModelConfig
from ringattn.nn.model import Transformer
from ringattn.run import directory, fields
from ringattn.run.checkpoint import Checkpointer
from ringattn.run.load import load_run
from ringattn.run.params import init_boxed
from ringattn.train import data as data_lib
from ringattn.train import trainer
from ringattn.train.step import forward

# A Mistral-style Hugging Face model: RoPE theta 1e5 and a window of 8 tokens (7 keys back).
HF = dict(
    architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=256, hidden_size=32,
    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, rope_theta=1e5, sliding_window=8, rms_norm_eps=1e-5, tie_word_embeddings=False,
    max_position_embeddings=4096,
)  # fmt: skip


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A run directory imported from HF files (safetensors of random weights, sharp enough that
    RoPE and the window show in the loss) by the same path as experiments/import_hf.py."""
    root = tmp_path_factory.mktemp("imported")
    cfg = ModelConfig.from_config(model_fields(HF))
    params = nn.unbox(init_boxed(cfg, jax.random.key(3)))
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 3 else x, params)  # q, k, v, out
    tensors = weights_lib.hf_tensors(params, cfg.num_layers, untie_scaled=False)
    weights_lib.save_tensors(tensors, str(root / "hf"))
    with open(root / "hf" / "config.json", "w") as f:
        json.dump(HF, f)
    import_checkpoint(str(root / "hf"), str(root / "run"), default.get_config())
    return str(root / "run")


def from_run(source, steps=1):
    """configs/default.py (no model field set) started from `source`, small and short."""
    c = default.get_config()
    c.init_from = source
    c.num_train_steps, c.seq_len, c.curriculum, c.batch_size = steps, 128, (), 4
    c.log_every_steps, c.eval_every_steps, c.eval_batches = 1, 100, 1
    return c


def loss_of(cfg, params, config, **changes):
    """The loss of `params` on the first training batch of `config`, dense on one device, with
    `cfg`'s RoPE / attention fields replaced by `changes` ({"rope": RopeConfig ...})."""
    attention = dataclasses.replace(cfg.attention, impl="dense", **changes.pop("attention", {}))
    model = Transformer(dataclasses.replace(cfg, attention=attention, **changes))
    batch = data_lib.make_batch(
        config.task, seed=config.seed, index=0, batch_size=config.batch_size,
        seq_len=config.seq_len, **config.task_params,
    )  # fmt: skip
    return float(jax.jit(lambda p, b: forward(model, p, b)[0])(params, batch))


@pytest.fixture(scope="module")
def tuned(imported, tmp_path_factory):
    """One training step from the imported run with configs/default.py and no model field set."""
    workdir = str(tmp_path_factory.mktemp("tuned"))
    trainer.train_and_evaluate(from_run(imported), workdir)
    return workdir


def test_imported_model_keeps_its_rope_and_window(imported, tuned):
    cfg = ModelConfig.from_config(directory.read_config(tuned).model)
    assert (cfg.rope.theta, cfg.attention.local_window_size, cfg.norm_eps) == (1e5, 7, 1e-5)
    assert cfg.d_model == 32 and not cfg.scale_tied_logits
    # Its first loss is the imported model's on the same batch (ring on 8 devices vs dense).
    with open(os.path.join(tuned, "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    source = load_run(imported, num_devices=1)
    want = loss_of(source.model_cfg, source.params, from_run(imported))
    assert first["step"] == 1 and first["train/loss"] == pytest.approx(want, rel=2e-6)
    # The config's defaults (theta 1e4, no window) would give another loss: the check can tell.
    theta = dataclasses.replace(source.model_cfg.rope, theta=1e4)
    no_window = dict(attention=dict(local_window_size=None))
    for changes in (dict(rope=theta), no_window):
        other = loss_of(source.model_cfg, source.params, from_run(imported), **changes)
        assert abs(other - want) > 1e-3 * want, changes


def test_requested_rope_changes_are_made_shown_and_recorded(imported, tmp_path, capsys):
    c = from_run(imported, steps=0)  # 0 steps: checkpoint 0 and config.json only
    c.model.rope.scaling, c.model.rope.factor = "yarn", 2.0  # as the two flags set them
    trainer.train_and_evaluate(c, str(tmp_path))
    out = capsys.readouterr().out
    assert f"init_from {imported}: its model, with these fields changed" in out
    assert re.search(r'model.rope.scaling\s+"none"\s+"yarn"', out)
    assert re.search(r"model.rope.factor\s+1.0\s+2.0", out)
    saved = directory.read_config(str(tmp_path))
    cfg = ModelConfig.from_config(saved.model)
    assert (cfg.rope.scaling, cfg.rope.factor, cfg.rope.theta) == ("yarn", 2.0, 1e5)
    assert cfg.attention.local_window_size == 7
    recorded = {row[0]: list(row[1:]) for row in saved[fields.RECORD]}
    assert recorded["model.rope.scaling"] == ["none", "yarn"]
    assert recorded["model.rope.factor"] == [1.0, 2.0]


def test_extend_variant_gets_factor_4_and_original_length(imported, tmp_path):
    """configs/default.py:extend sets rope.factor and original_len in the file: requested."""
    c = default.get_config("extend")
    c.init_from, c.num_train_steps = imported, 0
    c.model.rope.scaling = "llama3"
    trainer.train_and_evaluate(c, str(tmp_path))
    rope = ModelConfig.from_config(directory.read_config(str(tmp_path)).model).rope
    assert (rope.scaling, rope.factor, rope.original_len, rope.theta) == ("llama3", 4.0, 256, 1e5)


def test_a_shape_field_with_init_from_is_an_error(imported, tmp_path):
    c = from_run(imported, steps=0)
    c.model.d_model, c.model.num_layers = 64, 2  # num_layers is the run's: not an error
    with pytest.raises(ValueError, match=r"(?s)shape fields.*model.d_model\s+32\s+64") as e:
        trainer.train_and_evaluate(c, str(tmp_path / "new"))
    assert "num_layers" not in str(e.value)
    assert not os.path.exists(tmp_path / "new")


def test_init_from_restores_the_params_only(tuned, tmp_path):
    """The speed-only fields are the config's; a fresh optimizer at step 0."""
    c = from_run(tuned, steps=0)
    c.model.attention.impl, c.model.attention.layout = "allgather", "contiguous"
    trainer.train_and_evaluate(c, str(tmp_path))
    saved = directory.read_config(str(tmp_path))
    assert saved.model.attention.impl == "allgather" and saved.model.d_model == 32
    assert ["model.attention.impl", "ring", "allgather"] in saved[fields.RECORD]
    _, trained, _ = restore(tuned, directory.read_config(tuned))
    step, state, _ = restore(str(tmp_path), saved)
    assert int(trained.step) == 1 and step == 0 and int(state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, state.params, trained.params)
    # A fresh optimizer: every count and moment 0 (the source's are not).
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state))
    assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(trained.opt_state))


def restore(workdir, config):
    exp = trainer.Experiment(config)
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        return ckpt.restore_latest(exp.abstract_state)
    finally:
        ckpt.close()
