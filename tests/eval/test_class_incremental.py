"""The class_incremental suite: CLINC-150, Banking77 and DBpedia read from files in their published
formats, the in-context-learning baseline's context, and the suite's results and table."""

import json

import numpy as np
import pytest

from nl_jax.data.tokenizers import load_tokenizer
from nl_jax.eval import class_incremental_data as ci_data
from nl_jax.eval import continual, report, suites
from nl_jax.eval.runner import ModelRunner

TOK = load_tokenizer("byte")


def _clinc(root, train, test):
    d = root / "class_incremental" / "clinc150"
    d.mkdir(parents=True, exist_ok=True)
    data = {"train": train, "val": train[:1], "test": test, "oos_train": [["what is love", "oos"]]}
    data.update(oos_val=[["sing", "oos"]], oos_test=[["dance", "oos"]])
    (d / "data_full.json").write_text(json.dumps(data))


def _banking(root, rows_by_split):
    d = root / "class_incremental" / "banking77"
    d.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        (d / f"{split}.csv").write_text("text,category\n" + "".join(f"{t},{c}\n" for t, c in rows))


def _dbpedia(root, classes, rows_by_split):
    d = root / "class_incremental" / "dbpedia14"
    d.mkdir(parents=True, exist_ok=True)
    (d / "classes.txt").write_text("\n".join(classes) + "\n")
    for split, rows in rows_by_split.items():
        (d / f"{split}.csv").write_text(
            "".join(f'{lab},"{title}","{content}"\n' for lab, title, content in rows)
        )


def test_the_published_formats(tmp_path):
    _clinc(
        tmp_path, [["book a flight", "book_flight"], ["my balance", "balance"]], [["fly me", "book_flight"]]
    )
    train, test = ci_data.load(str(tmp_path), "clinc150")
    assert train == [("book a flight", "book_flight"), ("my balance", "balance")]  # no out-of-scope class
    assert test == [("fly me", "book_flight")]
    d = tmp_path / "class_incremental" / "banking77"
    d.mkdir(parents=True)
    (d / "train.csv").write_text('text,category\n"Hi, where is my card?",card_arrival\nnew pin,change_pin\n')
    (d / "test.csv").write_text("text,category\ncard?,card_arrival\n")
    train, test = ci_data.load(str(tmp_path), "banking77")
    assert train == [("Hi, where is my card?", "card_arrival"), ("new pin", "change_pin")]
    _dbpedia(tmp_path, ["Company", "Artist"], {})
    (tmp_path / "class_incremental" / "dbpedia14" / "train.csv").write_text(
        '2,"Ada","A ""quoted"" painter."\n'
    )
    (tmp_path / "class_incremental" / "dbpedia14" / "test.csv").write_text(
        '1,"Acme","Makes anvils, mostly."\n'
    )
    train, test = ci_data.load(str(tmp_path), "dbpedia14")
    assert train == [('Ada. A "quoted" painter.', "Artist")] and test == [
        ("Acme. Makes anvils, mostly.", "Company")
    ]
    assert ci_data.missing_files(str(tmp_path), "dbpedia14") == []
    assert ci_data.missing_files("", "banking77")[0].endswith("banking77/train.csv")


def test_bad_files_name_the_problem(tmp_path):
    d = tmp_path / "class_incremental" / "banking77"
    d.mkdir(parents=True)
    (d / "train.csv").write_text("query,label\nhi,x\n")
    with pytest.raises(ValueError, match=r"train.csv: expected Banking77's header text,category"):
        ci_data.load(str(tmp_path), "banking77")
    _dbpedia(tmp_path, ["Company"], {"train": [(2, "t", "c")], "test": [(1, "t", "c")]})
    with pytest.raises(ValueError, match=r"train.csv:1: expected label \(1-1, a line of classes.txt\)"):
        ci_data.load(str(tmp_path), "dbpedia14")
    d = tmp_path / "class_incremental" / "clinc150"
    d.mkdir(parents=True)
    (d / "data_full.json").write_text(json.dumps({"train": [["a", "b"]]}))
    with pytest.raises(ValueError, match="expected CLINC-150's keys train, val, test"):
        ci_data.load(str(tmp_path), "clinc150")


def _recording_runner(bigram):
    """A memoryless model, and the demonstration text each fresh or carried stream begins with."""
    runner = ModelRunner(bigram(np.zeros((260, 260), np.float32)), batch_size=4, length_bucket=8)
    streamed = []
    inner = runner.stream_chunked

    def stream_chunked(inputs, targets, state):
        streamed.append(TOK.decode(inputs[0]) if len(inputs[0]) else "")
        return inner(inputs, targets, state)

    runner.stream_chunked = stream_chunked
    return runner, streamed


def test_icl_fills_the_window_with_every_class_seen(bigram):
    data = [(f"{c} item {i}", c) for c in ("aa", "bb", "cc") for i in range(2)]
    kw = dict(num_stages=3, shots_per_class=2, state_len=64)
    runner, streamed = _recording_runner(bigram)
    carried = continual.class_incremental(runner, TOK, data, data, **kw)
    assert carried["method"] == "carried"
    assert [sorted(set(s.split()) & {"aa", "bb", "cc"}) for s in streamed] == [["aa"], ["bb"], ["cc"]]

    runner, streamed = _recording_runner(bigram)
    icl = continual.class_incremental(runner, TOK, data, data, icl_window=10_000, **kw)
    assert icl["method"] == "icl" and icl["demonstrations_kept"] == [2, 4, 6]

    def demo(c, i):
        return continual.demonstration(f"{c} item {i}", c)

    for s, text in enumerate(streamed):  # a fresh context each stage (EOS decodes to ""): all seen so far
        want = [demo(c, i) for c in ("aa", "bb", "cc")[: s + 1] for i in range(2)]
        assert sorted(d for d in want if d in text) == sorted(want) and len(text) == sum(map(len, want))

    window = 2 * len(TOK.encode(demo("aa", 0))) + 1  # two demonstrations and the EOS
    runner, streamed = _recording_runner(bigram)
    small = continual.class_incremental(runner, TOK, data, data, icl_window=window, **kw)
    assert small["demonstrations_kept"] == [2, 2, 2] and all(len(TOK.encode(t)) < window for t in streamed)


def test_the_suite_runs_each_dataset_with_its_baselines(tmp_path, bigram, capsys):
    # A memoryless model that always prefers the label "zz" (as in test_continual.py): stage 0 ("aa")
    # is right until "zz" is a candidate, then forgotten; every memory gives the same numbers.
    table = np.zeros((260, 260), np.float32)
    sp, z = TOK.encode(" z")
    table[sp, z] = table[z, z] = 6.0
    runner = ModelRunner(bigram(table), batch_size=4, length_bucket=8)
    rows = [(f"item {i}", lab) for i, lab in enumerate(["aa", "aa", "zz", "zz"])]
    _clinc(tmp_path, [list(r) for r in rows], [list(r) for r in rows])
    _banking(tmp_path, {"train": rows, "test": rows})
    options = suites.SuiteOptions(data_dir=str(tmp_path), ci_stages=2, ci_shots=1)
    out = suites.run_class_incremental(runner, TOK, 64, options)
    assert set(out) == {"clinc150", "banking77", "_skipped"} and "classes.txt" in out["_skipped"]["dbpedia14"]
    assert "warning: skipped class_incremental/dbpedia14: no " in capsys.readouterr().err
    for name in ("clinc150", "banking77"):
        assert {k: out[name][k]["method"] for k in ("carried", "reset", "icl")} == {
            "carried": "carried",
            "reset": "reset",
            "icl": "icl",
        }
        assert out[name]["carried"]["accuracy"] == [[100.0], [0.0, 100.0]]
        assert (
            out[name]["icl"]["final_average_accuracy"] == 50.0
            and out[name]["icl"]["mean_forgetting"] == 100.0
        )
    md = report.markdown_report({"m": {"class_incremental": out}})
    assert "| Model | memory | CLINC-150 | Banking77 |" in md
    assert (
        "| m | state carried | 50.0 / 100.0 | 50.0 / 100.0 |" in md and "| m | ICL (context window) |" in md
    )

    # a context too short for the longest query leaves ICL out, with a line saying so
    out = suites.run_class_incremental(
        runner, TOK, 12, suites.SuiteOptions(data_dir=str(tmp_path), ci_stages=2)
    )
    assert "icl" not in out["clinc150"] and "does not fit in 12 tokens" in out["_skipped"]["clinc150/icl"]


def test_no_dataset_at_all_is_an_error_before_any_model(tmp_path):
    with pytest.raises(ValueError, match="--suite=class_incremental has no data"):
        suites.check_class_incremental_data(suites.SuiteOptions(data_dir=str(tmp_path)))
    _banking(tmp_path, {"train": [("a", "x")], "test": [("a", "x")]})
    suites.check_class_incremental_data(suites.SuiteOptions(data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="has no data"):
        suites.check_class_incremental_data(
            suites.SuiteOptions(data_dir=str(tmp_path), ci_datasets=("clinc150",))
        )
