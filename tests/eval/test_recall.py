"""The in-context recall suite on files in the release's two layouts, with a bigram model whose
greedy continuation the test fixes: after ":" it writes " Paris" then a newline then "London"."""

import json

import numpy as np
import pytest

from nl_jax.data.tokenizers import load_tokenizer
from nl_jax.eval import recall, report, suites
from nl_jax.eval.runner import ModelRunner

TOK = load_tokenizer("byte")


@pytest.fixture
def runner(bigram):
    table = np.full((260, 260), -5.0, np.float32)
    chain = TOK.encode(": Paris\nLondon")
    for a, b in zip(chain[:-1], chain[1:]):
        table[a, b] = 5.0
    table[chain[-1], TOK.eos_id] = 5.0
    table[TOK.encode("?")[0], TOK.encode("x")[0]] = 5.0  # after "?": x x x ...
    table[TOK.encode("x")[0], TOK.encode("x")[0]] = 5.0
    return ModelRunner(bigram(table), batch_size=2, length_bucket=16)


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_both_layouts_and_the_contains_rule(tmp_path, runner):
    _write(
        tmp_path / "recall" / "swde.jsonl",
        [
            {"text": "The capital of France is Paris. Capital:", "value": "paris"},  # right, any case
            {"text": "Where is the tower? City:", "value": "London"},  # after the newline: wrong
            {"text": "Where is the tower?", "value": "Paris"},  # continues with x x x: wrong
        ],
    )
    _write(
        tmp_path / "recall" / "triviaqa.jsonl",
        [{"context": "Paris is in France.", "question": "Where? Answer:", "answers": ["Rome", "PARIS"]}],
    )
    options = suites.SuiteOptions(data_dir=str(tmp_path), recall_max_new_tokens=16)
    out = suites.run_recall(runner, TOK, 64, str(tmp_path), options)
    assert out["swde"]["contains"] == pytest.approx(100.0 / 3) and out["swde"]["num_examples"] == 3
    assert out["triviaqa"]["contains"] == 100.0
    assert set(out["_skipped"]) == {"nq", "drop", "fda", "squad"}
    samples = [json.loads(x) for x in open(tmp_path / "recall_samples.jsonl")]
    assert [s["output"] for s in samples[:3]] == [" Paris", " Paris", "x" * 16]
    md = report.markdown_report({"m": {"recall": out}})
    assert "| Model | SWDE | TQA | Avg |" in md and "| m | 33.3 | 100.0 | 66.7* |" in md


def test_long_prompts_keep_their_end(runner):
    # the query at the end survives the cut: kept from the start, the prompt would end with "?"
    examples = [("?" * 50 + " Capital:", ["Paris"]), ("Capital:", ["Paris"])]
    out = recall.evaluate_task(runner, TOK, examples, context_len=20, max_new_tokens=8)
    assert out["contains"] == 100.0 and out["truncated"] == 1


def test_limit_and_malformed_lines(tmp_path):
    path = tmp_path / "nq.jsonl"
    _write(path, [{"text": f"q{i}", "value": f"a{i}"} for i in range(5)])
    assert recall.read_examples(str(path), limit=2) == [("q0", ["a0"]), ("q1", ["a1"])]
    _write(path, [{"text": "q", "value": "a"}, {"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"nq.jsonl:2: expected"):
        recall.read_examples(str(path))


def test_no_recall_file_at_all_is_an_error_before_any_model(tmp_path):
    with pytest.raises(ValueError, match="has no data"):
        suites.check_recall_data(suites.SuiteOptions(data_dir=str(tmp_path)))
    _write(tmp_path / "recall" / "fda.jsonl", [{"text": "q", "value": "a"}])
    suites.check_recall_data(suites.SuiteOptions(data_dir=str(tmp_path)))
