"""2 processes x 4 CPU devices (jax.distributed, gloo) train exactly like 1 process x 8, started
as a SLURM job step starts them: no flags, JAX's cluster detection finds the processes, XLA_FLAGS
gives each its devices. The two processes pretend to be GPUs whose fused kernel fails its probe
on process 1 only (fake_gpu_train.py): both must run the same kernel (the XLA kernel).

One run of each kind serves every test (the runs take most of a minute each on 2 cores).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TRAIN = os.path.join(REPO, "experiments", "train.py")
# Rows over `data` (each process feeds its half of the batch), the sequence over `context`.
FLAGS = [
    f"--config={os.path.join(REPO, 'configs', 'default.py')}:test",
    "--config.num_train_steps=4",
    "--config.mesh.data=2",
    "--config.mesh.context=4",
]
# What a launcher may have left in this environment: the runs below say what they are.
LAUNCHERS = ("SLURM_", "OMPI_", "PMI_", "KUBERNETES_SERVICE_HOST", "JAX_COORDINATOR")


def launch(script, workdir, env, *extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHERS)} | env
    return subprocess.Popen(
        [sys.executable, script, f"--workdir={workdir}", *FLAGS, *extra],
        # This checkout's ringattn whatever is installed (an editable install may point elsewhere).
        env=dict(
            env,
            JAX_PLATFORMS="cpu",
            PYTHONPATH=os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p),
        ),
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


def slurm_step(i, port):
    """Process i of a 2-task SLURM job step on this machine, as srun would set it (the port:
    JAX's override of the one it derives from the job id)."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": str(i),
        "SLURM_LOCALID": str(i),
        "JAX_COORDINATOR_PORT": str(port),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(1-process workdir, its output, 2-process workdir, the 2 processes' outputs)."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    single = finish(launch(TRAIN, one, {"XLA_FLAGS": ""}, "--num_cpu_devices=8"))
    port = free_port()
    fake_gpu = os.path.join(HERE, "fake_gpu_train.py")
    procs = [launch(fake_gpu, two, slurm_step(i, port)) for i in range(2)]
    return one, single, two, [finish(p) for p in procs]


@pytest.mark.slow
def test_slurm_step_trains_like_one_process(runs):
    one, single, two, outs = runs
    assert "8 devices, 1 process(es)" in single
    assert "8 devices, 2 process(es)" in outs[0]
    assert len(losses(one)) == 4
    # gloo's cross-process all-reduce adds in another order than XLA:CPU's in-process one: the
    # losses agree to float32 rounding, not bit for bit.
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-6)


@pytest.mark.slow
def test_processes_agree_on_the_kernel(runs):
    *_, outs = runs
    for out in outs:  # every process says which process refused which kernel, and why
        assert "kernel 'pallas_gpu' failed its check" in out, out[-3000:]
        assert "on 1 of 2 processes (process 1 (" in out, out[-3000:]
        assert "does not compile on this host" in out, out[-3000:]
        assert "kernels run: ['Xla']" in out, out[-3000:]
