"""Helpers the train tests share, taken as fixtures (test modules do not import conftest): batch
rows and their documents, a reader of TensorBoard event files, small tokenizers."""

import glob
import json
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


def make_tokenizer(directory, bos):
    """A small byte-level BPE tokenizer (trained on a few lines of Python) saved as a Hugging Face
    tokenizer directory; with `bos`, it puts <s> (id 1) before every text, as Llama's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = ["def alpha(beta):\n    return beta + 1\n", "class Gamma:\n    delta = 'x'\n"] * 20
    tok.train_from_iterator(lines, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory):
    """{False: a tokenizer that adds no special token, True: one that adds BOS}."""
    root = tmp_path_factory.mktemp("tokenizers")
    return {bos: make_tokenizer(root / f"bos_{bos}", bos) for bos in (False, True)}
