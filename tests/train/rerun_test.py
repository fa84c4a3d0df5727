"""A rerun never destroys a run: a config that differs where a rerun may not change it stops
before anything in the workdir is written; the same config with more steps resumes exactly; when
checkpoints exist and none reads, the run stops instead of restarting at step 0."""

import hashlib
import json
import os
import shutil

import pytest

from configs import default
from ringattn.run.checkpoint import UnreadableRun
from ringattn.train import trainer


def small_config(steps):
    c = default.get_config("test")  # warmup 50 steps: the learning rate does not depend on steps
    c.num_train_steps, c.checkpoint_every_steps, c.eval_every_steps = steps, 2, 100
    return c


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["train/loss"]) for r in map(json.loads, f)]


def snapshot(workdir):
    """{path: sha256} of every file under `workdir`."""
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("four"))
    trainer.train_and_evaluate(small_config(4), workdir)
    return workdir


@pytest.mark.parametrize(
    "field, value, forward",
    [
        ("model.d_model", 64, "a new --workdir"),
        ("model.rope.theta", 1e5, "--config.init_from="),
        ("task", "multikey", "a new --workdir"),
    ],
)
def test_a_refused_rerun_changes_no_file(four_steps, field, value, forward):
    before = snapshot(four_steps)
    c = small_config(4)
    *parents, name = field.split(".")
    node = c
    for p in parents:
        node = node[p]
    node[name] = value
    with pytest.raises(ValueError, match=f"(?s)nothing in .* was written.*{field}") as e:
        trainer.train_and_evaluate(c, four_steps)
    assert forward in str(e.value)
    assert snapshot(four_steps) == before


def test_more_steps_resume_exactly(four_steps, tmp_path, capsys):
    """The 4-step run rerun with 6 steps continues from checkpoint 4 with the losses of an
    uninterrupted 6-step run; the table says what changed."""
    work = tmp_path / "resumed"
    shutil.copytree(four_steps, work)
    trainer.train_and_evaluate(small_config(6), str(work))
    out = capsys.readouterr().out
    assert "resumed from checkpoint 4" in out
    assert "num_train_steps" in out and "resuming the run in" in out
    trainer.train_and_evaluate(small_config(6), str(tmp_path / "whole"))
    assert losses(work) == losses(tmp_path / "whole")  # bit-identical
    assert [s for s, _ in losses(work)] == list(range(1, 7))


def test_unreadable_checkpoints_stop_the_run(four_steps, tmp_path):
    work = tmp_path / "damaged"
    shutil.copytree(four_steps, work)
    for root, _, files in os.walk(work / "checkpoints"):
        for name in files:
            if "state" in root.split(os.sep):
                os.remove(os.path.join(root, name))
    before = snapshot(work)
    with pytest.raises(UnreadableRun, match=r"None of the checkpoints \[4, 2\]"):
        trainer.train_and_evaluate(small_config(6), str(work))
    assert snapshot(work) == before
