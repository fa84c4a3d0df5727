"""Synthetic tasks: each answer is where the mask says and retrievable from its needle; passkey
prompts are the training examples cut before the key; needles go at the asked depth."""

import re

import numpy as np
import pytest

from ringattn.train import data, tasks
from ringattn.train.tokens import decode

T = 256


def _batch(task, **kw):
    return data.make_batch(task, seed=3, index=0, batch_size=3, seq_len=T, **kw)


def _passkey_of(text):
    keys = re.findall(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\. ", text)
    assert len(keys) == 1 and keys[0][0] == keys[0][1], text
    return keys[0][0]


def test_passkey_answer(rows):
    batch = _batch("passkey", answer_weight=4.0)
    for b in range(3):
        row = rows.row_of(batch, b)
        text = decode(row["inputs"])
        key = _passkey_of(text)
        assert 5 <= len(key) <= 7
        assert text.endswith("What is the pass key? The pass key is " + key)
        mask = np.zeros(T, bool)
        mask[T - 1 - len(key) : T - 1] = True  # the targets that are the key's digits
        np.testing.assert_array_equal(row["answer_mask"], mask)
        assert decode(row["targets"][row["answer_mask"]]) == key
        np.testing.assert_array_equal(row["weights"][mask], 4.0)
        np.testing.assert_array_equal(row["weights"][~mask], [1.0] * (T - 1 - len(key)) + [0.0])


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_prompt_matches_training_format(depth):
    prompt, key = tasks.passkey_prompt(np.random.default_rng(7), 300, depth)
    example = tasks.passkey(np.random.default_rng(7), 300, depth=depth)
    assert decode(prompt) + key == decode(example.tokens)
    assert decode(prompt).endswith("The pass key is ") and len(prompt) + len(key) == 300
    prompt, key = tasks.passkey_prompt(np.random.default_rng(7), 300, depth, num_digits=12)
    assert len(key) == 12 and len(prompt) == 300 - 12 and _passkey_of(decode(prompt)) == key


@pytest.mark.parametrize("depth, lo, hi", [(0.0, 0, 25), (0.5, 0.4, 0.6), (1.0, None, None)])
def test_passkey_depth(depth, lo, hi):
    """The needle goes at the sentence boundary nearest `depth` of the filler."""
    seq_len = 2000
    for seed in range(3):
        text = decode(tasks.passkey_prompt(np.random.default_rng(seed), seq_len, depth)[0])
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


def test_multikey_answer(rows):
    batch = _batch("multikey", num_keys=5)
    for b in range(3):
        row = rows.row_of(batch, b)
        text = decode(row["inputs"])
        needles = dict(re.findall(r"The pass key for (\w+) is (\d+)\. ", text))
        assert len(needles) == 5
        name, key = re.search(r"What is the pass key for (\w+)\? The pass key for \1 is (\d+)$",
                              text).groups()  # fmt: skip
        assert needles[name] == key
        assert decode(row["targets"][row["answer_mask"]]) == key
        assert row["answer_mask"].sum() == len(key) and row["answer_mask"][-1 - len(key) : -1].all()


def test_multikey_depth():
    text = decode(tasks.multikey(np.random.default_rng(0), 3000, num_keys=3, depth=1.0).tokens)
    name = re.search(r"What is the pass key for (\w+)\?", text).group(1)
    assert re.search(rf"The pass key for {name} is \d+\. What is the pass key", text)


def test_assoc_recall_answers(rows):
    batch = _batch("assoc_recall", num_pairs=6, num_queries=9, key_len=3)
    for b in range(3):
        row = rows.row_of(batch, b)
        text = decode(row["inputs"])
        pairs_text, queries_text = text.split("\nQueries: ")
        pairs = dict(re.findall(r"([a-z]{3}):(\d)", pairs_text.split("\n")[0]))
        queries = re.findall(r"([a-z]{3}):(\d)", queries_text)
        assert len(pairs) == 6 and len(queries) == 9
        assert all(pairs[k] == v for k, v in queries)
        assert {k for k, _ in queries[:6]} == set(pairs)  # each key once before any repeats
        assert decode(row["targets"][row["answer_mask"]]) == "".join(v for _, v in queries)
        # Each answer is predicted from the ':' after its key.
        assert set(row["inputs"][row["answer_mask"]]) == {ord(":")}
