"""The BABILong suite on files in the release's layouts, with a bigram model whose greedy
continuation the test fixes: after ":" it writes " garden." and a newline."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nl_jax.data.tokenizers import load_tokenizer
from nl_jax.eval import babilong, report, suites
from nl_jax.eval.runner import ModelRunner

TOK = load_tokenizer("byte")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _table():
    table = np.full((260, 260), -5.0, np.float32)
    chain = TOK.encode(": garden.\n")
    for a, b in zip(chain[:-1], chain[1:]):
        table[a, b] = 5.0
    table[chain[-1], TOK.eos_id] = 5.0
    return table


@pytest.fixture
def runner(bigram):
    return ModelRunner(bigram(_table()), batch_size=2, length_bucket=16)


def _row(target, context="Mary went to the garden. John went to the kitchen.", question="Where is Mary?"):
    return {"input": context, "question": question, "target": target}


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_release_metric():
    assert babilong.is_right(
        "qa1", " garden. Then kitchen", "garden", "Where is Mary?"
    )  # first sentence only
    assert not babilong.is_right("qa1", " garden or kitchen", "garden", "Where is Mary?")  # two answers
    assert not babilong.is_right("qa1", " the hallway", "garden", "Where is Mary?")
    # a label the question names is never the answer, so it does not count against the output
    assert babilong.is_right(
        "qa2", " Kitchen, not the office", "kitchen", "Where was the apple before the office?"
    )
    assert babilong.is_right("qa8", " apple and football", "apple,football", "What is Mary carrying?")
    assert not babilong.is_right("qa8", " apple", "apple,football", "What is Mary carrying?")
    assert babilong.is_right("qa19", " n,w", "n,w", "How do you go from the garden to the office?")
    assert babilong.length_tokens("4k") == 4096 and babilong.length_tokens("0k") == 0
    with pytest.raises(ValueError, match="expected a release name"):
        babilong.length_tokens("4 thousand")


def test_layouts_accuracy_and_table(tmp_path, runner):
    root = tmp_path / "babilong"
    _jsonl(root / "1k" / "qa1.jsonl", [_row("garden"), _row("kitchen")])  # right, wrong
    (root / "1k" / "qa2.json").write_text(json.dumps([_row("garden")]))  # a JSON array
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "2k").mkdir()
    rows = [_row("garden"), _row("office"), _row("garden"), _row("garden")]
    pq.write_table(pa.Table.from_pylist(rows[:2]), root / "2k" / "qa1-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:]), root / "2k" / "qa1-00001-of-00002.parquet")
    assert babilong.lengths_in(str(root)) == ["1k", "2k"]

    options = suites.SuiteOptions(data_dir=str(tmp_path), babilong_tasks=("qa1", "qa2"))
    out = suites.run_babilong(runner, TOK, str(tmp_path), options)
    assert out["qa1"]["1k"]["accuracy"] == 50.0 and out["qa2"]["1k"]["accuracy"] == 100.0
    assert out["qa1"]["2k"]["accuracy"] == 75.0 and out["qa1"]["2k"]["num_examples"] == 4
    assert set(out["_skipped"]) == {"qa2/2k"}
    samples = [json.loads(x) for x in open(tmp_path / "babilong_samples.jsonl")]
    assert samples[0]["output"] == " garden." and [s["right"] for s in samples[:2]] == [True, False]
    md = report.markdown_report({"m": {"babilong": out}})
    assert "| Model | task | 1K | 2K |" in md
    assert "| m | qa1 | 50.0 | 75.0 |" in md and "| m | qa2 | 100.0 | - |" in md
    assert "| m | avg | 75.0 | 75.0 |" in md

    limited = suites.run_babilong(
        runner, TOK, str(tmp_path), suites.SuiteOptions(data_dir=str(tmp_path), limit=1)
    )
    assert limited["qa1"]["1k"]["num_examples"] == 1 and limited["qa1"]["2k"]["accuracy"] == 100.0


class _Bounded(nnx.Module):
    """The bigram model with positions that end at 300 tokens: it cannot decode longer prompts."""

    def __init__(self, table):
        self.table = nnx.Param(jnp.asarray(table))

    def __call__(self, tokens):
        return self.table[...][tokens]

    def init_decode_state(self, batch_size, max_len):
        if max_len > 300:
            raise ValueError(f"positions end at 300, asked for {max_len}")
        return {"count": jnp.zeros((batch_size,), jnp.int32)}

    def decode_step(self, tokens, state):
        return self.table[...][tokens], {"count": state["count"] + 1}


def test_a_length_the_model_cannot_stream_is_one_skipped_line(tmp_path, capsys):
    runner = ModelRunner(_Bounded(_table()), batch_size=2, length_bucket=16)
    root = tmp_path / "babilong"
    _jsonl(root / "0k" / "qa1.jsonl", [_row("garden")])
    long = " ".join(["Mary went to the garden."] * 20)  # about 500 tokens
    for task in ("qa1", "qa2"):
        _jsonl(root / "4k" / f"{task}.jsonl", [_row("garden", context=long)])
    options = suites.SuiteOptions(data_dir=str(tmp_path), babilong_tasks=("qa1", "qa2"))
    out = suites.run_babilong(runner, TOK, str(tmp_path), options)
    assert out["qa1"]["0k"]["accuracy"] == 100.0 and "4k" not in out["qa1"]
    assert "positions end at 300" in out["_skipped"]["4k"]
    lines = [x for x in capsys.readouterr().err.splitlines() if "4k" in x]
    assert len(lines) == 1 and lines[0].startswith("warning: skipped babilong/4k: the model cannot stream 4k")


def test_memory_the_machine_lacks_skips_the_length(tmp_path, runner, monkeypatch):
    root = tmp_path / "babilong"
    _jsonl(root / "1k" / "qa1.jsonl", [_row("garden")])
    _jsonl(root / "8k" / "qa1.jsonl", [_row("garden", context="x" * 4000)])
    monkeypatch.setattr(suites, "_available_memory", lambda: (4000, None))  # bytes: the 8k prompt needs more
    out = suites.run_babilong(runner, TOK, str(tmp_path), suites.SuiteOptions(data_dir=str(tmp_path)))
    assert set(out["qa1"]) == {"1k"} and "GiB of host memory" in out["_skipped"]["8k"]


def test_missing_and_malformed_data(tmp_path):
    with pytest.raises(ValueError, match="--suite=babilong has no data"):
        suites.check_babilong_data(suites.SuiteOptions(data_dir=str(tmp_path)))
    _jsonl(tmp_path / "babilong" / "1k" / "qa7.jsonl", [{"context": "c", "question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="--suite=babilong has no data"):  # qa7 is not asked for
        suites.check_babilong_data(suites.SuiteOptions(data_dir=str(tmp_path)))
    suites.check_babilong_data(suites.SuiteOptions(data_dir=str(tmp_path), babilong_tasks=("qa7",)))
    with pytest.raises(ValueError, match=r"qa7.jsonl: row 1: expected the fields input, question, target"):
        babilong.read_examples(babilong.task_files(str(tmp_path / "babilong"), "1k", "qa7"))
    (tmp_path / "babilong" / "1k" / "qa7.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"qa7.jsonl: no BABILong rows"):
        babilong.read_examples(babilong.task_files(str(tmp_path / "babilong"), "1k", "qa7"))


@pytest.mark.e2e
def test_the_converter_writes_the_evaluation_template(tmp_path):
    root = tmp_path / "train"
    _jsonl(root / "data" / "qa1" / "1k.json", [_row("garden"), _row("kitchen")])
    _jsonl(root / "data" / "qa2" / "0k.json", [_row("office")])
    out = tmp_path / "babilong_train.jsonl"
    cmd = [sys.executable, "-m", "experiments.prepare_babilong", f"--input_dir={root}", f"--output={out}"]
    proc = subprocess.run(cmd + ["--tasks=qa1,qa2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    texts = [json.loads(x)["text"] for x in open(out)]
    assert texts[0] == babilong.prompt(_row("garden")) + " garden" and len(texts) == 3
    assert texts[0].endswith("\nQuestion: Where is Mary?\nAnswer: garden")
    assert "skipped qa2/1k" in proc.stderr
    proc = subprocess.run(cmd + ["--tasks=qa7"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "has no BABILong file for --tasks=qa7" in proc.stderr.splitlines()[-1]
