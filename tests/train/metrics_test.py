"""Metrics: JSON lines and TensorBoard scalars at their steps; a resume shows each step once."""

import json

from ringattn.train.metrics import TENSORBOARD_DIR, MetricsWriter, progress_line


def _run(workdir, resumed_step, losses):
    writer = MetricsWriter(str(workdir), resumed_step)
    for step, loss in losses.items():
        writer.write({"step": step, "train/loss": loss, "seq_len": 64})
    writer.close()


def test_resume_after_a_crash_shows_each_step_once(tmp_path, read_tensorboard):
    """A run logs steps 1-6 and dies; its last checkpoint was step 4, so the rerun logs 5 and 6
    again: the JSON lines and what TensorBoard shows hold 1-6 once, 5 and 6 from the rerun."""
    _run(tmp_path, 0, {s: float(s) for s in range(1, 7)})
    _run(tmp_path, 4, {5: 50.0, 6: 60.0})
    want = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0)]
    with open(tmp_path / "metrics.jsonl") as f:
        assert [(r["step"], r["train/loss"]) for r in map(json.loads, f)] == want
    written, shown = read_tensorboard(tmp_path / TENSORBOARD_DIR, "train/loss")
    assert shown == want
    assert [s for s, _ in written] == [1, 2, 3, 4, 5, 6, 5, 6]  # the purge marker hides 5, 6
    _, seq_lens = read_tensorboard(tmp_path / TENSORBOARD_DIR, "seq_len")
    assert seq_lens == [(s, 64.0) for s in range(1, 7)]


def test_progress_line():
    record = {"step": 20, "train/loss": 2.5, "train/accuracy": 0.25, "seq_len": 128,
              "tokens_per_s": 4652.0, "step_time_s": 0.44, "eval/loss": 2.0,
              "eval/accuracy": 0.5}  # fmt: skip
    line = progress_line(record)
    assert line == (
        "step     20 | loss 2.5000 | acc 0.250 | T 128 | 4,652 tok/s | 440 ms/step | "
        "eval loss 2.0000 | eval acc 0.500"
    )
    assert progress_line({"step": 3, "eval/loss": 1.0, "eval/accuracy": 1.0}).count("|") == 2
    record["eval/token_accuracy"] = 0.625
    assert progress_line(record).endswith("eval acc 0.500 | eval token acc 0.625")


def test_exact_match_and_token_accuracy():
    """Row 0: both answer tokens right (exact); row 1: one of two; row 2: no answer tokens
    (counted in neither). Positions outside the answer never count, right or not."""
    import jax.numpy as jnp

    from ringattn.train.step import exact_match

    right = jnp.asarray([[1, 1, 0, 1], [1, 0, 1, 1], [1, 1, 1, 1]], bool)
    mask = jnp.asarray([[0, 1, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0]])
    correct, rows, right_tokens, tokens = exact_match(right, {"answer_mask": mask})
    assert (int(correct), int(rows), int(right_tokens), int(tokens)) == (1, 2, 3, 4)
