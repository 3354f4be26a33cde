"""The formal-language generators and next-symbol sets, checked against membership tests written
here (regular expressions and counting) and against sets found by enumerating short strings."""

import itertools
import re

import numpy as np
import pytest

from nl_jax.eval import formal


def member(language: str, s: str) -> bool:
    if language == "parity":
        return set(s) <= {"0", "1"} and s.count("1") % 2 == 0
    if language == "aa":
        return re.fullmatch("(aa)*", s) is not None
    if language == "abab":
        return re.fullmatch("(abab)*", s) is not None
    if language == "anbn":
        m = re.fullmatch("(a+)(b+)", s)
        return m is not None and len(m[1]) == len(m[2])
    if language == "anbncn":
        m = re.fullmatch("(a+)(b+)(c+)", s)
        return m is not None and len(m[1]) == len(m[2]) == len(m[3])
    if language == "shuffle2":
        for opening, closing in ("()", "[]"):
            depth = 0
            for c in s:
                depth += (c == opening) - (c == closing)
                if depth < 0:
                    return False
            if depth:
                return False
        return set(s) <= set("()[]")
    raise AssertionError(language)


@pytest.mark.parametrize("language", formal.LANGUAGES)
def test_generated_strings_are_in_the_language_at_their_lengths(language):
    split = formal.make_split(language, train_len=12, train_examples=200, test_examples=50, seed=0)
    for strings, lo, hi in ((split.train, 1, 12), (split.test_id, 1, 12), (split.test_ood, 13, 24)):
        assert len(strings) in (200, 50)
        for s in strings:
            assert member(language, s), s
            assert lo <= len(s) <= hi, s
    assert max(len(s) for s in split.test_ood) > 12


@pytest.mark.parametrize("language", formal.LANGUAGES)
def test_follow_sets_match_enumerated_continuations(language):
    alphabet = formal.ALPHABETS[language]
    # long enough that every prefix of up to 3 symbols shows all its continuations
    longest = {"shuffle2": 8, "anbncn": 12}.get(language, 9)
    words = ["".join(w) for n in range(longest + 1) for w in itertools.product(alphabet, repeat=n)]
    members = [w for w in words if member(language, w)]
    prefixes = {w[:k] for w in members for k in range(min(len(w), 3) + 1)}
    assert len(prefixes) > 1
    for p in prefixes:
        expected = {w[len(p)] for w in members if w.startswith(p) and len(w) > len(p)}
        expected |= {"$"} if member(language, p) else set()
        assert formal.follow(language, p) == expected, (p, expected)


@pytest.mark.parametrize("language", formal.LANGUAGES)
def test_same_seed_same_strings(language):
    a = formal.make_split(language, 10, 30, 10, seed=1)
    assert a == formal.make_split(language, 10, 30, 10, seed=1)
    if language not in formal.ONE_PER_LENGTH:
        assert a != formal.make_split(language, 10, 30, 10, seed=2)


@pytest.mark.parametrize("language", ["parity", "shuffle2"])
def test_in_distribution_test_strings_are_not_training_strings(language):
    split = formal.make_split(language, train_len=8, train_examples=100, test_examples=40, seed=0)
    assert not set(split.test_id) & set(split.train)


def test_encode_targets_are_the_follow_sets():
    data = formal.encode("anbn", ["ab", "aabb"])
    assert data.inputs[0].tolist() == [
        formal.BOS,
        formal.token("a"),
        formal.token("b"),
        formal.PAD,
        formal.PAD,
    ]
    assert data.weights.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    # classes: END, a, b
    assert data.targets[1].tolist() == [[0, 1, 0], [0, 1, 1], [0, 1, 1], [0, 0, 1], [1, 0, 0]]
    assert formal.classes("anbn") == (formal.END, formal.token("a"), formal.token("b"))


def test_a_string_is_recognised_only_if_every_position_is_right():
    data = formal.encode("shuffle2", ["()", "[()]", "(())[]"])
    logits = np.where(data.targets > 0.5, 3.0, -3.0)
    assert formal.accuracy(logits, data) == 100.0
    logits[1, 2, 0] *= -1  # one class at one position of the second string
    assert formal.recognised(logits, data).tolist() == [True, False, True]
    logits[0, 4, :] = 5.0  # padding positions of the first string do not count
    assert formal.recognised(logits, data).tolist() == [True, False, True]
