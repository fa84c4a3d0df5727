"""The training mesh (data, fsdp, tensor, context), logical axis rules and multi-host start-up.

Parameters and activations name their dimensions logically ("embed", "heads", "act_length" ...);
the rules map those names to mesh axes, so one model serves every parallelism layout. Mesh axes
are Auto: jit's partitioner places what the rules leave open, and shard_map takes over inside
attention.
"""

from __future__ import annotations

import math
import os
import re

import jax
import numpy as np
from absl import flags, logging
from jax.sharding import AxisType

MESH_AXES = ("data", "fsdp", "tensor", "context")

# Parameters: fsdp shards the embedding dimension, tensor the heads / MLP / vocabulary.
# Activations ("act_*"): the batch over (data, fsdp), the sequence over context.
DEFAULT_RULES = (
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("act_batch", ("data", "fsdp")),
    ("act_length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # The tiled loss (ringattn/train/loss.py): a tile's vocabulary is split over the devices that
    # split the vocabulary and those that split the sequence (the tile's tokens gathered).
    ("loss_vocab", ("tensor", "context")),
)


def mesh_shape(shape: dict, num_devices: int) -> dict:
    """`shape` (axis -> size, one size may be -1: all remaining devices) resolved and checked."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axes {sorted(unknown)}; the axes are {MESH_AXES}.")
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {free}.")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh: {num_devices} devices do not divide into the fixed axes {sizes}."
            )
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh: the axis sizes {sizes} multiply to {math.prod(sizes.values())}, but there are "
            f"{num_devices} devices."
        )
    return sizes


def make_mesh(shape: dict, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor, context) mesh with Auto axes over `devices` (default: all)."""
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(shape, len(devices))
    return jax.make_mesh(
        tuple(sizes.values()),
        MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def mesh_axes_for(rules, logical: str):
    """The mesh axes `rules` give to the logical name `logical` (a tuple; empty if none)."""
    for name, axes in rules:
        if name == logical:
            if axes is None:
                return ()
            return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)
    return ()


def cpu_device_count(num_cpu_devices=None) -> int:
    """Simulated CPU devices for this process: `num_cpu_devices` when given, else the count
    XLA_FLAGS sets (--xla_force_host_platform_device_count), else 8."""
    if num_cpu_devices is not None:
        return int(num_cpu_devices)
    found = re.findall(
        r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", "")
    )
    return int(found[-1]) if found else 8


def start_entrypoint(num_cpu_devices=None):
    """What every absl entrypoint does first, once its flags are parsed: warnings, not library
    INFO logs (Orbax's), unless `-v` / `--verbosity` asks for them (absl sets an unset verbosity
    to INFO); and the simulated CPU devices (`cpu_device_count`; ignored on accelerators), which
    must be set before JAX's backend starts."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    jax.config.update("jax_num_cpu_devices", cpu_device_count(num_cpu_devices))


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
    """Start JAX's distributed runtime: explicit flags, or JAX's own cluster detection when only
    some are given (SLURM, TPU pods ...). On CPU the cross-process collectives use gloo."""
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


def detected_cluster():
    """The cluster environment JAX's own detection finds (the one `jax.distributed.initialize()`
    without arguments would use: SLURM, Open MPI, Cloud TPU, Kubernetes ...), or None.

    JAX keeps its detectors in `jax._src.clusters` (subclasses of ClusterEnv, each with an
    `is_env_present`), the same in JAX 0.10 and 0.11; where a JAX moved them this finds none and
    says so, and `--distributed=on` still asks JAX itself."""
    try:
        from jax._src import clusters

        envs = list(clusters.ClusterEnv._cluster_types)
    except (ImportError, AttributeError) as e:
        logging.warning(
            "JAX %s keeps no cluster detectors where ringattn looks (%s): not starting "
            "jax.distributed; pass --distributed=on on a cluster.",
            jax.__version__,
            e,
        )
        return None
    for env in envs:  # JAX's order; opt-in detectors (mpi4py) only when asked for by name
        if not getattr(env, "opt_in_only_method", False) and _present(env):
            return env
    return None


def _present(env):
    try:
        return bool(env.is_env_present())
    except Exception as e:  # noqa: BLE001 - a detector that breaks detects nothing
        logging.warning("JAX's %s cluster detection failed: %r", env.__name__, e)
        return False


DISTRIBUTED = ("auto", "on", "off")


def start_distributed(mode="auto", coordinator_address=None, num_processes=None, process_id=None):
    """Start jax.distributed as `mode` says; returns whether it runs. "off": never (one process);
    "on": always (the arguments given, JAX's cluster detection for the others); "auto": when any
    argument is given, or when JAX's detection finds a cluster of more than one process (a
    one-task SLURM job is a single process: JAX would also hide all but one of its GPUs)."""
    if mode not in DISTRIBUTED:
        raise ValueError(f"start_distributed: `mode` must be one of {DISTRIBUTED}, got {mode!r}.")
    given = dict(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    given = {k: v for k, v in given.items() if v is not None}
    if mode == "off":
        if given:
            raise ValueError(
                f"start_distributed: mode 'off' runs one process, but {sorted(given)} were given."
            )
        return False
    if getattr(jax.distributed, "is_initialized", lambda: False)():
        return True
    if mode == "auto" and not given:
        env = detected_cluster()
        if env is None or _process_count(env) == 1:
            return False
        logging.info("jax.distributed: %s detected.", env.__name__)
    initialize_distributed(coordinator_address, num_processes, process_id)
    return True


def _process_count(env):
    """The number of processes a detected cluster reports (None where it cannot say now)."""
    try:
        return int(env.get_process_count())
    except Exception:  # noqa: BLE001 - jax.distributed.initialize reports it properly
        return None


def local_rows(sharding, shape) -> np.ndarray:
    """The rows (dimension 0) of a global array of `shape` that this process's devices hold."""
    rows = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        rows.update(range(*index[0].indices(shape[0])))
    return np.array(sorted(rows))
