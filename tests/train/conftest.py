"""Helpers the train tests share, taken as fixtures (test modules do not import conftest): batch
rows and their documents, and a reader of TensorBoard event files."""

import glob
import os
import struct
import types

import numpy as np
import pytest
from tensorboardX.proto import event_pb2


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


def tensorboard_scalars(logdir, tag):
    """([(step, value)] of `tag` as written, files in name order as TensorBoard reads them, and
    the same as TensorBoard shows it: a SessionLog.START at step s drops the points read before
    at steps >= s)."""
    written, shown = [], []
    for path in sorted(glob.glob(os.path.join(logdir, "*tfevents*"))):
        for event in _events(path):
            if event.session_log.status == event_pb2.SessionLog.START:
                shown = [(s, v) for s, v in shown if s < event.step]
            for value in event.summary.value:
                if value.tag == tag:
                    written.append((event.step, value.simple_value))
                    shown.append(written[-1])
    return written, shown


def _events(path):
    """The Events of a TFRecord file: records of length (8 bytes), its crc (4), data, crc (4)."""
    with open(path, "rb") as f:
        raw = f.read()
    at = 0
    while at < len(raw):
        (length,) = struct.unpack("<Q", raw[at : at + 8])
        yield event_pb2.Event.FromString(raw[at + 12 : at + 12 + length])
        at += 12 + length + 4


@pytest.fixture(scope="session")
def read_tensorboard():
    return tensorboard_scalars
