"""The trainer: config variants, a few steps of the default config, exact resume after SIGTERM,
falling back from an unreadable checkpoint (and stopping when none reads)."""

import json
import os
import runpy
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from ringattn.mesh import mesh_shape
from ringattn.nn.config import ModelConfig
from ringattn.run import fields
from ringattn.run.checkpoint import Checkpointer, UnreadableRun
from ringattn.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize(
    "variant", ["", "long", "test", "text", "7b_1m", "extend", "llama3_8b_128k"]
)
def test_config_variants_parse(variant):
    c = default.get_config(variant)
    cfg = ModelConfig.from_config(c.model)
    assert cfg.num_heads % cfg.num_kv_heads == 0
    schedule = trainer.curriculum(c)
    assert schedule[0][0] == 0
    devices = {"7b_1m": 256, "llama3_8b_128k": 32}.get(variant, 8)
    sizes = mesh_shape(dict(c.mesh), devices)
    for _, seq_len in schedule:
        assert seq_len % (2 * sizes["context"]) == 0  # zigzag needs 2n chunks
    with pytest.raises(ValueError, match="unknown variant"):
        default.get_config("huge")


def test_finetune_config_holds_the_shape_not_the_function():
    """configs/finetune.py:smollm2 sets SmolLM2-135M's shape (a dry run needs no run) and leaves
    its function to the run (RoPE, norm eps, tied-logit scale: ringattn/run/fields.py)."""
    c = runpy.run_path(os.path.join(REPO, "configs", "finetune.py"))["get_config"]("smollm2")
    flat = fields.flat(c.model)
    assert (flat["vocab_size"], flat["num_layers"], flat["d_model"]) == (49152, 30, 576)
    assert all(flat[k] is None for k in flat if fields.kind(k) == "function")
    assert c.task == "text" and dict(c.eval_task_params) == {"split": "eval"}
    assert c.seq_len % c.loss_chunk_size == 0 and c.eval_at_start
    with pytest.raises(ValueError, match="unknown variant"):
        runpy.run_path(os.path.join(REPO, "configs", "finetune.py"))["get_config"]("huge")


def test_default_config_trains(tmp_path, read_tensorboard):
    c = default.get_config()
    c.num_train_steps, c.eval_every_steps, c.eval_batches, c.log_every_steps = 2, 2, 1, 1
    c.batch_size = 8
    last = trainer.train_and_evaluate(c, str(tmp_path))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["train/loss"] > 4.0  # ~ln(256) at the start
    assert 0.0 <= last["eval/accuracy"] <= 1.0 and last["tokens_per_s"] > 0
    assert os.listdir(tmp_path / "checkpoints") == ["2"]
    # The same scalars in TensorBoard's event file, at their steps (stored as float32).
    for tag, steps in (("train/loss", [1, 2]), ("eval/accuracy", [2]), ("learning_rate", [1, 2])):
        written, _ = read_tensorboard(tmp_path / "tensorboard", tag)
        want = [(r["step"], np.float32(r[tag])) for r in rows if r["step"] in steps]
        assert written == want, tag


def small_config(steps=10, tokenizer=None):
    """The test config; with `tokenizer` (a directory), text in its tokens instead of passkey,
    the loss tiled, held-out files evaluated at the start too."""
    c = default.get_config("test")
    c.num_train_steps = steps
    c.checkpoint_every_steps = 4
    c.eval_every_steps = 100
    if tokenizer:
        c.task, c.eval_at_start, c.loss_chunk_size = "text", True, 32
        c.task_params = ml_collections.ConfigDict({"tokenizer": tokenizer})
        c.eval_task_params = ml_collections.ConfigDict({"split": "eval"})
        c.model.vocab_size = 300
    return c


def test_sigterm_then_resume_gives_the_uninterrupted_losses(tmp_path, read_tensorboard,
                                                            tokenizer_dirs):  # fmt: skip
    """Killed at step 5 and rerun: the losses of the run that was not (the data iterator's state
    is in the checkpoint), with packed text in a tokenizer's tokens and the tiled loss (passkey
    and the plain loss resume in rerun_test.py)."""
    c = small_config(tokenizer=tokenizer_dirs[True])
    full = tmp_path / "full"
    trainer.train_and_evaluate(c, str(full))
    want = [r["train/loss"] for r in read_metrics(full) if "train/loss" in r]

    # SIGTERM from another thread once step 5 is logged: the loop saves and stops.
    work = tmp_path / "interrupted"

    def kill_at_step_5():
        path = work / "metrics.jsonl"
        while not (path.exists() and path.read_text().count('"train/loss"') >= 5):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=kill_at_step_5, daemon=True)
    killer.start()
    trainer.train_and_evaluate(c, str(work))
    killer.join()
    stopped = read_metrics(work)[-1]["step"]
    assert 5 <= stopped < c.num_train_steps
    assert str(stopped) in os.listdir(work / "checkpoints")

    trainer.train_and_evaluate(c, str(work))
    got = [r["train/loss"] for r in read_metrics(work) if "train/loss" in r]
    steps = [r["step"] for r in read_metrics(work) if "train/loss" in r]
    assert steps == list(range(1, c.num_train_steps + 1))
    assert got == want  # bit-identical
    # Evaluated once before training (on held-out files), and at the end.
    assert [r["step"] for r in read_metrics(work) if "eval/loss" in r] == [0, c.num_train_steps]
    # TensorBoard: the resumed run's new event file holds only the steps after the checkpoint.
    written, _ = read_tensorboard(work / "tensorboard", "train/loss")
    assert written == [(i + 1, np.float32(loss)) for i, loss in enumerate(want)]
    assert len(os.listdir(work / "tensorboard")) == 2


def test_unreadable_latest_checkpoint_falls_back(tmp_path, capsys):
    ckpt = Checkpointer(str(tmp_path), keep=3, async_save=False)
    abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.full((4,), float(step))}, {"index": step})
    ckpt.wait()
    # Damage checkpoint 2: remove every data file of its state.
    for root, _, files in os.walk(tmp_path / "checkpoints" / "2" / "state"):
        for name in files:
            os.remove(os.path.join(root, name))
    step, state, data = ckpt.restore_latest(abstract)
    assert step == 1 and data == {"index": 1}
    np.testing.assert_array_equal(state["w"], np.ones(4))
    assert "checkpoint 2 is unreadable" in capsys.readouterr().out
    # None reads: an error naming them, never "no checkpoint" (a restart at step 0).
    for root, _, files in os.walk(tmp_path / "checkpoints" / "1" / "state"):
        for name in files:
            os.remove(os.path.join(root, name))
    with pytest.raises(UnreadableRun, match=r"\[2, 1\].*newest, 2"):
        ckpt.restore_latest(abstract)
    ckpt.close()
