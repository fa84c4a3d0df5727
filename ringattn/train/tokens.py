"""Byte-level tokens, documents, and packing documents into rows of a batch.

Token ids are byte values: PAD = 0 is padding and BOS = 1 marks a document's start where a task
asks for it; neither occurs in text (`encode` rejects them, files read NUL and \\x01 as SUB).

A batch is a dict of [B, T] arrays:
  inputs       int32    tokens fed to the model
  targets      int32    the next token of the same document; PAD where there is none
  weights      float32  loss weight of each target; 0 on padding and on each document's last token
  positions    int32    position of the token inside its document
  segment_ids  int32    1, 2, ... per document in the row; 0 on padding
  answer_mask  bool     targets that are answer tokens: a row is correct iff the argmax matches the
                        targets at all of them; all False for plain language modelling
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

VOCAB_SIZE = 256
PAD = 0
BOS = 1  # "\x01": the attention-sink token of StreamingLLM-style training (tasks' `bos` option)
BATCH_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids", "answer_mask")


class Example(NamedTuple):
    """One document: tokens [L] int32 and, per token, whether it is an answer token and the loss
    weight of predicting it (the weight of token 0, never predicted, is unused)."""

    tokens: np.ndarray
    is_answer: np.ndarray
    weights: np.ndarray


def encode(text):
    """UTF-8 bytes of `text` as int32 token ids [len(bytes)]."""
    data = text.encode("utf-8")
    if b"\0" in data or b"\1" in data:
        raise ValueError("encode: `text` must not contain NUL (padding) or \\x01 (BOS).")
    return np.frombuffer(data, np.uint8).astype(np.int32)


def decode(tokens):
    """The text of token ids (any shape, flattened), padding and BOS skipped."""
    ids = np.asarray(tokens).reshape(-1)
    ids = ids[(ids != PAD) & (ids != BOS)]
    return bytes(ids.astype(np.uint8)).decode("utf-8", errors="replace")


def pack(docs, seq_len, rows, vocab_size=None):
    """Pack documents (Examples, or token arrays: weight 1, no answers), in order, into `rows`
    rows of seq_len tokens; a batch dict of [rows, seq_len] arrays. Tokens are bytes (1 ..
    255; 0 is padding), or with `vocab_size` a tokenizer's ids (0 .. vocab_size - 1: padding
    is where segment_ids is 0).

    A document longer than seq_len is cut into pieces of at most seq_len, each its own document.
    Greedy: a document that does not fit in the rest of the current row starts the next row.
    """
    fn = "pack"
    check_int(fn, "seq_len", seq_len, 1)
    check_int(fn, "rows", rows, 0)
    shape = (rows, seq_len)
    out = {
        "inputs": np.zeros(shape, np.int32),
        "targets": np.zeros(shape, np.int32),
        "weights": np.zeros(shape, np.float32),
        "positions": np.zeros(shape, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "answer_mask": np.zeros(shape, bool),
    }
    row, used, segment = 0, 0, 0
    for doc in _pieces_of(fn, docs, seq_len, vocab_size):
        n = len(doc.tokens)
        if used + n > seq_len:
            row, used, segment = row + 1, 0, 0
        if row >= rows:
            raise ValueError(f"{fn}: the documents need more than `rows`={rows} rows of {seq_len}.")
        span, segment = slice(used, used + n), segment + 1
        out["inputs"][row, span] = doc.tokens
        out["positions"][row, span] = np.arange(n)
        out["segment_ids"][row, span] = segment
        head = slice(used, used + n - 1)  # the document's last token has no target
        out["targets"][row, head] = doc.tokens[1:]
        out["weights"][row, head] = doc.weights[1:]
        out["answer_mask"][row, head] = doc.is_answer[1:]
        used += n
    return out


def _pieces_of(fn, docs, seq_len, vocab_size):
    if not isinstance(docs, (list, tuple)):
        raise TypeError(f"{fn}: `docs` must be a list of documents, got {type(docs).__name__}.")
    for i, doc in enumerate(docs):
        if not isinstance(doc, Example):
            tokens = np.asarray(doc)
            doc = Example(tokens, np.zeros(tokens.shape, bool), np.ones(tokens.shape, np.float32))
        tokens = doc.tokens
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"{fn}: `docs[{i}]` must be 1-D integer tokens, got {tokens.dtype}.")
        low, high = (PAD + 1, VOCAB_SIZE) if vocab_size is None else (0, vocab_size)
        if len(tokens) and (tokens.min() < low or tokens.max() >= high):
            raise ValueError(
                f"{fn}: `docs[{i}]` tokens must lie in [{low}, {high}), got [{tokens.min()}, "
                f"{tokens.max()}]{' (0 is padding)' if vocab_size is None else ''}."
            )
        for start in range(0, len(tokens), seq_len):
            yield Example(*(a[start : start + seq_len] for a in doc))


# Argument checks shared by the data modules (tasks, corpus, batches).


def is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_int(fn, name, value, minimum):
    if not is_int(value):
        raise TypeError(f"{fn}: `{name}` must be an int, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{fn}: `{name}` must be >= {minimum}, got {value}.")
