"""Paper-style tables, and the lm-evaluation-harness adapter (with a stand-in `lm_eval` module:
the real package is not a dependency)."""

import json
import sys
import types

import numpy as np
import pytest

from nl_jax.data import ByteTokenizer
from nl_jax.eval import harness, report
from nl_jax.eval import loglikelihood as ll_lib
from nl_jax.eval.runner import ModelRunner

TOK = ByteTokenizer()

RESULTS = {
    "lm": {"wikitext": {"word_perplexity": 20.5}},
    "commonsense": {
        "lambada": {"perplexity": 21.0, "acc": 38.0},
        "piqa": {"acc": 69.0, "acc_norm": 70.0},
        "hellaswag": {"acc": 40.0, "acc_norm": 49.0},
        "winogrande": {"acc": 53.0, "acc_norm": 53.0},
        "arc_easy": {"acc": 66.0, "acc_norm": 60.0},
        "arc_challenge": {"acc": 30.0, "acc_norm": 36.0},
        "siqa": {"acc": 41.0},
        "boolq": {"acc": 63.0},
    },
    "niah": {"accuracy": {"s_niah_1": {"4096": 100.0, "8192": 50.0}, "mv_niah": {"4096": 12.5, "8192": 0.0}}},
}


def test_paper_table_columns_and_average():
    row = report.paper_row(RESULTS)
    assert row["Hella acc_n"] == 49.0 and row["ARC-c acc_n"] == 36.0 and row["ARC-e"] == 66.0
    assert row["Avg"] == pytest.approx(np.mean([38, 69, 49, 53, 66, 36, 41, 63]))
    table = report.paper_table({"hope": RESULTS, "empty": {}})
    lines = table.splitlines()
    assert lines[0] == (
        "| Model | Wiki ppl | LMB ppl | LMB acc | PIQA | Hella acc_n | Wino | ARC-e | ARC-c acc_n | SIQA | BoolQ | Avg |"
    )
    assert (
        lines[2]
        == "| hope | 20.50 | 21.00 | 38.00 | 69.00 | 49.00 | 53.00 | 66.00 | 36.00 | 41.00 | 63.00 | 51.88 |"
    )
    assert lines[3] == "| empty | - | - | - | - | - | - | - | - | - | - | - |"
    partial = {"commonsense": {"piqa": {"acc": 60.0}}}
    assert report.paper_table({"p": partial}).splitlines()[2].endswith("| 60.00* |")  # average of what exists


def test_niah_table_by_task_and_length(tmp_path):
    table = report.niah_table({"hope": RESULTS})
    assert table.splitlines()[0] == "| Model (4K/8K) | S-NIAH-1 (passkey) | MV-NIAH |"
    assert table.splitlines()[2] == "| hope | 100.0/50.0 | 12.5/0.0 |"
    jpath, mpath = report.write_results(str(tmp_path), {"hope": RESULTS})
    text = open(mpath).read()
    assert "## Needle in a haystack" in text and "| hope | 20.50 |" in text
    assert json.load(open(jpath)) == RESULTS  # one run: its results dict itself


def test_comparison_has_a_row_per_model(tmp_path):
    memo = dict(num_segments=2, segment_len=64, state_len=64, mean_reset=2.0, mean_carried=1.5)
    memo.update(mean_repeat=1.0, context_gain=0.5, memorization_gain=1.0)
    other = {"lm": {"validation": {"loss": 1.25, "perplexity": 3.49, "bits_per_byte": 1.8, "num_tokens": 9}}}
    other["continual"] = {"memorization": memo}
    jpath, mpath = report.write_results(str(tmp_path), {"hope": RESULTS, "tf": other}, stem="comparison")
    assert set(json.load(open(jpath))) == {"hope", "tf"}
    lines = open(mpath).read().splitlines()
    assert lines[0] == "# Evaluation: hope, tf"
    assert any(line.startswith("| hope | 20.50 |") for line in lines)
    assert any(line.startswith("| tf | - |") for line in lines)  # paper table row, nothing measured
    assert "| tf | validation | - | 9 | 1.2500 | 3.49 | 1.8000 | - |" in lines
    assert "| tf | 2 x 64 | 64 | 2.0000 | 1.5000 | 1.0000 | 0.5000 | 1.0000 |" in lines
    assert "| hope (4K/8K) |" not in lines and any(line.startswith("| hope | 100.0/50.0") for line in lines)


def test_harness_module_does_not_need_lm_eval(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # "not installed"
    with pytest.raises(ImportError, match="lm-evaluation-harness is not installed"):
        harness.make_lm(None, TOK, max_len=8)


def test_harness_adapter_requests(monkeypatch, bigram):
    class LM:  # the base class's surface the adapter relies on
        def __init__(self):
            pass

    api = types.ModuleType("lm_eval.api")
    model_mod = types.ModuleType("lm_eval.api.model")
    model_mod.LM = LM
    monkeypatch.setitem(sys.modules, "lm_eval", types.ModuleType("lm_eval"))
    monkeypatch.setitem(sys.modules, "lm_eval.api", api)
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", model_mod)

    table = np.zeros((260, 260), np.float32)
    ids = TOK.encode("ab.")
    table[ids[0], ids[1]] = table[ids[1], ids[2]] = table[ids[2], ids[0]] = 9.0  # a -> b -> . -> a
    runner = ModelRunner(bigram(table), batch_size=2, length_bucket=8)
    lm = harness.make_lm(runner, TOK, max_len=16)
    assert isinstance(lm, LM)
    req = lambda *args: types.SimpleNamespace(args=args)
    got = lm.loglikelihood([req("xa", "b."), req("x", " y")])
    want = ll_lib.loglikelihood(runner, TOK, [("xa", "b."), ("x", " y")], max_len=16)
    assert got == want and got[0][1] and not got[1][1]
    rolling = lm.loglikelihood_rolling([req("ab.ab"), req("")])
    logp = table[[TOK.eos_id] + list(TOK.encode("ab.a"))].astype(np.float64)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    assert rolling[0] == pytest.approx(logp[np.arange(5), TOK.encode("ab.ab")].sum(), rel=1e-6)
    assert rolling[1] == 0.0
    assert lm.generate_until([req("a", {"until": ["."], "max_gen_toks": 5})]) == ["b"]
