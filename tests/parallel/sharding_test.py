"""sharding.place on every kind of mesh axis: Explicit, Auto and mixed meshes, each spec kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from ringattn.parallel import sharding

E, A = AxisType.Explicit, AxisType.Auto


@pytest.mark.parametrize("types", [(E, E), (A, A), (E, A), (A, E)], ids=str)
@pytest.mark.parametrize("spec", [P(None, "y"), P("x"), P(), P("x", "y")], ids=str)
def test_place_works_on_every_mesh(types, spec):
    """Placed inside jit, plain and sharded inputs alike; values unchanged, and on Explicit
    axes the result's type carries the requested sharding."""
    mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=types)
    x = jnp.arange(64.0).reshape(8, 8)
    sharded = jax.device_put(x, NamedSharding(mesh, P("x", "y")))
    for arg in (x, sharded):
        with jax.set_mesh(mesh):
            out = jax.jit(lambda a: sharding.place(a, mesh, spec))(arg)  # noqa: B023
        np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
        explicit = [a for a, t in zip(("x", "y"), types, strict=True) if t == E]
        if all(e in explicit for e in spec if e is not None) and any(e is not None for e in spec):
            full = tuple(spec) + (None,) * (2 - len(spec))
            assert tuple(jax.typeof(out).sharding.spec) == full
