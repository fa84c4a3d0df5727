"""Training data: batch format, determinism, curriculum and state, tasks' answers, packing, text."""

import json
import re
import zlib

import numpy as np
import pytest

from ringattn.train import data

SYNTHETIC = ("passkey", "multikey", "assoc_recall")
T = 256


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """40 small files (10 to 250 bytes: some exceed seq_len 64) and one that does not match."""
    root = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(0)
    for i in range(40):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(exist_ok=True)
        words = rng.choice(["alpha", "beta", "gamma", "delta", "\n"], size=1 + i)
        (sub / f"mod{i}.py").write_text(f"# file {i}\n" + " ".join(words))
    (root / "notes.txt").write_text("not python")
    return root


def _files(root):
    return {p.read_bytes() for p in root.rglob("*.py")}


def _batch(task, seq_len=T, index=0, **kw):
    return data.make_batch(task, seed=3, index=index, batch_size=3, seq_len=seq_len, **kw)


def _segments(row):
    """(start, stop) of each document of a batch row."""
    seg = row["segment_ids"]
    starts = np.flatnonzero(np.diff(seg, prepend=-1))
    return [(s, e) for s, e in zip(starts, [*starts[1:], len(seg)], strict=True) if seg[s]]


def _row(batch, b):
    return {k: v[b] for k, v in batch.items()}


def test_encode_decode():
    text = "héllo, wörld ✓"
    tokens = data.encode(text)
    assert tokens.dtype == np.int32 and len(tokens) == len(text.encode())
    assert data.decode(np.concatenate([[0, 0], tokens, [0]])) == text
    assert data.decode(tokens[:2]) == "h\ufffd"  # a cut multi-byte character is replaced
    with pytest.raises(ValueError, match="`text`"):
        data.encode("a\0b")


@pytest.mark.parametrize("task", [*SYNTHETIC, "text"])
def test_format(task):
    """Shapes and dtypes, and the invariants tying the six arrays together within documents."""
    batch = _batch(task)
    assert set(batch) == set(data.BATCH_KEYS)
    dtypes = dict(inputs=np.int32, targets=np.int32, weights=np.float32, positions=np.int32,
                  segment_ids=np.int32, answer_mask=np.bool_)  # fmt: skip
    for key, dtype in dtypes.items():
        assert batch[key].shape == (3, T) and batch[key].dtype == dtype, key
    assert batch["inputs"].max() < data.VOCAB_SIZE
    for b in range(3):
        row = _row(batch, b)
        segments = _segments(row)
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


@pytest.mark.parametrize("task", [*SYNTHETIC, "text"])
def test_deterministic(task):
    a, b = _batch(task), _batch(task)
    for key in data.BATCH_KEYS:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["inputs"], _batch(task, index=1)["inputs"])
    assert not np.array_equal(a["inputs"][0], a["inputs"][1])  # rows differ too
    # Any subset of rows is the same rows of the full batch.
    for rows, want in (([2, 0], [2, 0]), (slice(1, None), [1, 2])):
        part = _batch(task, rows=rows)
        for key in data.BATCH_KEYS:
            np.testing.assert_array_equal(part[key], a[key][want])
    assert _batch(task, rows=[])["inputs"].shape == (0, T)


def _passkey_of(text):
    keys = re.findall(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\. ", text)
    assert len(keys) == 1 and keys[0][0] == keys[0][1], text
    return keys[0][0]


def test_passkey_answer():
    batch = _batch("passkey", answer_weight=4.0)
    for b in range(3):
        row = _row(batch, b)
        text = data.decode(row["inputs"])
        key = _passkey_of(text)
        assert 5 <= len(key) <= 7
        assert text.endswith("What is the pass key? The pass key is " + key)
        mask = np.zeros(T, bool)
        mask[T - 1 - len(key) : T - 1] = True  # the targets that are the key's digits
        np.testing.assert_array_equal(row["answer_mask"], mask)
        assert data.decode(row["targets"][row["answer_mask"]]) == key
        np.testing.assert_array_equal(row["weights"][mask], 4.0)
        np.testing.assert_array_equal(row["weights"][~mask], [1.0] * (T - 1 - len(key)) + [0.0])


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_prompt_matches_training_format(depth):
    prompt, key = data.passkey_prompt(np.random.default_rng(7), 300, depth)
    example = data.passkey(np.random.default_rng(7), 300, depth=depth)
    assert data.decode(prompt) + key == data.decode(example.tokens)
    assert data.decode(prompt).endswith("The pass key is ") and len(prompt) + len(key) == 300
    prompt, key = data.passkey_prompt(np.random.default_rng(7), 300, depth, num_digits=12)
    assert len(key) == 12 and len(prompt) == 300 - 12 and _passkey_of(data.decode(prompt)) == key


@pytest.mark.parametrize("depth, lo, hi", [(0.0, 0, 25), (0.5, 0.4, 0.6), (1.0, None, None)])
def test_passkey_depth(depth, lo, hi):
    """The needle goes at the sentence boundary nearest `depth` of the filler."""
    seq_len = 2000
    for seed in range(3):
        text = data.decode(data.passkey_prompt(np.random.default_rng(seed), seq_len, depth)[0])
        key = _passkey_of(text)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
        start = text.index(needle)
        filler = len(text) - len(needle) - len("What is the pass key? The pass key is ")
        if depth == 0.0:
            assert start < hi  # after the cut sentence the filler starts with, if any
        elif depth == 1.0:
            assert text.endswith("is the pass key. What is the pass key? The pass key is ")
        else:
            assert lo * filler <= start <= hi * filler


def test_multikey_answer():
    batch = _batch("multikey", num_keys=5)
    for b in range(3):
        row = _row(batch, b)
        text = data.decode(row["inputs"])
        needles = dict(re.findall(r"The pass key for (\w+) is (\d+)\. ", text))
        assert len(needles) == 5
        name, key = re.search(r"What is the pass key for (\w+)\? The pass key for \1 is (\d+)$",
                              text).groups()  # fmt: skip
        assert needles[name] == key
        assert data.decode(row["targets"][row["answer_mask"]]) == key
        assert row["answer_mask"].sum() == len(key) and row["answer_mask"][-1 - len(key) : -1].all()


def test_multikey_depth():
    text = data.decode(data.multikey(np.random.default_rng(0), 3000, num_keys=3, depth=1.0).tokens)
    name = re.search(r"What is the pass key for (\w+)\?", text).group(1)
    assert re.search(rf"The pass key for {name} is \d+\. What is the pass key", text)


def test_assoc_recall_answers():
    batch = _batch("assoc_recall", num_pairs=6, num_queries=9, key_len=3)
    for b in range(3):
        row = _row(batch, b)
        text = data.decode(row["inputs"])
        pairs_text, queries_text = text.split("\nQueries: ")
        pairs = dict(re.findall(r"([a-z]{3}):(\d)", pairs_text.split("\n")[0]))
        queries = re.findall(r"([a-z]{3}):(\d)", queries_text)
        assert len(pairs) == 6 and len(queries) == 9
        assert all(pairs[k] == v for k, v in queries)
        assert {k for k, _ in queries[:6]} == set(pairs)  # each key once before any repeats
        assert data.decode(row["targets"][row["answer_mask"]]) == "".join(v for _, v in queries)
        # Each answer is predicted from the ':' after its key.
        assert set(row["inputs"][row["answer_mask"]]) == {ord(":")}


def test_pack():
    docs = [np.arange(1, 4), np.arange(10, 16), np.arange(20, 22), np.arange(30, 42)]
    out = data.pack(docs, 8, rows=4)
    np.testing.assert_array_equal(
        out["inputs"],
        [
            [1, 2, 3, 0, 0, 0, 0, 0],  # the 6-token document does not fit after the first
            [10, 11, 12, 13, 14, 15, 20, 21],
            [30, 31, 32, 33, 34, 35, 36, 37],  # the 12-token document, cut into 8 + 4
            [38, 39, 40, 41, 0, 0, 0, 0],
        ],
    )
    np.testing.assert_array_equal(out["segment_ids"][1], [1, 1, 1, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(out["positions"][1], [0, 1, 2, 3, 4, 5, 0, 1])
    np.testing.assert_array_equal(out["targets"][1], [11, 12, 13, 14, 15, 0, 21, 0])
    np.testing.assert_array_equal(out["weights"][0], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["segment_ids"][3], [1, 1, 1, 1, 0, 0, 0, 0])
    example = data.Example(np.array([5, 6, 7]), np.array([0, 0, 1], bool), np.array([1, 2, 3.0]))
    out = data.pack([example], 4, rows=1)
    np.testing.assert_array_equal(out["answer_mask"], [[False, True, False, False]])
    np.testing.assert_array_equal(out["weights"], [[2, 3, 0, 0]])
    with pytest.raises(ValueError, match="`rows`=3"):
        data.pack(docs, 8, rows=3)
    with pytest.raises(ValueError, match=r"`docs\[1\]`"):
        data.pack([np.arange(1, 3), np.array([4, 0])], 8, rows=1)


def test_text_documents_come_whole_from_files(text_dir):
    """Every segment is a contiguous piece of one file (packing never crosses documents), pieces
    of a long file start at multiples of seq_len, and non-matching files are skipped."""
    contents = _files(text_dir)
    batch = data.make_batch("text", seed=0, index=0, batch_size=4, seq_len=64,
                            data_dir=str(text_dir))  # fmt: skip
    assert (batch["segment_ids"] > 0).all()  # rows are filled
    seen = 0
    for b in range(4):
        row = _row(batch, b)
        for s, e in _segments(row):
            piece = bytes(row["inputs"][s:e].astype(np.uint8))
            assert any(
                piece == c[k : k + len(piece)] for c in contents for k in range(0, len(c), 64)
            )
            seen += 1
    assert seen > 4


def test_text_split_disjoint(text_dir):
    train = data.make_batch("text", seed=0, index=0, batch_size=2, seq_len=64,
                            data_dir=str(text_dir), split="train")  # fmt: skip
    rel = sorted(str(p.relative_to(text_dir)) for p in text_dir.rglob("*.py"))
    evals = [r for r in rel if zlib.crc32(r.encode()) % 20 == 0]
    assert 0 < len(evals) < len(rel)
    eval_files = {(text_dir / r).read_bytes() for r in evals}
    train_files = _files(text_dir) - eval_files
    for split, files in (("train", train_files), ("eval", eval_files)):
        batch = data.make_batch("text", seed=0, index=0, batch_size=2, seq_len=64,
                                data_dir=str(text_dir), split=split)  # fmt: skip
        for b in range(2):
            row = _row(batch, b)
            for s, e in _segments(row):
                piece = bytes(row["inputs"][s:e].astype(np.uint8))
                assert any(piece in c for c in files), (split, piece)
    assert train["inputs"].shape == (2, 64)


def test_text_stream(text_dir):
    stream = data.text_stream(str(text_dir), "train", seed=1, length=500)
    assert stream.shape == (500,) and stream.dtype == np.int32
    np.testing.assert_array_equal(stream, data.text_stream(str(text_dir), "train", 1, length=500))
    assert not np.array_equal(stream, data.text_stream(str(text_dir), "train", 2, length=500))
    # Whole files one after another, the last one cut.
    rest, files = bytes(stream.astype(np.uint8)), _files(text_dir)
    while rest:
        whole = [c for c in files if rest.startswith(c)]
        if not whole:
            assert any(c.startswith(rest) for c in files)
            break
        rest = rest[len(whole[0]) :]
    default = data.text_stream(length=1000)  # the standard library's eval split
    assert default.shape == (1000,) and (default != data.PAD).all()
    with pytest.raises(ValueError, match="`length`"):
        data.text_stream(str(text_dir), "eval", length=10**9)


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
