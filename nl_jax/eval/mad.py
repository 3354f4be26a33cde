"""The Mechanistic Architecture Design tasks (Poli et al. 2024, "Mechanistic Design and Scaling of
Hybrid Architectures", arXiv 2403.17844), generated from a seed.

Every example is `(inputs, train_targets, test_targets)`, int arrays of one length aligned by
position: the model reading inputs[:t+1] should output targets[t]; -1 marks a position that is not
scored. As in the protocol, the recall tasks train on every next token and are scored only on the
recalled values; the other tasks train and score the same positions. Accuracy is the share of
scored positions whose argmax is the target.

  compression      L-1 random tokens and a compression token; the model then reproduces them in
                   order, one per position, from queries that are the compression token again.
                   (The protocol decodes the sequence from the compression position with a separate
                   MLP decoder; a causal model has no such head, so it answers position by position
                   from its own state and context.)
  recall           key-value pairs (keys from the lower half of the vocabulary, values from the
                   upper, one value per key within a sequence); every value whose key appeared
                   before is scored (the protocol's multi-query setting).
  fuzzy_recall     the same with keys and values of 1-3 tokens; test sequences use keys of 3 tokens.
  selective_copy   16 tokens scattered among blanks, a copy token, then blanks at which the 16
                   tokens are to be written in order.
  memorization     a key-value map fixed by `MEMORY_SEED` (the same facts in train and test, which is
                   the point of the task); each sequence asks the values of random keys.

Splits: `make_split` draws train and test examples from different seeds and drops any test
example whose inputs also occur in the training set (the protocol's leakage check made a rule),
except for memorization, whose test set asks the training facts again.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from nl_jax.eval.task_training import TaskData

IGNORE = -1
MEMORY_SEED = 12345  # fixes the memorization facts independently of the example seed


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task's settings; the defaults of TASKS are the protocol's baseline."""

    vocab: int
    seq_len: int
    train_examples: int = 12_800
    test_examples: int = 1_280
    copy_tokens: int = 16  # selective_copy
    motif: int = 3  # fuzzy_recall: longest key / value


TASKS = {
    "compression": TaskSpec(vocab=16, seq_len=32),
    "recall": TaskSpec(vocab=16, seq_len=128),
    "fuzzy_recall": TaskSpec(vocab=16, seq_len=128),
    "selective_copy": TaskSpec(vocab=16, seq_len=256),
    "memorization": TaskSpec(vocab=256, seq_len=32, train_examples=256),
}
TITLES = {
    "compression": "Compression",
    "recall": "ICR",
    "fuzzy_recall": "Fuzzy ICR",
    "selective_copy": "Selective Copying",
    "memorization": "Memorization",
}


def _next_token_targets(seq: list[int], pad: int | None = None) -> np.ndarray:
    """Training targets of a language-model-style task: each position predicts the next token."""
    nxt = np.asarray(seq[1:] + [IGNORE])
    if pad is not None:
        nxt[np.asarray(seq) == pad] = IGNORE
    return nxt


def compression(rng: np.random.Generator, spec: TaskSpec, train: bool = True):
    special = spec.vocab - 1
    data = rng.integers(0, special, size=spec.seq_len - 1).tolist()
    inputs = data + [special] * len(data)
    targets = [IGNORE] * len(data) + data  # data[0] is due at the compression token
    return np.asarray(inputs), np.asarray(targets), np.asarray(targets)


def recall(rng: np.random.Generator, spec: TaskSpec, train: bool = True):
    half = spec.vocab // 2
    pairs = spec.seq_len // 2
    values: dict[int, int] = {}
    seq, scored = [], []
    for i in range(pairs):
        # the last pair always probes a key already shown, so every sequence has an answer
        k = int(rng.choice(list(values))) if i == pairs - 1 and values else int(rng.integers(0, half))
        seen = k in values
        v = values.setdefault(k, int(rng.integers(half, spec.vocab)))
        seq += [k, v]
        scored += [False, seen]
    inputs = seq[:-1]
    test = [seq[t + 1] if scored[t + 1] else IGNORE for t in range(len(inputs))]
    return np.asarray(inputs), _next_token_targets(seq)[:-1], np.asarray(test)


def _motifs(tokens: range, size: int) -> list[tuple[int, ...]]:
    return list(itertools.permutations(tokens, size))


def fuzzy_recall(rng: np.random.Generator, spec: TaskSpec, train: bool = True):
    pad = spec.vocab - 1
    half = (spec.vocab - 1) // 2
    key_tokens, value_tokens = range(half), range(half, spec.vocab - 1)
    key_sizes = list(range(1, spec.motif + 1)) if train else [spec.motif]

    def draw(tokens, sizes):
        size = int(rng.choice(sizes))
        return tuple(int(x) for x in rng.permutation(np.asarray(tokens))[:size])

    values: dict[tuple, tuple] = {}
    seq, scored = [], []
    budget = spec.seq_len + 1 - 2 * spec.motif  # room for the final probe
    while True:
        k = draw(key_tokens, key_sizes)
        v = values.get(k) or draw(value_tokens, list(range(1, spec.motif + 1)))
        if len(seq) + len(k) + len(v) > budget:
            break
        seq += list(k) + list(v)
        scored += [False] * len(k) + [k in values] * len(v)
        values[k] = v
    if not values:
        raise ValueError(f"seq_len={spec.seq_len} holds no key-value pair of up to {spec.motif} tokens")
    k = list(values)[int(rng.integers(0, len(values)))]
    seq += list(k) + list(values[k])
    scored += [False] * len(k) + [True] * len(values[k])
    front = spec.seq_len + 1 - len(seq)
    seq, scored = [pad] * front + seq, [False] * front + scored
    inputs = seq[:-1]
    test = [seq[t + 1] if scored[t + 1] else IGNORE for t in range(len(inputs))]
    return np.asarray(inputs), _next_token_targets(seq, pad)[:-1], np.asarray(test)


def selective_copy(rng: np.random.Generator, spec: TaskSpec, train: bool = True):
    copy, blank = spec.vocab - 1, spec.vocab - 2
    n = spec.copy_tokens
    blanks = spec.seq_len - 2 * n - 1
    if blanks < 0:
        raise ValueError(f"seq_len={spec.seq_len} is too short to copy {n} tokens")
    data = rng.integers(0, blank, size=n)
    where = np.sort(rng.choice(n + blanks, size=n, replace=False))  # positions of the data tokens
    body = np.full(n + blanks, blank)
    body[where] = data
    inputs = np.concatenate([body, [copy], np.full(n, blank)])
    # the i-th token is due at the i-th blank after the copy token
    targets = np.full(len(inputs), IGNORE)
    targets[n + blanks + 1 :] = data
    return inputs, targets, targets


def memory_map(vocab: int) -> dict[int, int]:
    """The fixed facts of the memorization task: key (lower half) -> value (upper half)."""
    rng = np.random.default_rng(MEMORY_SEED)
    usable = vocab - 1
    keys = np.arange(usable // 2)
    values = rng.permutation(np.arange(usable // 2, usable))[: len(keys)]
    return dict(zip(keys.tolist(), values.tolist()))


def memorization(rng: np.random.Generator, spec: TaskSpec, train: bool = True):
    facts = memory_map(spec.vocab)
    ask = spec.vocab - 1
    keys = rng.choice(len(facts), size=spec.seq_len // 2)
    inputs = np.stack([keys, np.full_like(keys, ask)], axis=1).reshape(-1)
    targets = np.stack([np.full_like(keys, IGNORE), [facts[int(k)] for k in keys]], axis=1).reshape(-1)
    return inputs, targets, targets


GENERATORS = {
    "compression": compression,
    "recall": recall,
    "fuzzy_recall": fuzzy_recall,
    "selective_copy": selective_copy,
    "memorization": memorization,
}


def scaled_spec(task: str, max_len: int = 0, train_examples: int = 0, test_examples: int = 0) -> TaskSpec:
    """The protocol's spec of `task` with its sequence length capped at `max_len` and the given
    numbers of examples (0: the protocol's; memorization keeps its 256 training sequences). A
    selective copy too short for its 16 tokens copies a quarter of its length."""
    spec = TASKS[task]
    if max_len and spec.seq_len > max_len:
        spec = dataclasses.replace(spec, seq_len=max_len)
        if 2 * spec.copy_tokens + 1 > max_len:
            spec = dataclasses.replace(spec, copy_tokens=max(1, (max_len - 1) // 4))
    if train_examples and task != "memorization":
        spec = dataclasses.replace(spec, train_examples=train_examples)
    if test_examples:
        spec = dataclasses.replace(spec, test_examples=test_examples)
    return spec


def _stack(examples, which: int) -> TaskData:
    inputs = np.stack([e[0] for e in examples]).astype(np.int32)
    targets = np.stack([e[which] for e in examples])
    weights = (targets != IGNORE).astype(np.float32)
    return TaskData(inputs, np.where(targets == IGNORE, 0, targets).astype(np.int32), weights)


def make_split(task: str, spec: TaskSpec, seed: int = 0) -> tuple[TaskData, TaskData]:
    """(train, test) of `task`: training sequences with their training targets, test sequences
    with their scored targets; test inputs never repeat a training input (but memorization's)."""
    gen = GENERATORS[task]
    train_rng, test_rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    train = [gen(train_rng, spec, True) for _ in range(spec.train_examples)]
    seen = {e[0].tobytes() for e in train} if task != "memorization" else set()
    test, tries = [], 0
    while len(test) < spec.test_examples:
        e = gen(test_rng, spec, False)
        tries += 1
        if e[0].tobytes() not in seen:
            test.append(e)
        elif tries > 100 * spec.test_examples:
            raise ValueError(
                f"{task}: too few sequences outside the training set; use fewer training examples"
            )
    return _stack(train, 1), _stack(test, 2)


def accuracy(logits: np.ndarray, data: TaskData) -> float:
    """Share of scored positions whose argmax is the target (%)."""
    hit = (logits.argmax(-1) == data.targets) & (data.weights > 0)
    return float(100.0 * hit.sum() / max(data.weights.sum(), 1.0))
