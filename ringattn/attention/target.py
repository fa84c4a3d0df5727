"""Lowering for another platform than the one this runs on, and reading what a lowered program
calls.

JAX lowers a program for a platform it does not run on (`jax.jit(f).trace(*args).lower(
lowering_platforms=("tpu",))`), but tracing decides the kernels, and the kernel choice
(kernels/dispatch.py) reads the platform it runs on. Under `target_platform(name)` it reads
`name` instead and takes kernels on their static checks alone: the probe that compiles and runs
a kernel before its first use (kernels/probe.py) cannot run a program of another platform, so it
is skipped. So

    with ringattn.target_platform("tpu"):
        lowered = jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",))

gives the program a TPU would run, with the kernels kernel="auto" would pick there. Such a
program is for lowering only (jax.export too, which refuses Triton calls unless told not to
check them): run here, it fails where the other platform's kernels are lowered for this one.

The target is a JAX user context (`jax.make_user_context`): part of the key of every jitted
function's caches, so a function traced for one target (or for none) is traced again for
another, and local to the thread that sets it: other threads, where the probe runs and where
other work may be tracing at the same time, do not see it.
"""

from __future__ import annotations

import collections
import contextlib
import re
from typing import NamedTuple

import jax

# The platform names `lowering_platforms` takes, and what else users call them.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
ALIASES = {"gpu": "cuda"}

# Made once, at import: JAX asks that user contexts are not made while other threads use JAX.
_TARGET = jax.make_user_context(None)


@contextlib.contextmanager
def target_platform(name):
    """Trace attention for platform `name` ('cuda' (or 'gpu'), 'rocm', 'tpu' or 'cpu'; None: the
    platform this runs on), for lowering with `lowering_platforms=(name,)` (module docstring).
    Yields the platform's name as `lowering_platforms` takes it."""
    name = ALIASES.get(name, name)
    if name is not None and name not in PLATFORMS:
        raise ValueError(
            f"target_platform: `name` must be one of {PLATFORMS + tuple(ALIASES)} or None, got "
            f"{name!r}."
        )
    with _TARGET(name):
        yield name


def current():
    """The platform `target_platform` set in this thread, or None."""
    return _TARGET.value


class Call(NamedTuple):
    """A custom call of a lowered program: its target, the kernel it runs (Pallas names Triton
    kernels `name`, Mosaic kernels `kernel_name`; '' for other calls, cuDNN's among them) and
    whether it writes into one of its operands (a pass continuing a state or gradients)."""

    target: str
    kernel: str
    in_place: bool

    def __str__(self):
        return (self.kernel or self.target) + (" (in place)" if self.in_place else "")


_CALL = re.compile(r'stablehlo\.custom_call @([\w$.]+)\(|call_target_name = "([^"]+)"')
_KERNEL = re.compile(r'\b(?:kernel_)?name = "([^"]+)"')


def custom_calls(text):
    """Counter of the `Call`s in a lowered program's text (`lowered.as_text()`): occurrences in
    the text, so a call inside a loop, or in a function called twice, counts once."""
    calls = collections.Counter()
    for line in text.splitlines():
        call = _CALL.search(line)
        if call is None:
            continue
        kernel = _KERNEL.search(line, call.end())
        name = call.group(1) or call.group(2)
        calls[Call(name, kernel.group(1) if kernel else "", "output_operand_aliases" in line)] += 1
    return calls
