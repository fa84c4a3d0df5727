"""Dynamic promises a call makes about its values (positions that fit a cache, a cache bound),
checked where they can be: always in an eager call, and in traced code under a debug switch.

A promise that depends on array values cannot be checked while tracing. Eager calls (concrete
arrays) are checked at once and a broken promise raises a ValueError. Inside `jax.jit` (or a
`shard_map`) the check is added to the program only under `debug_checks()`, through
`jax.experimental.checkify`, so the traced function must be checkified:

    with ringattn.debug_checks():
        err, out = checkify.checkify(jax.jit(step))(params, batch, caches)
    err.throw()  # a ValueError-like JaxRuntimeError naming the broken promise

The switch is a JAX user context, part of every jitted function's cache key: a function traced
without it is traced again with it. RINGATTN_DEBUG_CHECKS=1 in the environment turns it on for a
whole run.
"""

from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

# Made once, at import: JAX asks that user contexts are not made while other threads use JAX.
_ENABLED = jax.make_user_context(os.environ.get("RINGATTN_DEBUG_CHECKS", "") == "1")


@contextlib.contextmanager
def debug_checks(enabled=True):
    """Inside: traced calls add their value checks to the program (module docstring)."""
    with _ENABLED(bool(enabled)):
        yield


def enabled() -> bool:
    return bool(_ENABLED.value)


def _traced(x):
    return isinstance(x, jax.core.Tracer)


def needed(*arrays) -> bool:
    """Whether a promise about `arrays` is checked: they are concrete, or the switch is on (so
    that traced code without the switch computes nothing for it)."""
    return enabled() or not any(map(_traced, arrays))


def check(fn, holds, message, **values):
    """Require `holds` (a bool array) everywhere. `message` may name `values` ({name}), arrays
    reduced to what the message shows (a max, a count)."""
    if not _traced(holds) and not any(map(_traced, values.values())):
        if not bool(np.all(np.asarray(holds))):
            shown = {k: np.asarray(v).item() for k, v in values.items()}
            raise ValueError(f"{fn}: {message.format(**shown)}")
    elif enabled():
        checkify.check(jnp.all(holds), f"{fn}: {message}", **values)
