"""The benchmark modules that moved from ringattn.evals to ringattn.bench keep working from their
old paths for one release, with a DeprecationWarning naming the new one."""

import importlib

import pytest

MOVED = {
    "ringattn.evals.bench": ("ringattn.bench.decode", "decode_throughput"),
    "ringattn.evals.prefill_bench": ("ringattn.bench.prefill", "chunked_vs_whole"),
    "ringattn.evals.hf_bench": ("ringattn.bench.hf", "hf_throughput"),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_warns_and_gives_the_moved_name(old):
    new, name = MOVED[old]
    module = importlib.import_module(old)
    with pytest.warns(
        DeprecationWarning, match=rf"{old}\.{name} is deprecated .* use {new}\.{name}"
    ):
        got = getattr(module, name)
    assert got is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        module.nothing  # noqa: B018
