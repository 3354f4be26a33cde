"""Zero-shot commonsense tasks scored by log-likelihood, with the prompts of lm-evaluation-harness.

Each example is a list of choices, choice i being a (context_i, continuation_i) pair; the model
picks the choice with the largest log p(continuation_i | context_i):
* acc: argmax of the summed log-likelihood;
* acc_norm: argmax of the log-likelihood divided by the continuation's length in characters
  (lm-evaluation-harness `acc_norm`), which removes the bias toward short answers.
WinoGrande uses partial scoring: the blank is filled with each option in the context and the
shared rest of the sentence is the continuation, so acc_norm equals acc there.
LAMBADA is not a choice task: acc is whether the greedy continuation is exactly the last word
(every token the argmax) and perplexity is exp(-mean over passages of log p(last word)).

Local files: one JSON object per line in each dataset's published format. Field names per task:
  piqa        goal, sol1, sol2, label (0/1; the original release keeps labels in a separate
              `*-labels.lst`, pass it as `labels_path`)
  hellaswag   activity_label, ctx_a, ctx_b (or ctx / context), endings [4], label
  winogrande  sentence (with one "_"), option1, option2, answer ("1"/"2") or label (0/1)
  arc_easy, arc_challenge
              AI2 release: question {stem, choices [{text, label}]}, answerKey; or the flat form
              question, choices {text [], label []}, answerKey
  siqa        context, question, answerA, answerB, answerC, label ("1".."3"; the original
              release keeps labels in a separate `*-labels.lst`)
  boolq       passage, question, answer (true/false) or label (0/1)
  lambada     text (or passage)
TFDS (prepared in a data_dir, read with `tfds.data_source`): piqa, hellaswag, winogrande,
ai2_arc/ARC-Easy, ai2_arc/ARC-Challenge, bool_q, lambada (TFDS has no SIQA).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np

from nl_jax.eval import loglikelihood as ll_lib
from nl_jax.eval.runner import ModelRunner

TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "siqa", "boolq", "lambada")
TFDS_NAMES = {
    "piqa": "piqa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "boolq": "bool_q",
    "lambada": "lambada",
}
# The split each task is reported on (the test labels of most are not public).
DEFAULT_SPLITS = {
    "piqa": "validation",
    "hellaswag": "validation",
    "winogrande": "validation",
    "arc_easy": "test",
    "arc_challenge": "test",
    "siqa": "validation",
    "boolq": "validation",
    "lambada": "test",
}


@dataclasses.dataclass
class Example:
    """One multiple-choice item: choice i is the pair (contexts[i], continuations[i])."""

    contexts: list[str]
    continuations: list[str]
    label: int

    def __post_init__(self):
        if len(self.contexts) != len(self.continuations) or len(self.contexts) < 2:
            raise ValueError("an example needs >= 2 choices with one context and continuation each")
        if not 0 <= self.label < len(self.contexts):
            raise ValueError(f"label {self.label} is not a choice index (0..{len(self.contexts) - 1})")


def _same_context(context: str, choices: list[str], label: int) -> Example:
    return Example([context] * len(choices), [" " + c for c in choices], label)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def parse_piqa(r: dict) -> Example:
    return _same_context(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"]))


def parse_hellaswag(r: dict) -> Example:
    if "ctx_a" in r:
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    else:
        ctx = r.get("ctx", r.get("context", ""))
    query = _hellaswag_clean(r["activity_label"] + ": " + ctx)
    return _same_context(query, [_hellaswag_clean(e) for e in r["endings"]], int(r["label"]))


def parse_winogrande(r: dict) -> Example:
    sentence = r["sentence"]
    if "_" not in sentence:
        raise ValueError(f"winogrande sentence has no blank '_': {sentence!r}")
    idx = sentence.index("_")
    label = int(r["answer"]) - 1 if "answer" in r and str(r["answer"]).strip() else int(r["label"])
    rest = " " + sentence[idx + 1 :].strip()
    return Example([sentence[:idx] + r["option1"], sentence[:idx] + r["option2"]], [rest, rest], label)


def parse_arc(r: dict) -> Example:
    q = r["question"]
    if isinstance(q, dict):  # AI2 release
        stem, texts, labels = q["stem"], [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]]
    else:
        stem, texts, labels = q, list(r["choices"]["text"]), list(r["choices"]["label"])
    key = r["answerKey"]
    labels = [str(x) for x in labels]
    label = labels.index(str(key)) if str(key) in labels else int(key)  # TFDS: class indices
    return _same_context(f"Question: {stem}\nAnswer:", texts, label)


def parse_siqa(r: dict) -> Example:
    return _same_context(
        f"Q: {r['context']} {r['question']}\nA:",
        [r["answerA"], r["answerB"], r["answerC"]],
        int(r["label"]) - 1,
    )


def parse_boolq(r: dict) -> Example:
    answer = r["answer"] if "answer" in r else r["label"]
    if isinstance(answer, str):
        answer = answer.strip().lower() in ("true", "1", "yes")
    return _same_context(
        f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], int(bool(answer))
    )


def parse_lambada(r: dict) -> tuple[str, str]:
    text = r.get("text", r.get("passage"))
    if not text or " " not in text.strip():
        raise ValueError(f"lambada record needs a 'text' with at least two words, got {text!r}")
    context, word = text.rsplit(" ", 1)
    return context, " " + word


PARSERS = {
    "piqa": parse_piqa,
    "hellaswag": parse_hellaswag,
    "winogrande": parse_winogrande,
    "arc_easy": parse_arc,
    "arc_challenge": parse_arc,
    "siqa": parse_siqa,
    "boolq": parse_boolq,
    "lambada": parse_lambada,
}


def _decoded(x):
    """A TFDS record (bytes, numpy scalars and arrays) as plain Python values."""
    if isinstance(x, dict):
        return {k: _decoded(v) for k, v in x.items()}
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        return [_decoded(v) for v in x.tolist()] if x.ndim else _decoded(x.item())
    if isinstance(x, list):
        return [_decoded(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def read_jsonl(path: str, labels_path: str = "") -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    if labels_path:
        with open(labels_path) as f:
            labels = [x.strip() for x in f if x.strip()]
        if len(labels) != len(records):
            raise ValueError(f"{labels_path} has {len(labels)} labels for {len(records)} records in {path}")
        for r, label in zip(records, labels):
            r["label"] = label
    if not records:
        raise ValueError(f"no records in {path!r}")
    return records


def read_tfds(name: str, split: str, data_dir: str = "", limit: int = 0) -> list[dict]:
    import tensorflow_datasets as tfds

    try:
        src = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:
        raise ValueError(f"cannot open TFDS {name!r} split {split!r} in data_dir {data_dir!r}: {e}") from e
    n = len(src) if limit <= 0 else min(limit, len(src))
    return [_decoded(src[i]) for i in range(n)]


def load_task(
    task: str,
    *,
    path: str = "",
    labels_path: str = "",
    tfds_data_dir: str = "",
    split: str = "",
    limit: int = 0,
):
    """Examples of `task` from a local JSONL file (`path`) or else from TFDS; `limit` > 0 keeps the
    first `limit`. LAMBADA gives (context, last word) pairs, the others `Example`s."""
    if task not in PARSERS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if path:
        records = read_jsonl(path, labels_path)
        records = records[:limit] if limit > 0 else records
    elif task in TFDS_NAMES:
        records = read_tfds(TFDS_NAMES[task], split or DEFAULT_SPLITS[task], tfds_data_dir, limit)
    else:
        raise ValueError(f"task {task!r} has no TFDS dataset: give a local JSONL path")
    parse = PARSERS[task]
    out = []
    for i, r in enumerate(records):
        try:
            out.append(parse(r))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(
                f"{task} record {i} is not in the expected format ({e!r}); see nl_jax.eval.multiple_choice"
            ) from e
    return out


def evaluate_choices(runner: ModelRunner, tokenizer, examples: list[Example], *, max_len: int) -> dict:
    """acc and acc_norm (in %) of multiple-choice examples, with per-example predictions."""
    if not examples:
        raise ValueError("no examples to evaluate")
    requests = [(c, x) for ex in examples for c, x in zip(ex.contexts, ex.continuations)]
    scores = ll_lib.loglikelihood(runner, tokenizer, requests, max_len=max_len)
    correct = correct_norm = 0
    predictions = []
    k = 0
    for ex in examples:
        lls = np.array([s for s, _ in scores[k : k + len(ex.contexts)]])
        k += len(ex.contexts)
        lengths = np.array([len(x) for x in ex.continuations], np.float64)
        pred, pred_norm = int(lls.argmax()), int((lls / lengths).argmax())
        correct += pred == ex.label
        correct_norm += pred_norm == ex.label
        predictions.append(
            {"loglikelihoods": lls.tolist(), "pred": pred, "pred_norm": pred_norm, "label": ex.label}
        )
    n = len(examples)
    return {
        "acc": 100.0 * correct / n,
        "acc_norm": 100.0 * correct_norm / n,
        "num_examples": n,
        "predictions": predictions,
    }


def evaluate_lambada(runner: ModelRunner, tokenizer, pairs: list[tuple[str, str]], *, max_len: int) -> dict:
    """LAMBADA last-word accuracy (greedy exact match, %) and perplexity."""
    if not pairs:
        raise ValueError("no LAMBADA passages to evaluate")
    scores = ll_lib.loglikelihood(runner, tokenizer, pairs, max_len=max_len)
    lls = np.array([s for s, _ in scores])
    return {
        "acc": 100.0 * float(np.mean([g for _, g in scores])),
        "perplexity": math.exp(-float(lls.mean())),
        "num_examples": len(pairs),
    }


def evaluate_task(runner: ModelRunner, tokenizer, task: str, data, *, max_len: int) -> dict:
    """`data` from `load_task(task, ...)`."""
    if task == "lambada":
        return evaluate_lambada(runner, tokenizer, data, max_len=max_len)
    return evaluate_choices(runner, tokenizer, data, max_len=max_len)
