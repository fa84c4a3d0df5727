"""Multi-host start-up (ringattn/mesh.py): when jax.distributed starts (JAX's own cluster
detection, here a SLURM step's environment), and how many CPU devices a process simulates. The
start itself is recorded, not made: tests/train/multihost_test.py starts real processes."""

import pytest
from jax._src import clusters

from ringattn import mesh

SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "node[003-004]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
}


@pytest.fixture
def starts(monkeypatch):
    """The calls start_distributed makes to start JAX's runtime, in a bare environment."""
    for name in ("OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST", *SLURM):
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(mesh, "initialize_distributed", lambda *a: calls.append(a))
    return calls


def test_auto_starts_on_a_detected_cluster_only(starts, monkeypatch):
    assert mesh.detected_cluster() is None
    assert not mesh.start_distributed("auto") and starts == []  # a single machine
    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)
    assert mesh.detected_cluster().__name__ == "SlurmCluster"
    assert mesh.start_distributed("auto") and starts == [(None, None, None)]  # JAX fills them
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: one process, all its devices
    assert not mesh.start_distributed("auto") and len(starts) == 1


def test_flags_and_modes(starts):
    assert mesh.start_distributed("auto", "10.0.0.1:1234", 2, 0)
    assert mesh.start_distributed("on")  # no cluster found: JAX says what is missing
    assert starts == [("10.0.0.1:1234", 2, 0), (None, None, None)]
    assert not mesh.start_distributed("off")
    with pytest.raises(ValueError, match=r"mode 'off' runs one process, but \['process_id'\]"):
        mesh.start_distributed("off", process_id=1)
    with pytest.raises(ValueError, match=r"`mode` must be one of \('auto', 'on', 'off'\), got 'y"):
        mesh.start_distributed("yes")


def test_without_jax_detectors_nothing_is_detected(starts, monkeypatch):
    monkeypatch.delattr(clusters.ClusterEnv, "_cluster_types")
    assert mesh.detected_cluster() is None
    assert not mesh.start_distributed("auto") and starts == []


def test_cpu_device_count_follows_the_flag_then_xla_flags(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert mesh.cpu_device_count() == 8
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1 --xla_force_host_platform_device_count=4")
    assert mesh.cpu_device_count() == 4
    assert mesh.cpu_device_count(2) == 2
