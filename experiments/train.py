"""Train a long-context LM (default: passkey retrieval with ring attention on every device).

  python experiments/train.py --workdir=/tmp/passkey
  python experiments/train.py --workdir=/tmp/x --config=configs/default.py:long
  python experiments/train.py --workdir=/tmp/x --config=configs/default.py:7b_1m --dry_run

Rerunning a command resumes from the newest checkpoint in --workdir. Multi-host: pass
--coordinator_address, --num_processes and --process_id on every host (or none of them where
JAX detects the cluster itself, e.g. SLURM, TPU pods).

Output: progress and evaluation lines, and warnings; libraries' INFO logs (Orbax's ~60 lines per
checkpoint, JAX's backend probe) only with absl's `-v 0` (`--verbosity=0`). Metrics also go to
<workdir>/metrics.jsonl and <workdir>/tensorboard/ (`tensorboard --logdir=<workdir>`).
"""

import json
import math
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "configs", "default.py"),
    "Experiment config file, optionally with a variant: configs/default.py:long.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Checkpoints, metrics.jsonl and tensorboard/ go here."
)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Compile one train step on simulated CPU devices and print per-device memory."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", 8, "Simulated devices per process when running on CPU."
)


def main(argv):
    del argv
    import jax

    from ringattn.mesh import start_entrypoint

    config = _CONFIG.value
    if _DRY_RUN.value:  # the whole mesh, simulated
        jax.config.update("jax_platforms", "cpu")
        start_entrypoint(math.prod(max(s, 1) for s in config.mesh.values()))
    else:
        start_entrypoint(_CPU_DEVICES.value)
    distributed = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if any(x is not None for x in distributed):
        from ringattn.mesh import initialize_distributed

        initialize_distributed(*distributed)

    from ringattn.train import trainer

    if _DRY_RUN.value:
        print(json.dumps(trainer.dry_run(config), indent=1))
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required.")
    trainer.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
