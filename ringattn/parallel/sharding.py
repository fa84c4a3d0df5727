"""Placing arrays on a mesh, whatever its axis types: the one helper every global entry point
(context-parallel attention, the sharded KV cache, chunked prefill) uses.

JAX has two ways to ask for a sharding and each works on one kind of mesh axis: `jax.reshard` on
Explicit axes (the sharding is part of the array's type), `with_sharding_constraint` on Auto ones
(a hint to the partitioner). `place` picks per call from the axes the spec names.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P


def explicitly_sharded(x):
    """Whether x's type carries a sharding (Explicit mesh axes)."""
    return any(entry is not None for entry in getattr(jax.typeof(x).sharding, "spec", ()))


def _axes(entry):
    return () if entry is None else tuple(np.atleast_1d(entry))


def place(x, mesh, spec):
    """`x` sharded as `spec` on `mesh`: resharded over the spec's Explicit axes (or to
    replicated, when it names none and the mesh has Explicit axes), else constrained over its Auto
    axes. A spec that names both kinds is resharded over its Explicit axes and leaves the Auto
    ones to the partitioner (each kind of request fails on the other kind of axis)."""
    types = zip(mesh.axis_names, mesh.axis_types, strict=True)
    explicit = {a for a, t in types if t == AxisType.Explicit}
    used = [a for entry in spec for a in _axes(entry)]
    if any(a in explicit for a in used) or (not used and explicit):
        only = [tuple(a for a in _axes(e) if a in explicit) or None for e in spec]
        return jax.reshard(x, NamedSharding(mesh, P(*only)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def run_mesh(mesh, *arrays):
    """The mesh a global entry point computes on: `mesh`, or its devices with Auto axes when its
    axes are Explicit but the caller is not sharding explicitly (no `jax.set_mesh` context and no
    input whose type is sharded). Explicit axes put shardings in the results' types, and a
    caller who passed plain arrays gets plain-typed results, as from dense attention (JAX's eager
    grad cannot differentiate an Explicit-typed result outside `jax.set_mesh`)."""
    if AxisType.Explicit not in mesh.axis_types:
        return mesh
    if not jax.sharding.get_abstract_mesh().empty or any(map(explicitly_sharded, arrays)):
        return mesh
    auto = (AxisType.Auto,) * len(mesh.axis_names)
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def check_bound(fn, axis_name, global_fn):
    """`fn` runs on local shards: every axis `axis_name` names must be bound by an enclosing
    `jax.shard_map`, else a ValueError says so (JAX's own error is a bare NameError)."""
    names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
    for a in names:
        try:
            jax.lax.axis_size(a)
        except NameError:
            raise ValueError(
                f"{fn}: mesh axis {a!r} (`axis_name`) is not bound here. {fn} runs on this "
                f"device's shards: call it inside `jax.shard_map` over a mesh with that axis, "
                f"or call `{global_fn}` on global arrays."
            ) from None
