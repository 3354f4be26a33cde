"""Continual learning at test time: memorization across segments and class-incremental
classification, with the model's weights frozen and only its state (fast weights, CMS levels,
KV cache) carrying information forward (docs/design.md, Decision 8).

1. `stream_memorization`: a token stream is cut into K segments of `segment_len` tokens (normally
   the training length) and passed through the model twice, the decode state carried across
   all segments and both passes. Per segment it measures the next-token loss (nats/token)
   * `reset`:  from a fresh state (each segment alone: what training sees),
   * `carried`: first pass, with the state left by every earlier segment,
   * `repeat`: second pass over the same segments, with the state after the whole first pass.
   `context_gain = reset - carried` is what the carried state contributes from earlier text;
   `memorization_gain = carried - repeat` is how much of text seen once, up to 2K segments ago,
   the state still holds. An attention model carries a KV cache of `state_len` tokens (default
   segment_len), so its gains come only from the last `state_len` tokens.

2. `class_incremental`: labelled texts arrive in stages of disjoint classes. Stage s streams
   `shots_per_class` demonstrations per class of stage s ("Text: ...\nLabel: name\n\n", shuffled)
   into the state; then every test example of the classes of stages 0..s is classified from that
   state by the log-likelihood of " name" after "Text: ...\nLabel:", among the names of every class
   seen so far (the class-incremental setting: no stage identity at test time). Each test query
   branches from the state and does not change it. Reported (in %): `accuracy[s][j]` on the
   classes of stage j after stage s, `average_accuracy[s]` over all classes seen after stage s,
   `forgetting[j] = max over s < S-1 of accuracy[s][j] - accuracy[S-1][j]` for j < S-1 (the drop
   from the best to the final accuracy), and their means. With `carry_state=False` the state
   restarts at each stage (a baseline that only remembers the current stage).

   `icl_window > 0` is the in-context-learning baseline: the state restarts at each stage and the
   context is filled with demonstrations of every class seen so far (those of all stages up to s,
   shuffled together), as many whole demonstrations as fit in `icl_window` tokens (the model's
   context window; the rest are dropped). A model's state is a function of the tokens it was
   given, so while every demonstration fits, this differs from the carried state only in their
   order; past the window it shows what the state carries beyond the context.
"""

from __future__ import annotations

import json
import random

import numpy as np

from nl_jax.eval.runner import ModelRunner


def _segment_losses(lp: np.ndarray) -> np.ndarray:
    return -lp.mean(axis=-1)


def stream_memorization(
    runner: ModelRunner,
    stream: np.ndarray,
    *,
    segment_len: int,
    num_segments: int,
    state_len: int = 0,
) -> dict:
    """Per-segment losses reset / carried / repeat and the mean gains (module docstring, 1)."""
    stream = np.asarray(stream, np.int32)
    need = segment_len * num_segments + 1
    if num_segments < 1 or segment_len < 1:
        raise ValueError(f"segment_len and num_segments must be >= 1, got {segment_len}, {num_segments}")
    if len(stream) < need:
        raise ValueError(
            f"the stream has {len(stream)} tokens; {num_segments} segments of {segment_len} need {need}"
        )
    stream = stream[:need]
    xs = stream[:-1].reshape(num_segments, segment_len)
    ys = stream[1:].reshape(num_segments, segment_len)
    reset = _segment_losses(runner.score(xs, ys)[0])
    state = runner.init_state(1, state_len or segment_len)
    passes = []
    for _ in range(2):
        losses = []
        for k in range(num_segments):
            lp, _, state = runner.stream(xs[k : k + 1], ys[k : k + 1], state)
            losses.append(float(_segment_losses(lp)[0]))
        passes.append(np.asarray(losses))
    carried, repeat = passes
    return {
        "segment_len": segment_len,
        "num_segments": num_segments,
        "state_len": state_len or segment_len,
        "reset": reset.tolist(),
        "carried": carried.tolist(),
        "repeat": repeat.tolist(),
        "mean_reset": float(reset.mean()),
        "mean_carried": float(carried.mean()),
        "mean_repeat": float(repeat.mean()),
        "context_gain": float((reset - carried).mean()),
        "memorization_gain": float((carried - repeat).mean()),
    }


def read_labelled_jsonl(path: str, text_key: str = "text", label_key: str = "label") -> list[tuple[str, str]]:
    """(text, label name) pairs from JSON lines; numeric labels become their decimal string."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if text_key not in r or label_key not in r:
                raise ValueError(f"{path}:{lineno}: record needs {text_key!r} and {label_key!r}")
            out.append((str(r[text_key]), str(r[label_key])))
    if not out:
        raise ValueError(f"no records in {path!r}")
    return out


def make_stages(labels: list[str], num_stages: int) -> list[list[str]]:
    """Classes in order of first appearance, split into `num_stages` contiguous groups."""
    classes = list(dict.fromkeys(labels))
    if not 1 <= num_stages <= len(classes):
        raise ValueError(f"num_stages must be in [1, {len(classes)} classes], got {num_stages}")
    bounds = np.linspace(0, len(classes), num_stages + 1).round().astype(int)
    return [classes[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def demonstration(text: str, label: str) -> str:
    return f"Text: {text}\nLabel: {label}\n\n"


def _encode(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), np.int32)


def longest_query(tokenizer, test: list[tuple[str, str]], labels: list[str]) -> int:
    """Tokens of the longest classification query with the longest label: the room a context of
    demonstrations must leave."""
    label = max((_encode(tokenizer, " " + c) for c in labels), key=len, default=np.zeros(0))
    query = max((len(_encode(tokenizer, f"Text: {t}\nLabel:")) for t, _ in test), default=0)
    return query + len(label)


def _classify(runner, tokenizer, state, queries, candidates, state_len) -> list[str]:
    """Label of each query text by the largest log p(" name" | state, query); state unchanged."""
    rows = []  # (query index, candidate index, tokens, number of scored label tokens)
    for qi, text in enumerate(queries):
        q = _encode(tokenizer, f"Text: {text}\nLabel:")
        for ci, name in enumerate(candidates):
            lab = _encode(tokenizer, " " + name)
            rows.append((qi, ci, np.concatenate([q, lab]), len(lab)))
    scores = np.full((len(queries), len(candidates)), -np.inf)
    b = runner.batch_size
    for start in range(0, len(rows), b):
        part = rows[start : start + b]
        width = max(len(r[2]) for r in part) - 1
        width = -(-width // runner.length_bucket) * runner.length_bucket  # few shapes; state is discarded
        xs = np.zeros((b, width), np.int32)
        ys = np.zeros((b, width), np.int32)
        for i, (_, _, toks, _) in enumerate(part):
            xs[i, : len(toks) - 1], ys[i, : len(toks) - 1] = toks[:-1], toks[1:]
        lp, _, _ = runner.stream(xs, ys, runner.broadcast_state(state, b, state_len))
        for i, (qi, ci, toks, k) in enumerate(part):
            n = len(toks) - 1
            scores[qi, ci] = lp[i, n - k : n].sum()
    return [candidates[i] for i in scores.argmax(axis=1)]


def class_incremental(
    runner: ModelRunner,
    tokenizer,
    train: list[tuple[str, str]],
    test: list[tuple[str, str]],
    *,
    stages: list[list[str]] | None = None,
    num_stages: int = 2,
    shots_per_class: int = 4,
    max_test_per_class: int = 0,
    state_len: int = 2048,
    carry_state: bool = True,
    icl_window: int = 0,
    seed: int = 0,
) -> dict:
    """The protocol of the module docstring, 2."""
    stages = stages or make_stages([lab for _, lab in train], num_stages)
    rng = random.Random(seed)
    by_class: dict[str, list[str]] = {}
    for text, lab in train:
        by_class.setdefault(lab, []).append(text)
    tests: dict[str, list[str]] = {}
    for text, lab in test:
        tests.setdefault(lab, []).append(text)
    for stage in stages:
        for c in stage:
            if c not in by_class or c not in tests:
                raise ValueError(f"class {c!r} needs both training and test examples")
    if max_test_per_class > 0:
        tests = {c: t[:max_test_per_class] for c, t in tests.items()}

    state = runner.init_state(1, state_len)
    seen: list[str] = []
    accuracy: list[list[float]] = []
    average: list[float] = []
    kept: list[int] = []  # icl: demonstrations that fit in the window, per stage
    for s, stage in enumerate(stages):
        fresh = s == 0 or not carry_state or icl_window > 0
        if fresh:
            state = runner.init_state(1, state_len)
        demos = [
            (t, c) for c in (seen + stage if icl_window else stage) for t in by_class[c][:shots_per_class]
        ]
        rng.shuffle(demos)
        if icl_window:
            demos = _fit(tokenizer, demos, icl_window - 1)  # one token for the EOS that starts it
            kept.append(len(demos))
        toks = _encode(tokenizer, "".join(demonstration(t, c) for t, c in demos))
        if fresh:
            toks = np.concatenate([[tokenizer.eos_id], toks]).astype(np.int32)
        # every demonstration token is consumed as an input; the targets are not used
        _, _, state = runner.stream_chunked(toks[None], np.zeros_like(toks)[None], state)
        seen += stage
        row, correct_all, total_all = [], 0, 0
        for j in range(s + 1):
            queries = [(t, c) for c in stages[j] for t in tests[c]]
            preds = _classify(runner, tokenizer, state, [t for t, _ in queries], seen, state_len)
            correct = sum(p == c for p, (_, c) in zip(preds, queries))
            row.append(100.0 * correct / len(queries))
            correct_all += correct
            total_all += len(queries)
        accuracy.append(row)
        average.append(100.0 * correct_all / total_all)
    last = len(stages) - 1
    forgetting = [max(accuracy[s][j] for s in range(j, last)) - accuracy[last][j] for j in range(last)]
    out = {
        "stages": stages,
        "method": "icl" if icl_window else "carried" if carry_state else "reset",
        "carry_state": carry_state,
        "shots_per_class": shots_per_class,
        "accuracy": accuracy,
        "average_accuracy": average,
        "final_average_accuracy": average[-1],
        "forgetting": forgetting,
        "mean_forgetting": float(np.mean(forgetting)) if forgetting else 0.0,
    }
    if icl_window:
        out.update(icl_window=icl_window, demonstrations_kept=kept)
    return out


def _fit(tokenizer, demos: list[tuple[str, str]], budget: int) -> list[tuple[str, str]]:
    """The last whole demonstrations whose text takes at most `budget` tokens."""
    total, start = 0, len(demos)
    while start > 0:
        n = len(_encode(tokenizer, demonstration(*demos[start - 1])))
        if total + n > budget:
            break
        start, total = start - 1, total + n
    # tokens of a joined text may differ from the sum of its parts' (subword merges at the seams)
    while (
        start < len(demos)
        and len(_encode(tokenizer, "".join(demonstration(*d) for d in demos[start:]))) > budget
    ):
        start += 1
    return demos[start:]
