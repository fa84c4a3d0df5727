"""Tokens and packing: encode/decode round trip, the reserved PAD and BOS ids, pack's layout."""

import numpy as np
import pytest

from ringattn.train import tokens


def test_encode_decode():
    text = "héllo, wörld ✓"
    ids = tokens.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text.encode())
    assert tokens.decode(np.concatenate([[0, 0], ids, [0]])) == text
    assert tokens.decode(ids[:2]) == "h\ufffd"  # a cut multi-byte character is replaced
    assert tokens.decode(np.concatenate([[tokens.BOS], ids])) == text  # BOS is skipped too
    for bad in ("a\0b", "a\x01b"):  # PAD and BOS never come from text
        with pytest.raises(ValueError, match="`text`"):
            tokens.encode(bad)


def test_pack():
    docs = [np.arange(1, 4), np.arange(10, 16), np.arange(20, 22), np.arange(30, 42)]
    out = tokens.pack(docs, 8, rows=4)
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
    example = tokens.Example(np.array([5, 6, 7]), np.array([0, 0, 1], bool), np.array([1, 2, 3.0]))
    out = tokens.pack([example], 4, rows=1)
    np.testing.assert_array_equal(out["answer_mask"], [[False, True, False, False]])
    np.testing.assert_array_equal(out["weights"], [[2, 3, 0, 0]])
    with pytest.raises(ValueError, match="`rows`=3"):
        tokens.pack(docs, 8, rows=3)
    with pytest.raises(ValueError, match=r"`docs\[1\]`"):
        tokens.pack([np.arange(1, 3), np.array([4, 0])], 8, rows=1)
