"""In-context recall on real documents (paper Table 3): SWDE, NQ, DROP, FDA, SQuAD, TriviaQA in the
format of the "Just read twice" release (Arora et al. 2024, arXiv 2407.05483, after "Simple linear
attention language models balance the recall-throughput tradeoff", arXiv 2402.18668).

Every document holds its answer; the model reads the document and a query and must continue with
the answer. Files: `<data_dir>/recall/<task>.jsonl`, one example per line, in either of the
release's two layouts:

  {"text": prompt, "value": answer}                           SWDE, FDA, SQuAD, NQ
  {"context": document, "question": query, "answers": [...]}  TriviaQA, DROP (prompt: context + " " +
                                                              question; any answer counts)

Protocol: the prompt (its last `context_len` tokens when longer: the query sits at the end and must
survive the cut), greedy decoding of up to 48 tokens, the continuation up to its first newline;
an example is right when an answer occurs in it, case-insensitively (lm-evaluation-harness's
"contains"). Accuracy is the share of right examples (%).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

TASKS = ("swde", "nq", "drop", "fda", "squad", "triviaqa")
TITLES = {"swde": "SWDE", "nq": "NQ", "drop": "DROP", "fda": "FDA", "squad": "SQuAD", "triviaqa": "TQA"}
MAX_NEW_TOKENS = 48


def task_file(data_dir: str, task: str) -> str:
    return os.path.join(data_dir, "recall", f"{task}.jsonl")


def read_examples(path: str, limit: int = 0) -> list[tuple[str, list[str]]]:
    """(prompt, answers) of each line of a release file; ValueError naming the line otherwise."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "text" in row and "value" in row:
                prompt, answers = row["text"].strip(), [row["value"]]
            elif "context" in row and "question" in row and "answers" in row:
                prompt = row["context"].strip() + " " + row["question"].strip()
                answers = row["answers"] if isinstance(row["answers"], list) else [row["answers"]]
            else:
                raise ValueError(
                    f"{path}:{i}: expected {{text, value}} or {{context, question, answers}}, got {sorted(row)}"
                )
            answers = [a.strip() for a in answers if a and a.strip()]
            if not answers:
                raise ValueError(f"{path}:{i}: no answer")
            out.append((prompt, answers))
            if limit and len(out) == limit:
                break
    return out


def contains(output: str, answers: list[str]) -> bool:
    return any(re.search(re.escape(a), output, re.IGNORECASE) for a in answers)


def continuation(tokenizer, ids) -> str:
    """The generated text up to its first newline (or EOS)."""
    ids = np.asarray(ids)
    ends = np.flatnonzero(ids == tokenizer.eos_id)
    text = tokenizer.decode(ids[: ends[0]] if len(ends) else ids)
    return text.split("\n", 1)[0]


def greedy_continuations(
    runner, tokenizer, prompts: list[np.ndarray], max_new_tokens: int, max_len: int | None = None
) -> list[str]:
    """`continuation` of each prompt's greedy decoding; prompts of equal token length decode as one
    batch. `max_len`: the decode state's length (default: each batch's prompt + new tokens)."""
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    outputs: list[str] = [""] * len(prompts)
    for idx in by_length.values():
        for start in range(0, len(idx), runner.batch_size):
            batch = idx[start : start + runner.batch_size]
            generated = runner.generate(
                np.stack([prompts[i] for i in batch]), max_new_tokens, max_len=max_len
            )
            for i, ids in zip(batch, generated):
                outputs[i] = continuation(tokenizer, ids)
    return outputs


def evaluate_task(
    runner, tokenizer, examples, *, context_len: int, max_new_tokens: int = MAX_NEW_TOKENS
) -> dict:
    """Accuracy (%) on (prompt, answers) examples."""
    prompts = [tokenizer.encode(p) for p, _ in examples]
    truncated = sum(len(p) > context_len for p in prompts)
    prompts = [np.asarray(p[-context_len:], np.int32) for p in prompts]
    outputs = greedy_continuations(runner, tokenizer, prompts, max_new_tokens)
    right = [contains(o, answers) for o, (_, answers) in zip(outputs, examples)]
    return {
        "contains": 100.0 * float(np.mean(right)) if right else float("nan"),
        "num_examples": len(examples),
        "truncated": int(truncated),
        "samples": [
            {"output": o, "answers": a, "right": r} for o, (_, a), r in zip(outputs, examples, right)
        ],
    }
