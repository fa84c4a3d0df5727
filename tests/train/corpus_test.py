"""The `text` task and `text_stream`: documents are whole pieces of files, the splits are
disjoint, the stream is whole files in a seeded order; with `bos`, every document and the stream
start with BOS."""

import zlib

import numpy as np
import pytest

from ringattn.train import corpus, data, tokens
from ringattn.train.tokens import BOS, PAD


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


def test_text_documents_come_whole_from_files(text_dir, rows):
    """Every segment is a contiguous piece of one file (packing never crosses documents), pieces
    of a long file start at multiples of seq_len, and non-matching files are skipped."""
    contents = _files(text_dir)
    batch = data.make_batch("text", seed=0, index=0, batch_size=4, seq_len=64,
                            data_dir=str(text_dir))  # fmt: skip
    assert (batch["segment_ids"] > 0).all()  # rows are filled
    seen = 0
    for b in range(4):
        row = rows.row_of(batch, b)
        for s, e in rows.segments(row):
            piece = bytes(row["inputs"][s:e].astype(np.uint8))
            assert any(
                piece == c[k : k + len(piece)] for c in contents for k in range(0, len(c), 64)
            )
            seen += 1
    assert seen > 4


def test_text_split_disjoint(text_dir, rows):
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
            row = rows.row_of(batch, b)
            for s, e in rows.segments(row):
                piece = bytes(row["inputs"][s:e].astype(np.uint8))
                assert any(piece in c for c in files), (split, piece)
    assert train["inputs"].shape == (2, 64)


def test_text_stream(text_dir):
    stream = corpus.text_stream(str(text_dir), "train", seed=1, length=500)
    assert stream.shape == (500,) and stream.dtype == np.int32
    np.testing.assert_array_equal(stream, corpus.text_stream(str(text_dir), "train", 1, length=500))
    assert not np.array_equal(stream, corpus.text_stream(str(text_dir), "train", 2, length=500))
    # Whole files one after another, the last one cut.
    rest, files = bytes(stream.astype(np.uint8)), _files(text_dir)
    while rest:
        whole = [c for c in files if rest.startswith(c)]
        if not whole:
            assert any(c.startswith(rest) for c in files)
            break
        rest = rest[len(whole[0]) :]
    default = corpus.text_stream(length=1000)  # the standard library's eval split
    assert default.shape == (1000,) and (default != PAD).all()
    with pytest.raises(ValueError, match="`length`"):
        corpus.text_stream(str(text_dir), "eval", length=10**9)


def test_text_bos_documents(text_dir, rows):
    """With `bos`: BOS at position 0 of every document and nowhere else, each row starting with
    one, segment ids and positions restarting per document, and after each BOS a piece of a file
    cut at a multiple of seq_len - 1."""
    seq_len, contents = 64, _files(text_dir)
    batch = data.make_batch("text", seed=0, index=0, batch_size=4, seq_len=seq_len,
                            data_dir=str(text_dir), bos=True)  # fmt: skip
    assert (batch["targets"] != BOS).all()  # BOS is given, never predicted
    docs = 0
    for b in range(4):
        row = rows.row_of(batch, b)
        spans = rows.segments(row)
        assert spans[0][0] == 0 and row["inputs"][0] == BOS  # the row starts a document
        assert [row["segment_ids"][s] for s, _ in spans] == list(range(1, len(spans) + 1))
        assert spans[-1][1] >= seq_len - 1  # filled, but for a slot too short for BOS + a byte
        for s, e in spans:
            assert row["inputs"][s] == BOS and (row["inputs"][s + 1 : e] != BOS).all()
            np.testing.assert_array_equal(row["positions"][s:e], np.arange(e - s))
            assert e - s >= 2 and row["weights"][s] > 0  # BOS predicts the first byte
            piece = bytes(row["inputs"][s + 1 : e].astype(np.uint8))
            assert any(
                piece == c[k : k + len(piece)]
                for c in contents
                for k in range(0, len(c), seq_len - 1)
            )
            docs += 1
    assert docs > 4  # several documents packed per row


def test_text_bos_rows_come_from_their_own_rng(text_dir):
    """Row b of batch i is still built from rng([seed, i, b]) alone, with or without `bos`."""
    seed, index, seq_len = 5, 3, 64
    for bos in (False, True):
        batch = data.make_batch("text", seed=seed, index=index, batch_size=3, seq_len=seq_len,
                                data_dir=str(text_dir), bos=bos)  # fmt: skip
        for b in range(3):
            rng = np.random.default_rng([seed, index, b])
            docs = corpus.text(rng, seq_len, data_dir=str(text_dir), bos=bos)
            want = tokens.pack(docs, seq_len, rows=1)
            for key in data.BATCH_KEYS:
                np.testing.assert_array_equal(batch[key][b], want[key][0], err_msg=key)
            assert all(d[0] == BOS for d in docs) == bos


def test_text_stream_bos(text_dir):
    stream = corpus.text_stream(str(text_dir), "train", seed=1, length=500, bos=True)
    assert stream.shape == (500,) and stream.dtype == np.int32
    assert stream[0] == BOS and (stream[1:] != BOS).all()
    plain = corpus.text_stream(str(text_dir), "train", seed=1, length=499)
    np.testing.assert_array_equal(stream[1:], plain)  # the same files in the same order
    assert corpus.text_stream(str(text_dir), "train", length=1, bos=True).tolist() == [BOS]


def test_pad_and_bos_bytes_in_files_read_as_sub(tmp_path):
    (tmp_path / "x.py").write_bytes(b"a\0b\1c")
    split = "eval" if zlib.crc32(b"x.py") % 20 == 0 else "train"
    stream = corpus.text_stream(str(tmp_path), split, length=5)
    assert bytes(stream.astype(np.uint8)) == b"a\x1ab\x1ac"
    stream = corpus.text_stream(str(tmp_path), split, length=6, bos=True)
    assert stream.tolist() == [BOS, *b"a\x1ab\x1ac"]
    with pytest.raises(ValueError, match="`length`"):
        corpus.text_stream(str(tmp_path), split, length=7, bos=True)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: corpus.text(np.random.default_rng(0), 64, bos=1), TypeError, "`bos`"),
        (lambda: corpus.text(np.random.default_rng(0), 1, bos=True), ValueError, "`seq_len`"),
        (lambda: corpus.text_stream(length=8, bos="yes"), TypeError, "`bos`"),
    ],
)
def test_bos_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("adds_bos, bos", [(False, False), (True, False), (False, True)])
def test_tokenized_text_documents(text_dir, tokenizer_dirs, rows, adds_bos, bos):
    """In a tokenizer's tokens: each document is the special tokens the tokenizer puts before a
    text (BOS for one that adds it; `bos` adds it to one that does not), then a piece of a
    file's tokens cut at a multiple of seq_len - (1 with BOS); positions restart per document."""
    from tokenizers import Tokenizer

    directory, seq_len = tokenizer_dirs[adds_bos], 32
    tok = Tokenizer.from_file(f"{directory}/tokenizer.json")
    files = [tok.encode(c.decode(), add_special_tokens=False).ids for c in _files(text_dir)]
    with_bos = adds_bos or bos
    piece = seq_len - with_bos
    batch = data.make_batch("text", seed=0, index=0, batch_size=4, seq_len=seq_len,
                            data_dir=str(text_dir), tokenizer=directory, bos=bos)  # fmt: skip
    docs = 0
    for b in range(4):
        row = rows.row_of(batch, b)
        spans = rows.segments(row)
        assert spans[0][0] == 0 and spans[-1][1] >= seq_len - with_bos  # filled
        for s, e in spans:
            ids = row["inputs"][s:e].tolist()
            np.testing.assert_array_equal(row["positions"][s:e], np.arange(e - s))
            assert (ids[0] == 1) == with_bos and 1 not in ids[1:]  # <s> is id 1
            body = ids[with_bos:]
            assert body and any(
                body == f[k : k + len(body)] for f in files for k in range(0, len(f), piece)
            )
            docs += 1
    assert docs > 4
    assert not np.array_equal(
        batch["inputs"],
        data.make_batch(
            "text", seed=0, index=0, batch_size=4, seq_len=seq_len, data_dir=str(text_dir)
        )["inputs"],
    )


def test_tokenized_text_errors(text_dir, tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="`tokenizer` must be a directory holding tokenizer.json"):
        corpus.text(rng, 64, data_dir=str(text_dir), tokenizer=str(tmp_path))
    # A BOS asked of a tokenizer whose config names none.
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json")
    )
    with pytest.raises(ValueError, match="`bos` asks for a BOS"):
        corpus.text(rng, 64, data_dir=str(text_dir), tokenizer=str(tmp_path), bos=True)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 2\)"):
        tokens.pack([np.array([0, 2])], 8, rows=1, vocab_size=2)
