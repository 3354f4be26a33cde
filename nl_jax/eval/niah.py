"""Needle-in-a-haystack in the style of RULER (Hsieh et al. 2024), generated locally in token space.

Tasks (named as in the paper's NIAH table, Table 1):
  s_niah_1   passkey: noise haystack, "The pass key is N. Remember it. N is the pass key."
  s_niah_2   number: text haystack, one needle "One of the special magic numbers for KEY is: N."
  s_niah_3   uuid: as s_niah_2 with a UUID value
  mk_niah_1  multi-key: 4 needles with different keys (numbers), one of them is asked for
  mq_niah    multi-query: 4 needles with different keys, all 4 values are asked for
  mv_niah    multi-value: 4 needles with the same key and different values, all 4 asked for
The "noise" haystack repeats RULER's five sentences; the text haystack is any text given (RULER uses
Paul Graham essays; the evaluate command uses held-out documents of the configured data, or a file).

Construction is exact in tokens: the template prefix, the haystack, the needles and the question
are tokenized separately and concatenated, the haystack is cut so that the whole prompt has exactly
`length` tokens, and needle i starts at haystack token round(depth_i * H) (H: haystack tokens),
moved to the nearest sentence start when `snap_to_sentence` (the default, so no sentence is cut).
The first needle (the one asked for in s/mk tasks) sits at the requested depth, the others at
seeded random depths. `NiahSample.needle_positions` gives each needle's first token in the prompt.

Scoring: greedy decoding after the prompt (which ends with the answer prefix, as in RULER) until
EOS or `max_new_tokens`; a sample's score is the fraction of its expected values that appear in
the output (case-insensitive substring, RULER's string_match_all): 1 right, 0 wrong, in between
partial for the multi-value tasks. Accuracy is the mean score in %.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import uuid

import numpy as np

from nl_jax.eval.runner import ModelRunner

TASKS = ("s_niah_1", "s_niah_2", "s_niah_3", "mk_niah_1", "mq_niah", "mv_niah")
TASK_TITLES = {
    "s_niah_1": "S-NIAH-1 (passkey)",
    "s_niah_2": "S-NIAH-2 (number)",
    "s_niah_3": "S-NIAH-3 (uuid)",
    "mk_niah_1": "MK-NIAH-1",
    "mq_niah": "MQ-NIAH",
    "mv_niah": "MV-NIAH",
}
DEFAULT_LENGTHS = (4096, 8192, 16384)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NOISE = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
_ADJECTIVES = (
    "amber ancient bitter brave calm clever crimson curious damp eager early faint fancy fierce fluffy "
    "gentle glossy golden grumpy hollow humble icy jolly lazy lively lucky mellow misty noble odd pale "
    "proud quick quiet rapid rough rusty shiny silent silver sleepy smooth solid spicy steady sturdy "
    "swift tame tender tidy tiny vivid wary wild witty young zesty"
).split()
_NOUNS = (
    "anchor apple badger banjo basket beacon candle canyon cactus castle comet compass cricket desert "
    "dolphin dragon engine falcon feather forest galaxy garden glacier harbor helmet island jacket "
    "kettle lantern lemon magnet meadow mirror monkey needle ocean orchard otter parrot pebble pillow "
    "planet pocket puzzle quartz rabbit river rocket saddle shadow spider statue thunder tiger tunnel "
    "violin walrus window wizard"
).split()


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    haystack: str  # "noise" or "text"
    value: str  # "number" or "uuid"
    num_keys: int  # needles with distinct keys
    num_values: int  # values per key
    num_queries: int  # keys asked for


SPECS = {
    "s_niah_1": TaskSpec("noise", "number", 1, 1, 1),
    "s_niah_2": TaskSpec("text", "number", 1, 1, 1),
    "s_niah_3": TaskSpec("text", "uuid", 1, 1, 1),
    "mk_niah_1": TaskSpec("text", "number", 4, 1, 1),
    "mq_niah": TaskSpec("text", "number", 4, 1, 4),
    "mv_niah": TaskSpec("text", "number", 1, 4, 1),
}


@dataclasses.dataclass
class NiahSample:
    task: str
    length: int
    depth: float
    tokens: np.ndarray  # int32 [length]: the whole prompt, ending with the answer prefix
    needle_positions: list[int]  # first token of each needle in `tokens`, in needle order
    needle_tokens: list[np.ndarray]
    needle_depths: list[float]  # actual haystack fraction before each needle
    answers: list[str]  # values the output must contain


def split_sentences(text: str) -> list[str]:
    """Sentences (or lines, for text without sentence ends) of a haystack text."""
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [p.strip() for p in parts if p.strip()]


def _value(kind: str, rng: random.Random) -> str:
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return str(rng.randint(1_000_000, 9_999_999))


def _keys(n: int, rng: random.Random) -> list[str]:
    keys: list[str] = []
    while len(keys) < n:
        k = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if k not in keys:
            keys.append(k)
    return keys


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _texts(spec: TaskSpec, rng: random.Random):
    """(prefix, needle texts, question, answers)."""
    if spec.haystack == "noise" and spec.num_keys == 1 and spec.num_values == 1:
        v = _value(spec.value, rng)
        prefix = (
            "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
            "it. I will quiz you about the important information there.\n"
        )
        needle = f" The pass key is {v}. Remember it. {v} is the pass key."
        return prefix, [needle], "\nWhat is the pass key? The pass key is", [v]
    kind = "numbers" if spec.value == "number" else "uuids"
    keys = _keys(spec.num_keys, rng)
    values = [[_value(spec.value, rng) for _ in range(spec.num_values)] for _ in keys]
    needles = [
        f" One of the special magic {kind} for {k} is: {v}." for k, vs in zip(keys, values) for v in vs
    ]
    queried = list(range(spec.num_queries)) if spec.num_queries > 1 else [0]
    query = _join([keys[i] for i in queried])
    answers = [v for i in queried for v in values[i]]
    prefix = (
        f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {kind} afterwards.\n"
    )
    question = (
        f"\nWhat are all the special magic {kind} for {query} mentioned in the provided text? "
        f"The special magic {kind} for {query} mentioned in the provided text are"
    )
    return prefix, needles, question, answers


def _encode(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), np.int32)


def _haystack(tokenizer, sentences: list[str], budget: int):
    """Token stream of cycled sentences cut to `budget` tokens, and the sentence start offsets."""
    encoded = [_encode(tokenizer, " " + s) for s in sentences]
    encoded = [e for e in encoded if len(e)]
    if not encoded:
        raise ValueError("the haystack text has no sentences")
    parts, starts, total, i = [], [], 0, 0
    while total < budget:
        starts.append(total)
        parts.append(encoded[i % len(encoded)])
        total += len(parts[-1])
        i += 1
    hay = np.concatenate(parts)[:budget] if parts else np.zeros((0,), np.int32)
    return hay, np.asarray(starts + [budget], np.int64)


def make_sample(
    task: str,
    tokenizer,
    length: int,
    depth: float,
    *,
    seed: int = 0,
    haystack_text: str = "",
    snap_to_sentence: bool = True,
) -> NiahSample:
    """One prompt of exactly `length` tokens (see the module docstring)."""
    if task not in SPECS:
        raise ValueError(f"unknown NIAH task {task!r}; choose from {TASKS}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    spec = SPECS[task]
    rng = random.Random(f"{task}/{length}/{depth}/{seed}")
    prefix, needles, question, answers = _texts(spec, rng)
    prefix_t, question_t = _encode(tokenizer, prefix), _encode(tokenizer, question)
    needle_t = [_encode(tokenizer, n) for n in needles]
    budget = length - len(prefix_t) - len(question_t) - sum(len(n) for n in needle_t)
    if budget < 0:
        raise ValueError(
            f"length {length} is too short for task {task!r}: the template and needles alone take "
            f"{length - budget} tokens"
        )
    if spec.haystack == "noise":
        sentences = list(NOISE)
    else:
        sentences = split_sentences(haystack_text)
        if not sentences:
            raise ValueError(f"task {task!r} needs a haystack text (haystack_text is empty)")
    hay, starts = _haystack(tokenizer, sentences, budget)
    depths = [depth] + [rng.random() for _ in needle_t[1:]]
    offsets = []
    for d in depths:
        p = int(round(d * budget))
        if snap_to_sentence:
            p = int(starts[np.abs(starts - p).argmin()])
        offsets.append(p)
    order = sorted(range(len(needle_t)), key=lambda i: (offsets[i], i))
    pieces, positions, cursor, pos = [prefix_t], [0] * len(needle_t), 0, len(prefix_t)
    for i in order:
        pieces.append(hay[cursor : offsets[i]])
        pos += offsets[i] - cursor
        positions[i] = pos
        pieces.append(needle_t[i])
        pos += len(needle_t[i])
        cursor = offsets[i]
    pieces += [hay[cursor:], question_t]
    tokens = np.concatenate(pieces).astype(np.int32)
    assert len(tokens) == length, (len(tokens), length)
    return NiahSample(
        task,
        length,
        depth,
        tokens,
        positions,
        needle_t,
        [o / budget if budget else 0.0 for o in offsets],
        answers,
    )


def grade(output: str, answers: list[str]) -> float:
    """Fraction of `answers` contained in `output` (case-insensitive)."""
    if not answers:
        raise ValueError("no answers to grade against")
    low = output.lower()
    return sum(a.lower() in low for a in answers) / len(answers)


def decode_until_eos(tokenizer, ids) -> str:
    ids = list(np.asarray(ids).tolist())
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    return tokenizer.decode(ids)


def max_new_tokens_for(tokenizer, samples: list[NiahSample]) -> int:
    """Room for every expected value, written as a comma-separated list, plus a little slack."""
    need = max(len(_encode(tokenizer, " " + ", ".join(s.answers) + ".")) for s in samples)
    return need + 8


def memory_needed(
    runner: ModelRunner, length: int, num_prompts: int, vocab_size: int, batch_size: int = 0
) -> tuple[int, int]:
    """(host bytes, device bytes) that prompts of `length` tokens need at the least, before any is
    generated: the `num_prompts` prompts of a (task, length) cell as int32 on the host; on the
    devices, one batch of prompts plus the decode state at `length` tokens (decoding models, from
    `jax.eval_shape` of `init_decode_state`) or one batch's float32 logits (models decoded by full
    forwards). A lower bound, so refusing a grid that exceeds the memory is never wrong. A model that
    cannot build a state of that length raises ValueError. `batch_size`: rows decoded at once
    (default: the runner's)."""
    import jax

    rows = batch_size or runner.batch_size
    host = num_prompts * length * 4
    batch = rows * length * 4
    if not runner.can_decode:
        return host, batch + rows * length * vocab_size * 4
    try:
        state = jax.eval_shape(lambda: runner._init_state(rows, length))
    except Exception as e:  # e.g. a length the model's position arithmetic cannot hold
        raise ValueError(f"the model cannot decode {length} tokens: {type(e).__name__}: {e}") from e
    return host, batch + sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def evaluate_niah(
    runner: ModelRunner,
    tokenizer,
    *,
    tasks=TASKS,
    lengths=DEFAULT_LENGTHS,
    depths=DEFAULT_DEPTHS,
    num_samples: int = 4,
    haystack_text: str = "",
    seed: int = 0,
    max_new_tokens: int = 0,
) -> dict:
    """Accuracy (%) per task, length and depth, the mean over depths per task and length, and
    every sample's output. Samples of one (task, length) have equal token counts and decode as one
    batch."""
    results: dict = {"accuracy": {}, "by_depth": {}, "samples": []}
    for task in tasks:
        results["accuracy"][task], results["by_depth"][task] = {}, {}
        for length in lengths:
            samples = [
                make_sample(task, tokenizer, length, d, seed=seed + s, haystack_text=haystack_text)
                for d in depths
                for s in range(num_samples)
            ]
            n_new = max_new_tokens or max_new_tokens_for(tokenizer, samples)
            outputs = []
            for start in range(0, len(samples), runner.batch_size):
                batch = samples[start : start + runner.batch_size]
                outputs.extend(runner.generate(np.stack([s.tokens for s in batch]), n_new))
            scores = []
            for s, out in zip(samples, outputs):
                text = decode_until_eos(tokenizer, out)
                score = grade(text, s.answers)
                scores.append(score)
                results["samples"].append(
                    {
                        "task": task,
                        "length": length,
                        "depth": s.depth,
                        "answers": s.answers,
                        "output": text,
                        "score": score,
                    }
                )
            scores = np.asarray(scores).reshape(len(depths), num_samples)
            results["by_depth"][task][str(length)] = {
                str(d): 100.0 * float(scores[i].mean()) for i, d in enumerate(depths)
            }
            results["accuracy"][task][str(length)] = 100.0 * float(scores.mean())
    return results


def plot_heatmaps(results: dict, out_dir: str) -> list[str]:
    """One PNG per task: accuracy over (depth, length); returns the file paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for task, by_len in results["by_depth"].items():
        lengths = list(by_len)
        depths = list(by_len[lengths[0]])
        grid = np.array([[by_len[n][d] for n in lengths] for d in depths])
        fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.5 * len(depths) + 1.8))
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{int(n) // 1024}K" if int(n) >= 1024 else n for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(TASK_TITLES.get(task, task))
        for i in range(len(depths)):
            for j in range(len(lengths)):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax, label="accuracy (%)")
        fig.tight_layout()
        path = os.path.join(out_dir, f"niah_{task}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
