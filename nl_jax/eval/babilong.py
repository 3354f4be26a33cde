"""BABILong (Kuratov et al. 2024, "BABILong: Testing the Limits of LLMs with Long Context
Reasoning-in-a-Haystack", arXiv 2406.10149): the bAbI question-answering tasks qa1-qa20 with their
facts scattered through long book text, at lengths of 0K to 10M tokens.

Files, as the Hugging Face releases lay them out (downloaded beforehand; nothing is fetched here),
under `<data_dir>/babilong/`:

  <length>/<task>-*.parquet      RMT-team/babilong, RMT-team/babilong-1k-samples (evaluation sets)
  <length>/<task>.jsonl | .json  the same rows as JSON lines or a JSON array (e.g. written by
                                 `datasets.load_dataset(...).to_json(...)`)
  data/<task>/<length>.json      RMT-team/babilong-train-5k-samples (training set)

`<length>` is the release's name ("0k", "1k", "2k", ..., "128k"), `<task>` is "qa1" ... "qa20";
every row has `input` (the long context), `question` and `target`.

Protocol: the prompt is `input`, then "Question: ...", then "Answer:" (the converter of
`experiments/prepare_babilong.py` writes training text in the same template, so a fine-tuned model
continues it with the answer); greedy decoding of up to 16 tokens, the continuation up to its first
newline. Scored as the release's metric does: the first sentence of the output, lower-cased, must
mention the target and no other of the task's answer labels (labels that occur in the question do
not count). A target of several labels (qa8's "apple,football") must be mentioned as exactly those
labels. Greedy decoding, not ranking the labels by likelihood: it is the release's own protocol, it
serves qa8's lists and any model (also those without a decode state), and it scores what the
fine-tuning recipe trains a model to do. Accuracy is the share of right examples (%).
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np

from nl_jax.eval import recall

TASKS = tuple(f"qa{i}" for i in range(1, 21))
DEFAULT_TASKS = TASKS[:5]  # qa1-qa5: the tasks every length of RMT-team/babilong has, and most reports use
MAX_NEW_TOKENS = 16

# The answer vocabulary of each task (BABILong's metrics, from the bAbI answers).
_PLACES = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
TASK_LABELS = {
    "qa1": _PLACES,
    "qa2": _PLACES,
    "qa3": _PLACES,
    "qa4": _PLACES,
    "qa5": ("bill", "fred", "jeff", "mary", "apple", "football", "milk"),
    "qa6": ("no", "yes"),
    "qa7": ("none", "one", "three", "two"),
    "qa8": ("apple", "football", "milk", "nothing"),
    "qa9": ("no", "yes"),
    "qa10": ("maybe", "no", "yes"),
    "qa11": _PLACES,
    "qa12": _PLACES,
    "qa13": _PLACES,
    "qa14": ("bedroom", "cinema", "kitchen", "office", "park", "school"),
    "qa15": ("cat", "mouse", "sheep", "wolf"),
    "qa16": ("gray", "green", "white", "yellow"),
    "qa17": ("no", "yes"),
    "qa18": ("no", "yes"),
    "qa19": ("e,e", "e,n", "e,s", "n,e", "n,n", "n,w", "s,e", "s,s", "s,w", "w,n", "w,s", "w,w"),
    "qa20": ("bedroom", "bored", "garden", "hungry", "kitchen", "thirsty", "tired"),
}
FIELDS = ("input", "question", "target")


def length_tokens(name: str) -> int:
    """The release's length name in tokens ("4k" -> 4096; "0k": facts only, 0)."""
    m = re.fullmatch(r"(\d+)([km]?)", name.strip().lower())
    if not m:
        raise ValueError(f"BABILong length {name!r}: expected a release name such as 0k, 1k, 4k, 128k, 1m")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2)]


def lengths_in(root: str) -> list[str]:
    """The length directories under `root` (`<length>/`, and `data/<task>/<length>.json`), shortest first."""
    names = set()
    for path in glob.glob(os.path.join(root, "*")) + glob.glob(os.path.join(root, "data", "qa*", "*.json")):
        name = os.path.basename(path).removesuffix(".json")
        if re.fullmatch(r"\d+[km]?", name.lower()):
            names.add(name)
    return sorted(names, key=length_tokens)


def task_files(root: str, length: str, task: str) -> list[str]:
    """The files holding `task` at `length` under `root`, in any of the release layouts; [] if none."""
    for pattern in (f"{length}/{task}.jsonl", f"{length}/{task}.json", f"{length}/{task}-*.parquet"):
        found = sorted(glob.glob(os.path.join(root, pattern)))
        if found:
            return found
    path = os.path.join(root, "data", task, f"{length}.json")
    return [path] if os.path.isfile(path) else []


def _rows_of(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ValueError(
                f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert the file to "
                "JSON lines beside it (<task>.jsonl)"
            ) from e
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # one JSON array
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_examples(paths: list[str], limit: int = 0) -> list[dict]:
    """The rows {input, question, target} of the files, in order; ValueError naming a bad file."""
    out = []
    for path in paths:
        try:
            rows = _rows_of(path)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON lines or a JSON array of BABILong rows ({e})") from e
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict) or any(k not in row for k in FIELDS):
                got = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{path}: row {i}: expected the fields input, question, target; got {got}")
            out.append({k: str(row[k]) for k in FIELDS})
            if limit and len(out) == limit:
                return out
    if not out:
        raise ValueError(f"{', '.join(paths)}: no BABILong rows")
    return out


def prompt(example: dict) -> str:
    return f"{example['input'].strip()}\nQuestion: {example['question'].strip()}\nAnswer:"


def training_text(example: dict) -> str:
    """One fine-tuning document: the evaluation prompt and the answer after it."""
    return f"{prompt(example)} {example['target'].strip()}"


def is_right(task: str, output: str, target: str, question: str) -> bool:
    """BABILong's metric (module docstring)."""
    labels = TASK_LABELS[task]
    first = output.lower().split(".")[0]
    asked = {a for a in labels if a in question.lower()}
    said = {a for a in labels if a in first} - asked
    target = target.strip().lower()
    want = {target} if target in labels else {t.strip() for t in target.split(",")}
    return said == want


def encode_prompts(tokenizer, examples: list[dict]) -> list[np.ndarray]:
    return [np.asarray(tokenizer.encode(prompt(e)), np.int32) for e in examples]


def evaluate_task(
    runner,
    tokenizer,
    task: str,
    examples: list[dict],
    prompts: list[np.ndarray] | None = None,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict:
    """Accuracy (%) of one task at one length; `prompts`: the examples' `encode_prompts`. No prompt
    is cut (the length of the context is what is measured)."""
    prompts = encode_prompts(tokenizer, examples) if prompts is None else prompts
    # one decode state size per task and length, so the cell compiles its programs once
    max_len = max(len(p) for p in prompts) + max_new_tokens
    outputs = recall.greedy_continuations(runner, tokenizer, prompts, max_new_tokens, max_len=max_len)
    right = [is_right(task, o, e["target"], e["question"]) for o, e in zip(outputs, examples)]
    return {
        "accuracy": 100.0 * float(np.mean(right)) if right else float("nan"),
        "num_examples": len(examples),
        "max_prompt_tokens": max_len - max_new_tokens,
        "samples": [
            {"output": o, "target": e["target"], "right": r} for o, e, r in zip(outputs, examples, right)
        ],
    }


def longest_group(prompt_lengths: list[int], batch_size: int) -> int:
    """Rows of the largest batch `greedy_continuations` decodes at once (prompts of equal length)."""
    counts: dict[int, int] = {}
    for n in prompt_lengths:
        counts[n] = counts.get(n, 0) + 1
    return min(batch_size, max(counts.values(), default=1))
