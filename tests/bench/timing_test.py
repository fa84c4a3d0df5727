"""The benchmarks' one timer: calls in turns, round after round; medians (or the best); warm-up
and fresh arguments outside the timing; compiled memory."""

import time

import jax.numpy as jnp
import pytest

from ringattn.bench import timing


def test_calls_take_turns_and_the_median_is_reported():
    order, sleeps = [], {"a": [0.2, 0.001, 0.002], "b": [0.0, 0.0, 0.2]}

    def call(name):
        def run():
            order.append(name)
            time.sleep(sleeps[name].pop(0))

        return run

    times = timing.interleaved({"a": call("a"), "b": call("b")}, 3)
    assert order == ["a", "b"] * 3
    assert 0.002 <= times["a"] < 0.1 and times["b"] < 0.1  # the middle one of three


def test_best_warmup_and_fresh_arguments():
    seen, made = [], []

    def make():
        made.append(len(seen))  # before the run it feeds
        time.sleep(0.2)  # outside the timing
        return (len(made),)

    times = timing.interleaved(
        {"x": lambda i: seen.append(i)}, 3, warmup=2, best=True, fresh_args={"x": make}
    )
    assert seen == [1, 2, 3, 4, 5] and made == [0, 1, 2, 3, 4]
    assert times["x"] < 0.1


def test_rounds_must_be_positive():
    with pytest.raises(ValueError, match="`rounds` must be >= 1, got 0"):
        timing.interleaved({"x": lambda: None}, 0)


def test_compile_once_reports_memory():
    x = jnp.ones((64, 64), jnp.float32)
    compiled, info = timing.compile_once(lambda a: (a @ a).sum(), (x,))
    assert float(compiled(x)) == 64.0 * 64 * 64
    assert info["compile_s"] > 0 and info["arg_bytes"] == 64 * 64 * 4 and info["out_bytes"] == 4
