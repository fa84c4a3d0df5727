"""Training data: batches of synthetic long-context tasks or local text, and their curriculum.

Pure numpy, generated on the fly, no downloads. Row b of batch i is built from
`np.random.default_rng([seed, i, b])` alone, so any process can build just the rows it needs and an
iterator's state is one integer.

The pieces live in three modules, re-exported here: tokens.py (token ids, the batch format, pack),
tasks.py (`passkey`, `multikey` and `assoc_recall`: one document that fills the row) and
corpus.py (`text`: pieces of local files packed in the row, the Python standard library by
default; `text_stream` for streaming evaluation).
"""

from __future__ import annotations

import bisect

import numpy as np

from ringattn.train.corpus import text, text_stream, vocab_size
from ringattn.train.tasks import assoc_recall, multikey, passkey, passkey_prompt
from ringattn.train.tokens import (
    BATCH_KEYS,
    BOS,
    PAD,
    VOCAB_SIZE,
    Example,
    check_int,
    decode,
    encode,
    is_int,
    pack,
)

__all__ = [
    "BATCH_KEYS",
    "BOS",
    "PAD",
    "TASKS",
    "VOCAB_SIZE",
    "DataIterator",
    "Example",
    "assoc_recall",
    "decode",
    "encode",
    "make_batch",
    "multikey",
    "pack",
    "passkey",
    "passkey_prompt",
    "text",
    "text_stream",
]

# Tasks: (rng, seq_len, **params) -> an Example, or a list of them (packed into one row).
TASKS = {"passkey": passkey, "multikey": multikey, "assoc_recall": assoc_recall, "text": text}


def make_batch(task, *, seed, index, batch_size, seq_len, rows=None, **params):
    """Batch `index` of `task` (a name in TASKS) as [len(rows), seq_len] arrays.

    `rows` picks the rows to build: None for all of range(batch_size), or a slice or integer
    array of row indices; row b is the same whichever other rows are built with it. `params` go
    to the task function (`tokenizer`: a text task's tokens are that tokenizer's ids).
    """
    fn = "make_batch"
    task_fn = _task_fn(fn, task)
    check_int(fn, "seed", seed, 0)
    check_int(fn, "index", index, 0)
    check_int(fn, "batch_size", batch_size, 1)
    check_int(fn, "seq_len", seq_len, 1)
    packed, vocab = [], vocab_size(params.get("tokenizer"))
    for b in _row_ids(fn, rows, batch_size):
        example = task_fn(np.random.default_rng([seed, index, b]), seq_len, **params)
        docs = example if isinstance(example, list) else [example]
        packed.append(pack(docs, seq_len, rows=1, vocab_size=vocab))
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
        check_int(fn, "batch_size", batch_size, 1)
        check_int(fn, "seed", seed, 0)
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
        check_int("DataIterator.seq_len_at", "step", step, 0)
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
        check_int(fn, "state['index']", state["index"], 0)
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
    if is_int(schedule):
        schedule = ((0, schedule),)
    try:
        pairs = tuple(tuple(pair) for pair in schedule)
    except TypeError:
        pairs = None
    if pairs is None or any(len(p) != 2 or not all(map(is_int, p)) for p in pairs):
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
