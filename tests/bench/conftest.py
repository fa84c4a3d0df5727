"""Tests marked `gpu` or `tpu` (pytest.ini) run only where JAX has such a device: `pytest -m gpu`
on a lent GPU machine; everywhere else they are skipped, saying why."""

import functools

import jax
import pytest

DEVICE_MARKERS = ("gpu", "tpu")


@functools.cache
def _has(platform):
    try:
        return bool(jax.devices(platform))
    except RuntimeError:  # no such backend in this JAX, or it failed to start
        return False


def pytest_runtest_setup(item):
    for marker in DEVICE_MARKERS:
        if item.get_closest_marker(marker) and not _has(marker):
            pytest.skip(f"marked {marker}: JAX has no {marker.upper()} device here")
