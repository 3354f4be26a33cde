"""The MAD task generators, each checked by a reading of its sequences written here."""

import dataclasses

import numpy as np
import pytest

from nl_jax.eval import mad

SMALL = dict(train_examples=64, test_examples=32)


def _spec(task, **kw):
    return dataclasses.replace(mad.TASKS[task], **{**SMALL, **kw})


def _scored(data, i):
    """(positions, targets) of sequence i's scored positions."""
    pos = np.flatnonzero(data.weights[i] > 0)
    return pos, data.targets[i, pos]


@pytest.mark.parametrize("task", list(mad.TASKS))
def test_same_seed_same_split_other_seed_other_split(task):
    spec = _spec(task, seq_len=min(mad.TASKS[task].seq_len, 64))
    a, b, c = (mad.make_split(task, spec, seed=s) for s in (3, 3, 4))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.inputs, y.inputs)
        np.testing.assert_array_equal(x.targets, y.targets)
        np.testing.assert_array_equal(x.weights, y.weights)
    assert not np.array_equal(a[0].inputs, c[0].inputs)
    train, test = a
    assert train.inputs.shape[0] == spec.train_examples and test.inputs.shape[0] == spec.test_examples
    assert train.inputs.max() < spec.vocab and (test.weights.sum(1) > 0).all()


@pytest.mark.parametrize("task", ["compression", "recall", "fuzzy_recall", "selective_copy"])
def test_test_inputs_are_not_training_inputs(task):
    # vocabulary 4 and short sequences: random sequences repeat often, so the rule is exercised
    spec = _spec(task, vocab=6, seq_len=8, copy_tokens=2, motif=1, train_examples=200, test_examples=20)
    train, test = mad.make_split(task, spec, seed=0)
    seen = {row.tobytes() for row in train.inputs}
    assert not any(row.tobytes() in seen for row in test.inputs)


def test_selective_copy_answer_is_the_non_blank_tokens():
    spec = _spec("selective_copy", seq_len=48, copy_tokens=6)
    _, test = mad.make_split("selective_copy", spec, seed=1)
    copy, blank = spec.vocab - 1, spec.vocab - 2
    for i in range(len(test)):
        row = test.inputs[i]
        (at,) = np.flatnonzero(row == copy)
        data = [t for t in row[:at] if t != blank]
        pos, answer = _scored(test, i)
        assert answer.tolist() == data and len(data) == 6
        assert (row[at + 1 :] == blank).all() and pos.tolist() == list(range(at + 1, at + 7))


def test_compression_answer_is_the_sequence_before_the_compression_token():
    spec = _spec("compression", seq_len=16)
    train, test = mad.make_split("compression", spec, seed=2)
    token = spec.vocab - 1
    for data in (train, test):
        for i in range(len(data)):
            row = data.inputs[i]
            first = int(np.flatnonzero(row == token)[0])
            pos, answer = _scored(data, i)
            assert answer.tolist() == row[:first].tolist() and pos[0] == first
            assert (row[first:] == token).all()


def test_recall_scores_values_of_keys_seen_before():
    spec = _spec("recall", seq_len=32)
    train, test = mad.make_split("recall", spec, seed=3)
    half = spec.vocab // 2
    for i in range(len(test)):
        row = test.inputs[i].tolist()
        pos, answer = _scored(test, i)
        assert pos[-1] == len(row) - 1  # the final key is always probed
        for p, v in zip(pos.tolist(), answer.tolist()):
            key = row[p]
            assert key < half <= v
            earlier = [row[j + 1] for j in range(0, p, 2) if row[j] == key]
            assert earlier and all(e == v for e in earlier)
    # training targets: every next token
    np.testing.assert_array_equal(train.targets[:, :-1], train.inputs[:, 1:])


def test_fuzzy_recall_answers_repeat_an_earlier_key_value_pair_and_test_keys_are_longest():
    spec = _spec("fuzzy_recall", seq_len=64)
    _, test = mad.make_split("fuzzy_recall", spec, seed=4)
    half = (spec.vocab - 1) // 2
    for i in range(len(test)):
        row = test.inputs[i].tolist()
        pos, answer = _scored(test, i)
        runs = np.split(np.arange(len(pos)), np.flatnonzero(np.diff(pos) > 1) + 1)
        for run in runs:
            start, value = int(pos[run[0]]), answer[run].tolist()
            key = row[start - 2 : start + 1]  # test keys are 3 tokens, the last at the run's start
            assert all(k < half for k in key) and all(half <= v < spec.vocab - 1 for v in value)
            found = any(
                row[j : j + 3] == key and row[j + 3 : j + 3 + len(value)] == value for j in range(start - 2)
            )
            assert found


def test_memorization_uses_one_fixed_map_in_train_and_test():
    spec = _spec("memorization", train_examples=64)
    train, test = mad.make_split("memorization", spec, seed=5)
    other_train, _ = mad.make_split("memorization", spec, seed=6)
    facts = {}
    for data in (train, test, other_train):
        for i in range(len(data)):
            pos, answer = _scored(data, i)
            for p, v in zip(pos.tolist(), answer.tolist()):
                key = int(data.inputs[i, p - 1])
                assert data.inputs[i, p] == spec.vocab - 1
                assert facts.setdefault(key, v) == v  # one value per key, whatever the seed
    assert len(set(facts.values())) == len(facts)  # a one-to-one map
    assert max(facts) < (spec.vocab - 1) // 2 <= min(facts.values())


def test_scaled_spec_caps_lengths_and_keeps_memorization_training_size():
    assert mad.scaled_spec("selective_copy", max_len=64).seq_len == 64
    assert mad.scaled_spec("selective_copy", max_len=64).copy_tokens == 16
    assert mad.scaled_spec("selective_copy", max_len=32).copy_tokens == 7
    assert mad.scaled_spec("compression", max_len=64).seq_len == 32
    assert mad.scaled_spec("recall").seq_len == 128
    assert mad.scaled_spec("memorization", train_examples=1000).train_examples == 256
    assert mad.scaled_spec("recall", train_examples=1000, test_examples=10).test_examples == 10


def test_accuracy_counts_scored_positions_only():
    spec = _spec("selective_copy", seq_len=40, copy_tokens=4, test_examples=4)
    _, test = mad.make_split("selective_copy", spec, seed=0)
    logits = np.zeros(test.inputs.shape + (spec.vocab,), np.float32)
    np.put_along_axis(logits, test.targets[..., None], 1.0, axis=-1)  # right everywhere
    assert mad.accuracy(logits, test) == 100.0
    pos, _ = _scored(test, 0)
    logits[0, pos[0]] = 0.0
    logits[0, pos[0], (test.targets[0, pos[0]] + 1) % spec.vocab] = 1.0  # one answer wrong
    assert mad.accuracy(logits, test) == pytest.approx(100.0 * 15 / 16)
