"""Batches: the format's invariants, determinism per row, the iterator's state and curriculum,
argument errors. Through the re-exports of `data`, which callers use."""

import json

import numpy as np
import pytest

from ringattn.train import data

SYNTHETIC = ("passkey", "multikey", "assoc_recall")
T = 256
# (task, params): every task, text with BOS-led documents, text in a tokenizer's tokens (one that
# adds BOS: the `tokenizer_dirs` fixture's, named by its key).
CASES = [*((task, {}) for task in (*SYNTHETIC, "text")), ("text", {"bos": True})]
CASES += [("text", {"tokenizer": False}), ("text", {"tokenizer": True})]


@pytest.fixture
def resolve(tokenizer_dirs):
    """A case's params with a tokenizer's key replaced by its directory."""
    return lambda p: p | ({"tokenizer": tokenizer_dirs[p["tokenizer"]]} if "tokenizer" in p else {})


def _batch(task, seq_len=T, index=0, **kw):
    return data.make_batch(task, seed=3, index=index, batch_size=3, seq_len=seq_len, **kw)


@pytest.mark.parametrize("task, params", CASES)
def test_format(task, params, rows, resolve):
    """Shapes and dtypes, and the invariants tying the six arrays together within documents."""
    params = resolve(params)
    batch = _batch(task, **params)
    assert set(batch) == set(data.BATCH_KEYS)
    dtypes = dict(inputs=np.int32, targets=np.int32, weights=np.float32, positions=np.int32,
                  segment_ids=np.int32, answer_mask=np.bool_)  # fmt: skip
    for key, dtype in dtypes.items():
        assert batch[key].shape == (3, T) and batch[key].dtype == dtype, key
    assert batch["inputs"].max() < (300 if "tokenizer" in params else data.VOCAB_SIZE)
    for b in range(3):
        row = rows.row_of(batch, b)
        segments = rows.segments(row)
        assert [row["segment_ids"][s] for s, _ in segments] == list(range(1, len(segments) + 1))
        covered = np.zeros(T, bool)
        for s, e in segments:
            covered[s:e] = True
            np.testing.assert_array_equal(row["positions"][s:e], np.arange(e - s))
            np.testing.assert_array_equal(row["targets"][s : e - 1], row["inputs"][s + 1 : e])
            assert (row["weights"][s : e - 1] > 0).all()
            assert row["targets"][e - 1] == 0 and row["weights"][e - 1] == 0  # document end
            assert not row["answer_mask"][e - 1]
            assert (row["inputs"][s:e] != data.PAD).all()
        for key in ("inputs", "targets", "weights", "positions", "answer_mask"):
            assert not row[key][~covered].any(), f"{key} nonzero on padding"
    if task in SYNTHETIC:  # one document filling each row
        np.testing.assert_array_equal(batch["segment_ids"], 1)
        np.testing.assert_array_equal(batch["positions"], np.broadcast_to(np.arange(T), (3, T)))
        assert batch["answer_mask"].any(axis=1).all()
    else:
        assert not batch["answer_mask"].any()


@pytest.mark.parametrize("task, params", CASES)
def test_deterministic(task, params, resolve):
    params = resolve(params)
    a, b = _batch(task, **params), _batch(task, **params)
    for key in data.BATCH_KEYS:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["inputs"], _batch(task, index=1, **params)["inputs"])
    assert not np.array_equal(a["inputs"][0], a["inputs"][1])  # rows differ too
    # Any subset of rows is the same rows of the full batch.
    for rows, want in (([2, 0], [2, 0]), (slice(1, None), [1, 2])):
        part = _batch(task, rows=rows, **params)
        for key in data.BATCH_KEYS:
            np.testing.assert_array_equal(part[key], a[key][want])
    assert _batch(task, rows=[], **params)["inputs"].shape == (0, T)


def test_iterator_state_round_trip():
    params = {"num_pairs": 4}
    it = data.DataIterator("assoc_recall", 2, 5, ((0, 64), (3, 96)), params)
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["index"] == 2
    expected = [next(it) for _ in range(3)]
    restored = data.DataIterator("assoc_recall", 2, 5, ((0, 64), (3, 96)), params)
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for key in data.BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key])
    with pytest.raises(ValueError, match="seed"):
        data.DataIterator("assoc_recall", 2, 6, 64, params).set_state(state)


def test_curriculum():
    it = data.DataIterator("passkey", 2, 0, ((0, 128), (2, 256), (5, 512)))
    assert [it.seq_len_at(i) for i in (0, 1, 2, 4, 5, 100)] == [128, 128, 256, 256, 512, 512]
    shapes = [next(it)["inputs"].shape for _ in range(6)]
    assert shapes == [(2, 128)] * 2 + [(2, 256)] * 3 + [(2, 512)]
    # Batch 3 is the same batch whether reached by iterating or built directly.
    it.set_state({"index": 3})
    direct = data.make_batch("passkey", seed=0, index=3, batch_size=2, seq_len=256)
    np.testing.assert_array_equal(next(it)["inputs"], direct["inputs"])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: _batch("passkeys"), ValueError, r"`task`.*'passkey'.*'text'"),
        (lambda: _batch("passkey", seq_len=60), ValueError, "`seq_len` must be at least"),
        (lambda: _batch("multikey", seq_len=100), ValueError, "`seq_len` must be at least"),
        (lambda: _batch("assoc_recall", seq_len=40), ValueError, "`seq_len` must be at least"),
        (lambda: _batch("passkey", seq_len=0), ValueError, "`seq_len`"),
        (lambda: _batch("passkey", depth=1.5), ValueError, "`depth`"),
        (lambda: _batch("passkey", min_digits=6, max_digits=5), ValueError, "`max_digits`"),
        (lambda: _batch("passkey", bogus=1), TypeError, "bogus"),
        (lambda: _batch("multikey", num_keys=17), ValueError, "`num_keys`"),
        (lambda: _batch("assoc_recall", num_pairs=30, key_len=1), ValueError, "`num_pairs`"),
        (lambda: _batch("text", split="test"), ValueError, "`split`"),
        (lambda: _batch("text", data_dir="/nonexistent"), ValueError, "`data_dir`"),
        (lambda: _batch("passkey", rows=[3]), ValueError, "`rows`"),
        (lambda: _batch("passkey", index=-1), ValueError, "`index`"),
        (lambda: _batch("passkey", index=1.0), TypeError, "`index`"),
        (lambda: data.DataIterator("passkey", 2, 0, ()), ValueError, "empty"),
        (lambda: data.DataIterator("passkey", 2, 0, ((1, 128),)), ValueError, "step 0"),
        (lambda: data.DataIterator("passkey", 2, 0, ((0, 128), (0, 256))), ValueError, "increas"),
        (lambda: data.DataIterator("passkey", 2, 0, [(0, 128.0)]), TypeError, "seq_len_schedule"),
        # A curriculum stage too short for the task fails when the iterator is built.
        (lambda: data.DataIterator("passkey", 2, 0, ((0, 128), (9, 50))), ValueError, "seq_len"),
        (lambda: data.DataIterator("passkey", 2, 0, 128).set_state({}), TypeError, "`state`"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
