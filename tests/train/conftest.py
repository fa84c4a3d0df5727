"""Helpers the data tests share, taken as a fixture (test modules do not import conftest)."""

import types

import numpy as np
import pytest


def segments(row):
    """(start, stop) of each document of a batch row (a dict of [T] arrays)."""
    seg = row["segment_ids"]
    starts = np.flatnonzero(np.diff(seg, prepend=-1))
    return [(s, e) for s, e in zip(starts, [*starts[1:], len(seg)], strict=True) if seg[s]]


def row_of(batch, b):
    """Row b of a batch, as a dict of [T] arrays."""
    return {k: v[b] for k, v in batch.items()}


@pytest.fixture(scope="session")
def rows():
    return types.SimpleNamespace(segments=segments, row_of=row_of)
