"""Formal-language recognition (the setting of Bhattamishra et al. 2020, "On the Ability and
Limitations of Transformers to Recognize Formal Languages", arXiv 2009.11264, which Irie et al.
2023, arXiv 2310.16076, use for linear Transformers): parity, (aa)*, (abab)*, a^n b^n,
a^n b^n c^n and Shuffle-2, generated from a seed.

Recognition as next-symbol prediction: after each prefix of a string of the language (from the
empty one, read as a BOS token), the model predicts the set of symbols that may come next, END
included when the prefix is itself in the language: one sigmoid per symbol of the language and END.
A string counts as recognised when every position's thresholded prediction equals its set;
accuracy is the share of recognised strings.

Models train on strings of length 1..`train_len` and are scored on fresh strings of those lengths
("in distribution") and of lengths `train_len`+1..2 x `train_len` (beyond the training length).

  parity      strings over {0, 1} with an even number of 1s
  aa          (aa)*: a's, even length
  abab        (abab)*
  anbn        a^n b^n, n >= 1
  anbncn      a^n b^n c^n, n >= 1
  shuffle2    the shuffle of two Dyck-1 languages, () and []: each bracket kind balanced on its own

(aa)*, (abab)*, a^n b^n and a^n b^n c^n have one string per length, so their in-distribution test
strings are training strings; for parity and Shuffle-2 they are drawn outside the training set.

The published protocol. Irie et al. train on the datasets Bhattamishra et al. released (the code
of arXiv 2310.16076 reads them at "level 50"): strings of up to 50 symbols for training and for the
first test bin ("Bin0"), 51-100 for the second ("Bin1"; Shuffle-2 from 52, its lengths being even),
10,000 training strings and 2,000 per test bin (the generator of Bhattamishra et al. defaults to 500
test strings; the count in the released files is unchecked). Each model trains with the
hyper-parameters the paper's appendix lists per model and language, with no weight decay, and stops
once Bin1 is recognised perfectly. nl_jax's lengths are the same by default (`PROTOCOL_TRAIN_LEN`);
its CPU default draws 1,000 training and 64 test strings per bin, and `experiments.evaluate
--formal_train_examples=0 --formal_test_examples=0` draws the published `PROTOCOL_TRAIN_EXAMPLES`
and `PROTOCOL_TEST_EXAMPLES`. The released files are fixed samples; these strings are drawn from a
seed with the same definitions, so the strings differ, not the languages or the lengths.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nl_jax.eval.task_training import TaskData

PAD, BOS, END = 0, 1, 2
SYMBOLS = "01abc()[]"  # token id of SYMBOLS[i]: 3 + i
LANGUAGES = ("parity", "aa", "abab", "anbn", "anbncn", "shuffle2")
TITLES = {
    "parity": "Parity",
    "aa": "(aa)*",
    "abab": "(abab)*",
    "anbn": "a^n b^n",
    "anbncn": "a^n b^n c^n",
    "shuffle2": "Shuffle-2",
}
ALPHABETS = {"parity": "01", "aa": "a", "abab": "ab", "anbn": "ab", "anbncn": "abc", "shuffle2": "()[]"}
ONE_PER_LENGTH = ("aa", "abab", "anbn", "anbncn")
# the published sizes (module docstring): training strings, and test strings per length range
PROTOCOL_TRAIN_LEN = 50
PROTOCOL_TRAIN_EXAMPLES = 10_000
PROTOCOL_TEST_EXAMPLES = 2_000


def token(symbol: str) -> int:
    return 3 + SYMBOLS.index(symbol)


def classes(language: str) -> tuple[int, ...]:
    """Token ids whose logits are the language's predictions: END, then its symbols."""
    return (END,) + tuple(token(s) for s in ALPHABETS[language])


def lengths(language: str, lo: int, hi: int) -> list[int]:
    """Lengths in [lo, hi] that strings of the language have (the empty string is never drawn)."""
    step = {"parity": 1, "aa": 2, "abab": 4, "anbn": 2, "anbncn": 3, "shuffle2": 2}[language]
    return [n for n in range(max(lo, 1), hi + 1) if n % step == 0]


def sample(language: str, rng: np.random.Generator, length: int) -> str:
    """A string of the language of exactly `length` symbols (a length from `lengths`)."""
    if language == "parity":
        bits = rng.integers(0, 2, size=length)
        bits[-1] = bits[:-1].sum() % 2  # makes the count of 1s even
        return "".join(str(b) for b in bits)
    if language == "aa":
        return "a" * length
    if language == "abab":
        return "ab" * (length // 2)
    if language == "anbn":
        return "a" * (length // 2) + "b" * (length // 2)
    if language == "anbncn":
        return "a" * (length // 3) + "b" * (length // 3) + "c" * (length // 3)
    if language == "shuffle2":
        out, open_ = [], {"(": 0, "[": 0}
        for remaining in range(length, 0, -1):
            moves = [c for c, o in ((")", "("), ("]", "[")) if open_[o]]
            if sum(open_.values()) + 1 <= remaining - 1:  # an opening bracket can still be closed
                moves += ["(", "["]
            c = moves[int(rng.integers(0, len(moves)))]
            if c in open_:
                open_[c] += 1
            else:
                open_["(" if c == ")" else "["] -= 1
            out.append(c)
        return "".join(out)
    raise ValueError(f"unknown language {language!r}; choose from {LANGUAGES}")


def follow(language: str, prefix: str) -> set[str]:
    """The symbols that may follow `prefix` (a prefix of a string of the language), "$" for END."""
    n = len(prefix)
    if language == "parity":
        return {"0", "1"} | ({"$"} if prefix.count("1") % 2 == 0 else set())
    if language == "aa":
        return {"a"} | ({"$"} if n % 2 == 0 else set())
    if language == "abab":
        return {"ab"[n % 2]} | ({"$"} if n % 4 == 0 else set())
    if language in ("anbn", "anbncn"):
        a, b, c = prefix.count("a"), prefix.count("b"), prefix.count("c")
        last = "c" if language == "anbncn" else "$"
        if b == 0:
            return {"a"} | ({"b"} if a else set())
        if c == 0 and b < a:
            return {"b"}
        if c == 0:  # b == a
            return {last}
        return {"c"} if c < a else {"$"}
    if language == "shuffle2":
        p = prefix.count("(") - prefix.count(")")
        s = prefix.count("[") - prefix.count("]")
        return (
            {"(", "["}
            | ({")"} if p else set())
            | ({"]"} if s else set())
            | ({"$"} if not p and not s else set())
        )
    raise ValueError(f"unknown language {language!r}; choose from {LANGUAGES}")


def encode(language: str, strings: list[str]) -> TaskData:
    """BOS + symbols, padded; targets [N, T, K] over `classes(language)` (END first)."""
    order = "$" + ALPHABETS[language]
    t = 1 + max(len(s) for s in strings)
    inputs = np.full((len(strings), t), PAD, np.int32)
    targets = np.zeros((len(strings), t, len(order)), np.float32)
    weights = np.zeros((len(strings), t), np.float32)
    for i, s in enumerate(strings):
        inputs[i, : len(s) + 1] = [BOS] + [token(c) for c in s]
        for j in range(len(s) + 1):
            allowed = follow(language, s[:j])
            targets[i, j] = [c in allowed for c in order]
        weights[i, : len(s) + 1] = 1.0
    return TaskData(inputs, targets, weights)


@dataclasses.dataclass(frozen=True)
class Split:
    train: list[str]
    test_id: list[str]
    test_ood: list[str]


def make_split(
    language: str, train_len: int, train_examples: int, test_examples: int, seed: int = 0
) -> Split:
    """Training strings of lengths 1..train_len, and `test_examples` test strings of those lengths
    and of train_len+1..2 x train_len (each length drawn uniformly among the language's)."""
    rngs = [np.random.default_rng([seed, i]) for i in range(3)]

    def draw(rng, lo, hi, n, exclude=frozenset()):
        ls = lengths(language, lo, hi)
        if not ls:
            raise ValueError(f"{language} has no strings of lengths {lo}..{hi}; use a longer train length")
        out, tries = [], 0
        while len(out) < n:
            s = sample(language, rng, int(rng.choice(ls)))
            tries += 1
            if s not in exclude or tries > 100 * n:  # a finite set of strings may be exhausted
                out.append(s)
        return out

    train = draw(rngs[0], 1, train_len, train_examples)
    exclude = frozenset() if language in ONE_PER_LENGTH else frozenset(train)
    return Split(
        train,
        draw(rngs[1], 1, train_len, test_examples, exclude),
        draw(rngs[2], train_len + 1, 2 * train_len, test_examples),
    )


def recognised(logits: np.ndarray, data: TaskData) -> np.ndarray:
    """bool [N]: every scored position's predicted set (logit > 0) equals its target set."""
    wrong = ((logits > 0) != (data.targets > 0.5)).any(-1) & (data.weights > 0)
    return ~wrong.any(-1)


def accuracy(logits: np.ndarray, data: TaskData) -> float:
    return float(100.0 * recognised(logits, data).mean()) if len(data) else float("nan")
