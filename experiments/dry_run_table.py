"""Per-device memory at pod scale, before (plain loss) and after (tiled loss): Llama-3-8B
(configs/default.py:llama3_8b_128k) at 128K tokens on 32 devices and at 1M tokens on 256, each
tensor x context and pure context parallel. Every case is one `experiments/train.py --dry_run`
(a compiled train step on simulated CPU devices, nothing allocated), run twice: as XLA's CPU
backend compiles it, and with its while-loop-invariant code motion off (XLA_FLAGS), for
comparison: that pass used to hoist a float32 copy of the layers' whole stacked bfloat16 inputs
out of the backward loop (+16 GiB at 128K), which the layers now avoid by saving those inputs as
raw bits (ringattn/nn/remat.py).

  python experiments/dry_run_table.py --out=experiments/results/real_model/finetune
  python experiments/dry_run_table.py --out=/tmp/t --cases=128k_tp8_cp4   # one case

Writes <out>/dry_runs.jsonl (every report, ringattn/train/memory.py) and <out>/dry_runs.md.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

from ringattn.train import memory

HERE = os.path.dirname(os.path.abspath(__file__))
SHORT = "configs/default.py:llama3_8b_128k"
CONFIG = os.path.join(os.path.dirname(HERE), SHORT)
# name -> (what, overrides). Loss tiles (ringattn/train/loss.py): at 128K, the config's 16384
# tokens a row; at 1M, tensor x context: 131072 (each device its 4096 tokens of a tile, V / 8),
# context 256: the config's 16384 (each device every token of a tile, V / 256).
CASES = {
    "128k_tp8_cp4": ("128K tokens, 32 devices: tensor 8 x context 4", []),
    "128k_cp32": (
        "128K tokens, 32 devices: context 32",
        ["--config.mesh.tensor=1", "--config.mesh.context=32"],
    ),
    "1m_tp8_cp32": (
        "1M tokens, 256 devices: tensor 8 x context 32",
        ["--config.seq_len=1048576", "--config.mesh.context=32", "--config.loss_chunk_size=131072"],
    ),
    "1m_cp256": (
        "1M tokens, 256 devices: context 256",
        ["--config.seq_len=1048576", "--config.mesh.tensor=1", "--config.mesh.context=256"],
    ),
}  # fmt: skip
NO_LICM = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"

_OUT = flags.DEFINE_string("out", None, "Directory for dry_runs.jsonl and dry_runs.md.")
_CASES = flags.DEFINE_list("cases", list(CASES), f"Which of {list(CASES)}.")


def dry_run(overrides, xla_flags):
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(HERE, "train.py"), f"--config={CONFIG}", "--dry_run"]
    out = subprocess.run([*cmd, *overrides], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd + overrides)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout[out.stdout.index("{") :])


def main(argv):
    del argv
    if not _OUT.value:
        raise app.UsageError("--out is required.")
    os.makedirs(_OUT.value, exist_ok=True)
    rows = []
    with open(os.path.join(_OUT.value, "dry_runs.jsonl"), "w") as f:
        for name in _CASES.value:
            what, overrides = CASES[name]
            for loss, extra in (("plain", ["--config.loss_chunk_size=0"]), ("tiled", [])):
                for xla, xla_flags in (("as compiled", ""), ("no LICM", NO_LICM)):
                    report = dry_run(overrides + extra, xla_flags)
                    env = f"XLA_FLAGS={xla_flags} " if xla_flags else ""
                    command = f"{env}python experiments/train.py --config={SHORT} --dry_run"
                    command = " ".join([command, *overrides, *extra])
                    report.update(case=name, what=what, loss=loss, xla=xla, command=command)
                    f.write(json.dumps(report) + "\n")
                    f.flush()
                    rows.append(report)
                    print(memory.table_row(report), flush=True)
    with open(os.path.join(_OUT.value, "dry_runs.md"), "w") as f:
        f.write(memory.table(rows))


if __name__ == "__main__":
    app.run(main)
