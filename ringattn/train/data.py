"""Training data: byte-level tokens, synthetic long-context tasks and local text, packed in rows.

Pure numpy, generated on the fly, no downloads. Row b of batch i is built from
`np.random.default_rng([seed, i, b])` alone, so any process can build just the rows it needs and an
iterator's state is one integer.

A batch is a dict of [B, T] arrays:
  inputs       int32    tokens fed to the model (byte values; PAD = 0 is padding)
  targets      int32    the next token of the same document; PAD where there is none
  weights      float32  loss weight of each target; 0 on padding and on each document's last token
  positions    int32    position of the token inside its document
  segment_ids  int32    1, 2, ... per document in the row; 0 on padding
  answer_mask  bool     targets that are answer tokens: a row is correct iff the argmax matches the
                        targets at all of them; all False for plain language modelling

Tasks (TASKS): `passkey`, `multikey` and `assoc_recall` make one document that fills the row;
`text` packs pieces of local files (the Python standard library by default).
"""

from __future__ import annotations

import bisect
import fnmatch
import functools
import os
import zlib
from typing import NamedTuple

import numpy as np

VOCAB_SIZE = 256
PAD = 0
BATCH_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids", "answer_mask")


# ---------------------------------------------------------------------------------------------
# Batches.


def make_batch(task, *, seed, index, batch_size, seq_len, rows=None, **params):
    """Batch `index` of `task` (a name in TASKS) as [len(rows), seq_len] arrays.

    `rows` picks the rows to build: None for all of range(batch_size), or a slice or integer
    array of row indices; row b is the same whichever other rows are built with it. `params` go
    to the task function.
    """
    fn = "make_batch"
    task_fn = _task_fn(fn, task)
    _check_int(fn, "seed", seed, 0)
    _check_int(fn, "index", index, 0)
    _check_int(fn, "batch_size", batch_size, 1)
    _check_int(fn, "seq_len", seq_len, 1)
    packed = []
    for b in _row_ids(fn, rows, batch_size):
        example = task_fn(np.random.default_rng([seed, index, b]), seq_len, **params)
        docs = example if isinstance(example, list) else [example]
        packed.append(pack(docs, seq_len, rows=1))
    if not packed:
        return pack([], seq_len, rows=0)
    return {key: np.concatenate([p[key] for p in packed]) for key in BATCH_KEYS}


class DataIterator:
    """Batches 0, 1, 2, ... of a task, with a sequence-length curriculum.

    `seq_len_schedule` is a tuple of (start_step, seq_len) pairs, start steps increasing from 0
    (or one int): batch i has the seq_len of the last pair with start_step <= i. The state is the
    index of the next batch, so a restored iterator yields exactly the batches the saved one would
    have. `rows` is passed to make_batch (a process's share of the global batch).
    """

    def __init__(self, task, batch_size, seed, seq_len_schedule, params=None, *, rows=None):
        fn = "DataIterator"
        _task_fn(fn, task)
        _check_int(fn, "batch_size", batch_size, 1)
        _check_int(fn, "seed", seed, 0)
        if params is not None and not isinstance(params, dict):
            raise TypeError(f"{fn}: `params` must be a dict or None, got {type(params).__name__}.")
        self.task, self.batch_size, self.seed = task, batch_size, seed
        self.schedule = _check_schedule(fn, seq_len_schedule)
        self.params = dict(params or {})
        self.rows = rows
        self._index = 0
        _row_ids(fn, rows, batch_size)
        # One row of every curriculum stage now: a bad parameter or a seq_len too short for the
        # task fails here rather than thousands of steps in.
        for start, seq_len in self.schedule:
            make_batch(
                task,
                seed=seed,
                index=start,
                batch_size=batch_size,
                seq_len=seq_len,
                rows=[0],
                **self.params,
            )

    def seq_len_at(self, step):
        _check_int("DataIterator.seq_len_at", "step", step, 0)
        starts = [start for start, _ in self.schedule]
        return self.schedule[bisect.bisect_right(starts, step) - 1][1]

    def __iter__(self):
        return self

    def __next__(self):
        i = self._index
        batch = make_batch(
            self.task,
            seed=self.seed,
            index=i,
            batch_size=self.batch_size,
            seq_len=self.seq_len_at(i),
            rows=self.rows,
            **self.params,
        )
        self._index = i + 1
        return batch

    def get_state(self):
        """JSON-serialisable: the index of the next batch, with the task and seed as a check."""
        return {"index": self._index, "task": self.task, "seed": self.seed}

    def set_state(self, state):
        fn = "DataIterator.set_state"
        if not isinstance(state, dict) or "index" not in state:
            raise TypeError(f"{fn}: `state` must be a dict with an 'index', got {state!r}.")
        _check_int(fn, "state['index']", state["index"], 0)
        for key in ("task", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"{fn}: `state` is for {key} {state[key]!r}, this iterator has "
                    f"{getattr(self, key)!r}."
                )
        self._index = int(state["index"])


def _task_fn(fn, task):
    if not isinstance(task, str) or task not in TASKS:
        raise ValueError(f"{fn}: `task` must be one of {tuple(TASKS)}, got {task!r}.")
    return TASKS[task]


def _row_ids(fn, rows, batch_size):
    if rows is None:
        return range(batch_size)
    if isinstance(rows, slice):
        return range(batch_size)[rows]
    ids = np.asarray(rows)
    if ids.size == 0:
        return []
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{fn}: `rows` must be None, a slice or 1-D integer indices, got {rows!r}.")
    if ids.min() < 0 or ids.max() >= batch_size:
        raise ValueError(f"{fn}: `rows` must lie in [0, batch_size={batch_size}), got {rows!r}.")
    return [int(b) for b in ids]


def _check_schedule(fn, schedule):
    if _is_int(schedule):
        schedule = ((0, schedule),)
    try:
        pairs = tuple(tuple(pair) for pair in schedule)
    except TypeError:
        pairs = None
    if pairs is None or any(len(p) != 2 or not all(map(_is_int, p)) for p in pairs):
        raise TypeError(
            f"{fn}: `seq_len_schedule` must be a tuple of (start_step, seq_len) int pairs, "
            f"got {schedule!r}."
        )
    starts = [s for s, _ in pairs]
    problem = (
        "is empty" if not pairs
        else "must start at step 0" if starts[0] != 0
        else "needs strictly increasing start steps" if starts != sorted(set(starts))
        else "needs every seq_len >= 1" if any(n < 1 for _, n in pairs)
        else None
    )  # fmt: skip
    if problem:
        raise ValueError(f"{fn}: `seq_len_schedule` {problem}, got {schedule!r}.")
    return tuple((int(s), int(n)) for s, n in pairs)


# ---------------------------------------------------------------------------------------------
# Tasks: (rng, seq_len, **params) -> an Example, or a list of them (packed into one row).

_FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
_NAMES = (
    "apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach",
    "pear", "plum", "melon", "kiwi", "lime", "fig", "olive", "papaya",
)  # fmt: skip
_QUESTION = "What is the pass key? The pass key is "


def passkey(rng, seq_len, *, depth=None, min_digits=5, max_digits=7, answer_weight=10.0):
    """Needle in a haystack: filler sentences with "The pass key is K. Remember it. K is the pass
    key. " at `depth` (0: start, 1: end of the filler; None: uniform), then the question, ending
    "The pass key is K". The answer is K's digits. Every target has loss weight 1 except the
    answer's, which have `answer_weight`: the loss on all tokens with the answer weighted x10
    learns far faster than the loss on the answer alone."""
    text, key = _passkey_text("passkey", rng, seq_len, depth, min_digits, max_digits, None)
    return _example(text + key, [(len(text), len(text) + len(key))], answer_weight)


def passkey_prompt(rng, seq_len, depth, num_digits=None, *, min_digits=5, max_digits=7):
    """(prompt tokens, key): the passkey example of seq_len tokens cut right before the key's
    digits, for decoding evaluation. With num_digits None it is the prompt of the training example
    that `passkey` makes from the same rng state."""
    text, key = _passkey_text(
        "passkey_prompt", rng, seq_len, depth, min_digits, max_digits, num_digits
    )
    return encode(text), key


def multikey(
    rng, seq_len, *, num_keys=4, depth=None, min_digits=5, max_digits=7, answer_weight=10.0
):
    """Several needles "The pass key for apple is 8231. " (distinct names, random depths) and a
    question about one of them, ending "The pass key for apple is 8231"; the answer is its digits.
    `depth` places the asked needle (None: uniform)."""
    fn = "multikey"
    _check_int(fn, "num_keys", num_keys, 1)
    if num_keys > len(_NAMES):
        raise ValueError(f"{fn}: `num_keys` must be <= {len(_NAMES)}, got {num_keys}.")
    _check_digits(fn, min_digits, max_digits)
    _check_weight(fn, answer_weight)
    needle = "The pass key for {} is {}. "
    question = "What is the pass key for {0}? The pass key for {0} is "
    longest = sorted(map(len, _NAMES))[-num_keys:]
    need = sum(len(needle.format("", "")) + n + max_digits for n in longest)
    need += len(question.format("")) + 2 * longest[-1] + max_digits
    _check_fits(fn, seq_len, need, f"{num_keys} keys of {max_digits} digits")
    names = [_NAMES[i] for i in rng.choice(len(_NAMES), num_keys, replace=False)]
    keys = [_digits(rng, rng.integers(min_digits, max_digits + 1)) for _ in names]
    asked = rng.integers(num_keys)
    depths = rng.uniform(size=num_keys)
    if depth is not None:
        depths[asked] = _check_depth(fn, depth, rng)
    needles = [needle.format(n, k) for n, k in zip(names, keys, strict=True)]
    tail = question.format(names[asked])
    filler, bounds = _filler(rng, seq_len - sum(map(len, needles)) - len(tail) - len(keys[asked]))
    text = _insert(filler, bounds, needles, depths) + tail
    return _example(text + keys[asked], [(len(text), seq_len)], answer_weight)


def assoc_recall(rng, seq_len, *, num_pairs=16, num_queries=None, key_len=2, answer_weight=10.0):
    """Multi-query associative recall: "Pairs: ab:3 kq:7 ...\\n", filler sentences, then
    "\\nQueries: kq:7 ab:3 ..."; the answers are the digits after the queried keys. Keys are
    distinct strings of `key_len` lowercase letters; num_queries (default num_pairs) keys are
    asked, each once while they last."""
    fn = "assoc_recall"
    _check_int(fn, "num_pairs", num_pairs, 1)
    _check_int(fn, "key_len", key_len, 1)
    num_queries = num_pairs if num_queries is None else num_queries
    _check_int(fn, "num_queries", num_queries, 1)
    _check_weight(fn, answer_weight)
    if num_pairs > 26**key_len:
        raise ValueError(
            f"{fn}: `num_pairs` must be <= 26**key_len = {26**key_len}, got {num_pairs}."
        )
    prefix, sep = "Pairs: ", "\nQueries: "
    need = len(prefix) + (key_len + 3) * num_pairs + len(sep) + (key_len + 3) * num_queries - 1
    _check_fits(fn, seq_len, need, f"{num_pairs} pairs and {num_queries} queries")
    codes = rng.choice(26**key_len, num_pairs, replace=False)
    keys = ["".join(chr(97 + c // 26**j % 26) for j in range(key_len)) for c in codes]
    values = [str(v) for v in rng.integers(10, size=num_pairs)]
    asked = np.concatenate(
        [rng.permutation(num_pairs) for _ in range(-(-num_queries // num_pairs))]
    )
    pairs = prefix + " ".join(f"{k}:{v}" for k, v in zip(keys, values, strict=True)) + "\n"
    queries = sep + " ".join(f"{keys[i]}:{values[i]}" for i in asked[:num_queries])
    filler, _ = _filler(rng, seq_len - len(pairs) - len(queries))
    start = seq_len - len(queries)
    # Query q is "key:digit" at len(sep) + q (key_len + 3) in `queries` (one space between).
    digits = [start + len(sep) + q * (key_len + 3) + key_len + 1 for q in range(num_queries)]
    return _example(pairs + filler + queries, [(d, d + 1) for d in digits], answer_weight)


def text(rng, seq_len, *, data_dir=None, glob="*.py", split="train"):
    """Byte-level language modelling on local files: a list of documents filling one row.

    The files of `data_dir` (default: the Python standard library without site-packages) whose
    name matches `glob` (or whose relative path does, when glob has a "/"), searched recursively.
    Files are cut into pieces of at most seq_len at fixed offsets and the row is filled with pieces
    drawn uniformly (a file is drawn in proportion to its length), the last one cut to fit. Files
    whose relative path has crc32 = 0 mod 20 form the "eval" split, the others "train".
    """
    corpus = _corpus("text", data_dir, glob, split)
    file_ids, starts = _pieces(corpus, seq_len)
    docs, free = [], seq_len
    while free:
        p = rng.integers(len(starts))
        f, start = file_ids[p], int(starts[p])
        tokens = _read(corpus.paths[f], start, min(seq_len, corpus.sizes[f] - start, free))
        docs.append(tokens)
        free -= len(tokens)
    return docs


TASKS = {"passkey": passkey, "multikey": multikey, "assoc_recall": assoc_recall, "text": text}


def text_stream(data_dir=None, split="eval", seed=0, *, length, glob="*.py"):
    """The first `length` tokens [length] int32 of the split's files concatenated in an order
    shuffled by `seed`: one long stream for streaming perplexity evaluation."""
    fn = "text_stream"
    _check_int(fn, "length", length, 1)
    _check_int(fn, "seed", seed, 0)
    corpus = _corpus(fn, data_dir, glob, split)
    if sum(corpus.sizes) < length:
        raise ValueError(
            f"{fn}: `length` must be <= the {sum(corpus.sizes)} bytes of the {split!r} split, "
            f"got {length}."
        )
    parts, total = [], 0
    for f in np.random.default_rng(seed).permutation(len(corpus.paths)):
        parts.append(_read(corpus.paths[f], 0, min(corpus.sizes[f], length - total)))
        total += len(parts[-1])
        if total == length:
            break
    return np.concatenate(parts)


def _passkey_text(fn, rng, seq_len, depth, min_digits, max_digits, num_digits):
    """(text up to the key, key) of a passkey example of seq_len tokens."""
    _check_digits(fn, min_digits, max_digits)
    if num_digits is not None:
        _check_int(fn, "num_digits", num_digits, 1)
        if num_digits > 18:
            raise ValueError(f"{fn}: `num_digits` must be <= 18, got {num_digits}.")
    longest = max_digits if num_digits is None else num_digits
    needle = "The pass key is {0}. Remember it. {0} is the pass key. "
    need = len(needle.format("")) + 3 * longest + len(_QUESTION)
    _check_fits(fn, seq_len, need, f"a {longest}-digit key and the question")
    n = rng.integers(min_digits, max_digits + 1) if num_digits is None else num_digits
    key = _digits(rng, n)
    depth = _check_depth(fn, depth, rng)
    needle = needle.format(key)
    filler, bounds = _filler(rng, seq_len - len(needle) - len(_QUESTION) - len(key))
    return _insert(filler, bounds, [needle], [depth]) + _QUESTION, key


def _filler(rng, length):
    """(`length` characters of random filler sentences, the offsets in it where a sentence starts
    or the filler ends). Trimmed at the start, so it reads as a window of an endless stream; the
    cut sentence at the start is not a boundary, so needles go between whole sentences."""
    sizes = np.asarray([len(s) + 1 for s in _FILLER])
    draws = rng.integers(len(_FILLER), size=length // sizes.min() + 1)
    ends = np.cumsum(sizes[draws])
    count = int(np.searchsorted(ends, length)) + 1  # sentences until the length is reached
    full = "".join(_FILLER[i] + " " for i in draws[:count])
    excess = len(full) - length
    starts = ends[:count] - excess  # ends of the sentences drawn: where the next one starts
    return full[excess:], starts[starts >= 0]


def _insert(filler, bounds, needles, depths):
    """Insert each needle at the sentence boundary nearest its depth (a fraction of the filler)."""
    cuts = [int(bounds[np.argmin(np.abs(bounds - d * len(filler)))]) for d in depths]
    order = sorted(range(len(needles)), key=lambda i: cuts[i])
    pieces, prev = [], 0
    for i in order:
        pieces += [filler[prev : cuts[i]], needles[i]]
        prev = cuts[i]
    return "".join(pieces) + filler[prev:]


def _digits(rng, n):
    return str(rng.integers(10 ** (int(n) - 1), 10 ** int(n)))  # no leading zero


def _check_fits(fn, seq_len, need, what):
    _check_int(fn, "seq_len", seq_len, 1)
    if seq_len < need:
        raise ValueError(f"{fn}: `seq_len` must be at least {need} to hold {what}, got {seq_len}.")


def _check_digits(fn, min_digits, max_digits):
    _check_int(fn, "min_digits", min_digits, 1)
    _check_int(fn, "max_digits", max_digits, min_digits)
    if max_digits > 18:  # int64 keys
        raise ValueError(f"{fn}: `max_digits` must be <= 18, got {max_digits}.")


def _check_depth(fn, depth, rng):
    if depth is None:
        return rng.uniform()
    if not isinstance(depth, (int, float, np.number)) or not 0 <= depth <= 1:
        raise ValueError(f"{fn}: `depth` must be None or in [0, 1], got {depth!r}.")
    return float(depth)


def _check_weight(fn, weight):
    if not isinstance(weight, (int, float, np.number)) or not weight >= 0:
        raise ValueError(f"{fn}: `answer_weight` must be a number >= 0, got {weight!r}.")


# ---------------------------------------------------------------------------------------------
# Text corpus: file list and pieces, cached; file bytes read on demand.

# NUL is the padding token, so a NUL byte in a file is read as SUB (0x1a, the ASCII "substitute").
_NUL_STANDIN = 0x1A


class _Corpus(NamedTuple):
    paths: tuple[str, ...]
    sizes: tuple[int, ...]


def _corpus(fn, data_dir, pattern, split):
    if split not in ("train", "eval"):
        raise ValueError(f"{fn}: `split` must be 'train' or 'eval', got {split!r}.")
    if not isinstance(pattern, str):
        raise TypeError(f"{fn}: `glob` must be a str, got {pattern!r}.")
    root = os.path.dirname(os.__file__) if data_dir is None else os.path.abspath(data_dir)
    if not os.path.isdir(root):
        raise ValueError(f"{fn}: `data_dir` must be a directory, got {data_dir!r}.")
    corpus = _list_files(root, data_dir is None, pattern, split)
    if not corpus.paths:
        raise ValueError(f"{fn}: no non-empty files match `glob`={pattern!r} in {split} of {root}.")
    return corpus


@functools.cache
def _list_files(root, stdlib, pattern, split):
    skip = {"__pycache__", "site-packages", "dist-packages"} if stdlib else {"__pycache__"}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if not fnmatch.fnmatchcase(rel if "/" in pattern else name, pattern):
                continue
            if (zlib.crc32(rel.encode()) % 20 == 0) != (split == "eval"):
                continue
            if os.path.isfile(path) and os.path.getsize(path) > 0:
                found.append((rel, path, os.path.getsize(path)))
    found.sort()
    return _Corpus(tuple(p for _, p, _ in found), tuple(s for _, _, s in found))


@functools.lru_cache(maxsize=16)
def _pieces(corpus, seq_len):
    """(file index, start offset) of every piece: each file cut at multiples of seq_len."""
    counts = -(-np.asarray(corpus.sizes) // seq_len)
    file_ids = np.repeat(np.arange(len(counts)), counts)
    first = np.cumsum(counts) - counts
    return file_ids, (np.arange(len(file_ids)) - first[file_ids]) * seq_len


def _read(path, start, count):
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(count)
    if len(data) != count:
        raise RuntimeError(
            f"text: {path} changed while in use (read {len(data)} of {count} bytes)."
        )
    tokens = np.frombuffer(data, np.uint8).astype(np.int32)
    tokens[tokens == PAD] = _NUL_STANDIN
    return tokens


# ---------------------------------------------------------------------------------------------
# Tokens, examples and packing.


class Example(NamedTuple):
    """One document: tokens [L] int32 and, per token, whether it is an answer token and the loss
    weight of predicting it (the weight of token 0, never predicted, is unused)."""

    tokens: np.ndarray
    is_answer: np.ndarray
    weights: np.ndarray


def encode(text):
    """UTF-8 bytes of `text` as int32 token ids [len(bytes)]."""
    data = text.encode("utf-8")
    if b"\0" in data:
        raise ValueError("encode: `text` must not contain NUL, the padding token.")
    return np.frombuffer(data, np.uint8).astype(np.int32)


def decode(tokens):
    """The text of token ids (any shape, flattened), padding skipped."""
    ids = np.asarray(tokens).reshape(-1)
    return bytes(ids[ids != PAD].astype(np.uint8)).decode("utf-8", errors="replace")


def _example(text, answer_spans, answer_weight):
    tokens = encode(text)
    is_answer = np.zeros(len(tokens), bool)
    for start, stop in answer_spans:
        is_answer[start:stop] = True
    return Example(tokens, is_answer, np.where(is_answer, answer_weight, 1.0).astype(np.float32))


def pack(docs, seq_len, rows):
    """Pack documents (Examples, or token arrays: weight 1, no answers), in order, into `rows`
    rows of seq_len tokens; a batch dict of [rows, seq_len] arrays.

    A document longer than seq_len is cut into pieces of at most seq_len, each its own document.
    Greedy: a document that does not fit in the rest of the current row starts the next row.
    """
    fn = "pack"
    _check_int(fn, "seq_len", seq_len, 1)
    _check_int(fn, "rows", rows, 0)
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
    for doc in _pieces_of(fn, docs, seq_len):
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


def _pieces_of(fn, docs, seq_len):
    if not isinstance(docs, (list, tuple)):
        raise TypeError(f"{fn}: `docs` must be a list of documents, got {type(docs).__name__}.")
    for i, doc in enumerate(docs):
        if not isinstance(doc, Example):
            tokens = np.asarray(doc)
            doc = Example(tokens, np.zeros(tokens.shape, bool), np.ones(tokens.shape, np.float32))
        tokens = doc.tokens
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"{fn}: `docs[{i}]` must be 1-D integer tokens, got {tokens.dtype}.")
        if len(tokens) and (tokens.min() <= PAD or tokens.max() >= VOCAB_SIZE):
            raise ValueError(
                f"{fn}: `docs[{i}]` tokens must lie in [1, {VOCAB_SIZE}), got [{tokens.min()}, "
                f"{tokens.max()}] (0 is padding)."
            )
        for start in range(0, len(tokens), seq_len):
            yield Example(*(a[start : start + seq_len] for a in doc))


def _is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_int(fn, name, value, minimum):
    if not _is_int(value):
        raise TypeError(f"{fn}: `{name}` must be an int, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{fn}: `{name}` must be >= {minimum}, got {value}.")
