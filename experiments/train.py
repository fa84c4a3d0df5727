"""Train a long-context LM (default: passkey retrieval with ring attention on every device).

  python experiments/train.py --workdir=/tmp/passkey
  python experiments/train.py --workdir=/tmp/x --config=configs/default.py:long
  python experiments/train.py --workdir=/tmp/x --config=configs/default.py:7b_1m --dry_run

Rerunning a command resumes from the newest checkpoint in --workdir. Multi-host: the same command
on every process; where JAX detects the cluster itself (SLURM, Open MPI, Cloud TPU, Kubernetes)
that is all, elsewhere pass --coordinator_address, --num_processes and --process_id
(README: Multi-host).

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
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Start jax.distributed: auto (when the flags below are given or JAX detects a cluster of "
    "several processes: SLURM, Open MPI, Cloud TPU, Kubernetes), on, off.",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices",
    None,
    "Simulated devices per process when running on CPU (default: XLA_FLAGS' "
    "--xla_force_host_platform_device_count, else 8); with --dry_run, the devices of a mesh "
    "with an axis of -1.",
)


def main(argv):
    del argv
    import jax

    from ringattn.mesh import start_distributed, start_entrypoint

    config = _CONFIG.value
    if _DRY_RUN.value:  # the whole mesh, simulated, in this process alone
        jax.config.update("jax_platforms", "cpu")
        sizes = list(config.mesh.values())
        # An axis of -1 (the devices left) takes --num_cpu_devices (default 8) simulated ones.
        start_entrypoint(_CPU_DEVICES.value if -1 in sizes else math.prod(sizes))
    else:
        start_entrypoint(_CPU_DEVICES.value)
        try:
            start_distributed(
                _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
            )
        except ValueError as e:
            raise app.UsageError(str(e)) from e

    from ringattn.train import trainer

    if _DRY_RUN.value:
        print(json.dumps(trainer.dry_run(config), indent=1))
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required.")
    trainer.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
