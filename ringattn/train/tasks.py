"""Synthetic long-context tasks: passkey retrieval, several keys, associative recall.

A task is a function (rng, seq_len, **params) -> an Example of exactly seq_len tokens, built from
`rng` alone; its answer tokens carry `answer_weight` in the loss. Text is filler sentences with
needles inserted between them, so every answer is retrievable only from its needle.
"""

from __future__ import annotations

import numpy as np

from ringattn.train.tokens import Example, check_int, encode

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
    check_int(fn, "num_keys", num_keys, 1)
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
    check_int(fn, "num_pairs", num_pairs, 1)
    check_int(fn, "key_len", key_len, 1)
    num_queries = num_pairs if num_queries is None else num_queries
    check_int(fn, "num_queries", num_queries, 1)
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


def _passkey_text(fn, rng, seq_len, depth, min_digits, max_digits, num_digits):
    """(text up to the key, key) of a passkey example of seq_len tokens."""
    _check_digits(fn, min_digits, max_digits)
    if num_digits is not None:
        check_int(fn, "num_digits", num_digits, 1)
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
    check_int(fn, "seq_len", seq_len, 1)
    if seq_len < need:
        raise ValueError(f"{fn}: `seq_len` must be at least {need} to hold {what}, got {seq_len}.")


def _check_digits(fn, min_digits, max_digits):
    check_int(fn, "min_digits", min_digits, 1)
    check_int(fn, "max_digits", max_digits, min_digits)
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


def _example(text, answer_spans, answer_weight):
    tokens = encode(text)
    is_answer = np.zeros(len(tokens), bool)
    for start, stop in answer_spans:
        is_answer[start:stop] = True
    return Example(tokens, is_answer, np.where(is_answer, answer_weight, 1.0).astype(np.float32))
