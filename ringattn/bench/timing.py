"""The one timer of the benchmarks and gpu_check: compiled calls taking turns, round after round, so
that load from other processes and clock changes fall on all of them alike and their ratios stay
meaningful on a shared machine; the median (or the best) of each call's rounds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import jax


def interleaved(
    calls: Mapping[str, Callable],
    rounds: int,
    *,
    warmup: int = 0,
    best: bool = False,
    fresh_args: Mapping[str, Callable[[], tuple]] | None = None,
) -> dict[str, float]:
    """Seconds per call of each of `calls` (name -> fn): after `warmup` untimed runs each, the
    calls run in turns for `rounds` rounds; the median of each one's runs (the minimum with
    `best`). `fresh_args` (name -> fn() -> arguments) builds a call's arguments before each run,
    outside the timing: buffers that the call donates."""
    if rounds < 1:
        raise ValueError(f"interleaved: `rounds` must be >= 1, got {rounds}")
    fresh_args = fresh_args or {}

    def once(name):
        args = fresh_args[name]() if name in fresh_args else ()
        t0 = time.perf_counter()
        jax.block_until_ready(calls[name](*args))
        return time.perf_counter() - t0

    for name in calls:
        for _ in range(warmup):
            once(name)
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name in calls:
            times[name].append(once(name))
    summary = min if best else statistics.median
    return {name: summary(ts) for name, ts in times.items()}


def compile_once(fn: Callable, args) -> tuple[Callable, dict]:
    """jax.jit(fn) compiled for `args` (arrays or ShapeDtypeStructs) and {compile_s, and where XLA
    reports them temp_bytes, arg_bytes, out_bytes: one device's compiled memory}."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    result = {"compile_s": time.perf_counter() - t0}
    mem = compiled.memory_analysis()
    if mem is not None:
        result.update(
            temp_bytes=int(mem.temp_size_in_bytes),
            arg_bytes=int(mem.argument_size_in_bytes),
            out_bytes=int(mem.output_size_in_bytes),
        )
    return compiled, result
