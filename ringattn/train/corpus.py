"""Local text files as training documents (the `text` task) and as one long evaluation stream.

Files are listed once per (directory, glob, split) and cut into pieces at fixed offsets; their
bytes are read on demand, so a row costs a few small reads whatever the corpus size.

With `bos`, every document begins with BOS: the attention-sink token that StreamingLLM (Xiao et
al. 2023, section 3.3) prepends to every training sample, so a model learns to park attention on
it and a streaming cache that keeps it stays in distribution.

With `tokenizer` (a directory holding a Hugging Face tokenizer.json: a run's `hf/`, which the
trainer passes for a run that has one), files are tokenized whole (once per process) and cut
into pieces of tokens instead of bytes; each document carries the special tokens the tokenizer
adds to a text (a BOS for Llama 3, none for SmolLM2), and `bos` adds the tokenizer's BOS where
it adds none.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import zlib
from typing import NamedTuple

import numpy as np

from ringattn.train.tokens import BOS, check_int

TOKENIZER, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"

# NUL and \x01 are the padding and BOS tokens, so in a file they are read as SUB (0x1a, the ASCII
# "substitute"): no text token is ever padding or BOS.
_STANDIN = 0x1A


def text(rng, seq_len, *, data_dir=None, glob="*.py", split="train", bos=False, tokenizer=None):
    """Byte-level language modelling on local files: a list of documents filling one row.

    The files of `data_dir` (default: the Python standard library without site-packages) whose
    name matches `glob` (or whose relative path does, when glob has a "/"), searched recursively.
    Files are cut into pieces of at most seq_len at fixed offsets and the row is filled with pieces
    drawn uniformly (a file is drawn in proportion to its length), the last one cut to fit. Files
    whose relative path has crc32 = 0 mod 20 form the "eval" split, the others "train".

    `bos`: every document is BOS followed by a piece of at most seq_len - 1 bytes (files cut at
    multiples of seq_len - 1), so each row starts with BOS at position 0; a row whose last free
    slot could hold only a lone BOS leaves it as padding.

    `tokenizer`: the tokens of `tokenized_text` instead of bytes.
    """
    fn = "text"
    _check_bos(fn, bos)
    if tokenizer is not None:
        return tokenized_text(rng, seq_len, tokenizer, data_dir=data_dir, glob=glob, split=split,
                              bos=bos)  # fmt: skip
    check_int(fn, "seq_len", seq_len, 1 + bos)
    corpus = _corpus(fn, data_dir, glob, split)
    piece_len = seq_len - bos
    file_ids, starts = _pieces(corpus, piece_len)
    docs, free = [], seq_len
    while free > bos:
        p = rng.integers(len(starts))
        f, start = file_ids[p], int(starts[p])
        tokens = _read(corpus.paths[f], start, min(piece_len, corpus.sizes[f] - start, free - bos))
        docs.append(np.insert(tokens, 0, BOS) if bos else tokens)
        free -= len(docs[-1])
    return docs


def tokenized_text(rng, seq_len, tokenizer, *, data_dir=None, glob="*.py", split="train",
                   bos=False):  # fmt: skip
    """`text` in the tokens of `tokenizer` (a directory with tokenizer.json): a list of documents
    filling one row. A file is drawn in proportion to its bytes, then one of its pieces
    uniformly: its tokens cut at multiples of seq_len - p, each piece led by the p special tokens
    the tokenizer puts before a text (with `bos`, its BOS when it puts none), the last document
    cut to fit."""
    fn = "text"
    prefix = _prefix(fn, tokenizer, bos)
    check_int(fn, "seq_len", seq_len, len(prefix) + 1)
    corpus = _corpus(fn, data_dir, glob, split)
    ends = np.cumsum(corpus.sizes)
    piece_len = seq_len - len(prefix)
    docs, free = [], seq_len
    while free > len(prefix):
        f = int(np.searchsorted(ends, rng.integers(ends[-1]), side="right"))
        ids = _file_tokens(tokenizer, corpus.paths[f])
        start = int(rng.integers(-(-len(ids) // piece_len))) * piece_len
        docs.append(
            np.concatenate([prefix, ids[start : start + min(piece_len, free - len(prefix))]])
        )
        free -= len(docs[-1])
    return docs


def vocab_size(tokenizer):
    """The vocabulary size of the tokenizer directory `tokenizer` (None: bytes, None)."""
    return None if tokenizer is None else _tokenizer("text", tokenizer).get_vocab_size()


@functools.lru_cache(maxsize=4)
def _load_tokenizer(directory):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(directory, TOKENIZER))


def _tokenizer(fn, directory):
    """The `tokenizers` Tokenizer of a directory (the `tokenizers` package alone: the data sit
    below ringattn/hf/, whose HFTokenizer wraps the same file for inference)."""
    if not isinstance(directory, str) or not os.path.exists(os.path.join(directory, TOKENIZER)):
        raise ValueError(
            f"{fn}: `tokenizer` must be a directory holding {TOKENIZER} (a run's hf/), got "
            f"{directory!r}."
        )
    return _load_tokenizer(os.path.abspath(directory))


@functools.lru_cache(maxsize=8)
def _prefix(fn, directory, bos):
    """The special tokens the tokenizer puts before a text, with its BOS (tokenizer_config.json's
    bos_token) first when `bos` asks for it. Once per process (every row asks): read-only."""
    tok = _tokenizer(fn, directory)
    plain, special = (tok.encode("a", add_special_tokens=a).ids for a in (False, True))
    n = len(special) - len(plain)
    prefix = special[:n] if n > 0 and special[n:] == plain else []
    if bos:
        path = os.path.join(directory, TOKENIZER_CONFIG)
        token = None
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                token = json.load(f).get("bos_token")
        token = token.get("content") if isinstance(token, dict) else token
        bos_id = None if token is None else tok.token_to_id(token)
        if bos_id is None:
            raise ValueError(f"{fn}: `bos` asks for a BOS, but {path} names none.")
        prefix = prefix if prefix[:1] == [bos_id] else [bos_id, *prefix]
    prefix = np.asarray(prefix, np.int32)
    prefix.flags.writeable = False
    return prefix


@functools.cache
def _file_tokens(tokenizer, path):
    """The tokens [N] int32 of a whole file (no special tokens); read once per process."""
    with open(path, encoding="utf-8", errors="replace") as f:
        ids = _tokenizer("text", tokenizer).encode(f.read(), add_special_tokens=False).ids
    return np.asarray(ids, np.int32)


def text_stream(data_dir=None, split="eval", seed=0, *, length, glob="*.py", bos=False):
    """The first `length` tokens [length] int32 of the split's files concatenated in an order
    shuffled by `seed`: one long stream for streaming perplexity evaluation. With `bos` the
    stream is BOS then the first length - 1 of those tokens (one BOS, at position 0)."""
    fn = "text_stream"
    check_int(fn, "length", length, 1)
    check_int(fn, "seed", seed, 0)
    _check_bos(fn, bos)
    corpus = _corpus(fn, data_dir, glob, split)
    if sum(corpus.sizes) + bos < length:
        raise ValueError(
            f"{fn}: `length` must be <= the {sum(corpus.sizes)} bytes of the {split!r} split"
            f"{' + 1 (BOS)' if bos else ''}, got {length}."
        )
    parts, total = [np.full(int(bos), BOS, np.int32)], int(bos)
    for f in np.random.default_rng(seed).permutation(len(corpus.paths)):
        if total == length:
            break
        parts.append(_read(corpus.paths[f], 0, min(corpus.sizes[f], length - total)))
        total += len(parts[-1])
    return np.concatenate(parts)


def _check_bos(fn, bos):
    if not isinstance(bos, (bool, np.bool_)):
        raise TypeError(f"{fn}: `bos` must be a bool, got {bos!r}.")


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
    tokens[tokens <= BOS] = _STANDIN  # PAD = 0 and BOS = 1
    return tokens
