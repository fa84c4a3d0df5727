"""2 processes x 4 CPU devices (jax.distributed, gloo) train exactly like 1 process x 8."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "experiments", "train.py")
# Rows over `data` (each process feeds its half of the batch), the sequence over `context`.
FLAGS = [
    f"--config={os.path.join(REPO, 'configs', 'default.py')}:test",
    "--config.num_train_steps=4",
    "--config.mesh.data=2",
    "--config.mesh.context=4",
]


def launch(workdir, *extra):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, TRAIN, f"--workdir={workdir}", *FLAGS, *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc):
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["train/loss"] for line in f]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    one = tmp_path / "one"
    finish(launch(one, "--num_cpu_devices=8"))

    two = tmp_path / "two"
    address = f"127.0.0.1:{free_port()}"
    procs = [
        launch(
            two,
            "--num_cpu_devices=4",
            f"--coordinator_address={address}",
            "--num_processes=2",
            f"--process_id={i}",
        )
        for i in range(2)
    ]
    outs = [finish(p) for p in procs]
    assert "8 devices, 2 process(es)" in outs[0]
    assert len(losses(one)) == 4
    # gloo's cross-process all-reduce adds in another order than XLA:CPU's in-process one: the
    # losses agree to float32 rounding, not bit for bit.
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-6)
