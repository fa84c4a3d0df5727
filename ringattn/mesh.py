"""The training mesh (data, fsdp, tensor, context), logical axis rules and multi-host start-up.

Parameters and activations name their dimensions logically ("embed", "heads", "act_length" ...);
the rules map those names to mesh axes, so one model serves every parallelism layout. Mesh axes
are Auto: jit's partitioner places what the rules leave open, and shard_map takes over inside
attention.
"""

from __future__ import annotations

import math

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


def start_entrypoint(num_cpu_devices):
    """What every absl entrypoint does first, once its flags are parsed: warnings, not library
    INFO logs (Orbax's), unless `-v` / `--verbosity` asks for them (absl sets an unset verbosity
    to INFO); and `num_cpu_devices` simulated CPU devices (ignored on accelerators), which must be
    set before JAX's backend starts."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    jax.config.update("jax_num_cpu_devices", num_cpu_devices)


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


def local_rows(sharding, shape) -> np.ndarray:
    """The rows (dimension 0) of a global array of `shape` that this process's devices hold."""
    rows = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        rows.update(range(*index[0].indices(shape[0])))
    return np.array(sorted(rows))
