"""Where a run's metrics go: `<workdir>/metrics.jsonl`, TensorBoard event files in
`<workdir>/tensorboard/` (process 0 only), and one progress line per record on stdout."""

from __future__ import annotations

import json
import os

import jax
import tensorboardX

TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    """Each record (a dict with a "step") as one JSON line, and each of its numbers as a
    TensorBoard scalar at that step, under the same key.

    On resume from `resumed_step`, JSON lines of later steps (written before a crash) are dropped
    first, and the new event file starts with TensorBoard's purge marker (a SessionLog.START at
    resumed_step + 1): TensorBoard then hides the earlier files' events from that step on, so every
    step shows once, with the values of the run that went on. Call close() at the end: events
    reach the disk every 30 s and on close.
    """

    def __init__(self, workdir, resumed_step):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0
        self.tensorboard = None
        if not self.enabled:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                keep = [line for line in f if json.loads(line)["step"] <= resumed_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        self.tensorboard = tensorboardX.SummaryWriter(
            os.path.join(workdir, TENSORBOARD_DIR),
            purge_step=resumed_step + 1,
            flush_secs=30,
            # Event files are named by the second they are opened in, and a name in use is
            # overwritten; the zero-padded step keeps names distinct and in order (TensorBoard
            # reads a directory's files in name order) when a resume follows within a second.
            filename_suffix=f".step{resumed_step:09d}",
        )

    def write(self, record):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, record["step"])

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def progress_line(r):
    """One line of a record for the console: training figures, then evaluation's if any."""
    parts = [f"step {r['step']:6d}"]
    if "train/loss" in r:
        parts += [
            f"loss {r['train/loss']:.4f}",
            f"acc {r['train/accuracy']:.3f}",
            f"T {r['seq_len']}",
            f"{r['tokens_per_s']:,.0f} tok/s",
            f"{r['step_time_s'] * 1e3:.0f} ms/step",
        ]
    if "eval/accuracy" in r:
        parts += [f"eval loss {r['eval/loss']:.4f}", f"eval acc {r['eval/accuracy']:.3f}"]
    for key, name in (
        ("train/token_accuracy", "token acc"),
        ("eval/token_accuracy", "eval token acc"),
    ):
        if key in r:
            parts.append(f"{name} {r[key]:.3f}")
    return " | ".join(parts)
