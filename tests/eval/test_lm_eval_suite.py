"""`--suite=lm_eval:TASK,...`: lm-evaluation-harness tasks through the adapter, on a task defined
from a local jsonl file; unknown tasks and tasks whose data is not local are skipped, named."""

import json

import numpy as np
import pytest
from absl import app

from experiments.evaluate import _suites
from nl_jax.eval import harness
from nl_jax.eval.runner import ModelRunner
from nl_jax.eval.suites import SuiteOptions
from nl_jax.eval.workdir import evaluate_workdir, load_model
from nl_jax.data.tokenizers import load_tokenizer
from tests.eval.test_evaluate_command import _config, _write_run

ROWS = [
    {"question": "def f(x):\n    return", "choices": ["x", "zzzq"], "label": 0},
    {"question": "import", "choices": ["@@@@", "os"], "label": 1},
    {"question": "class A:\n    ", "choices": ["pass", "((("], "label": 0},
    {"question": "print(os.", "choices": ["sep)", "qq"], "label": 1},
]
TASK_YAML = """task: local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_suite_flag_parses_harness_tasks():
    assert _suites("lm_eval:piqa,hellaswag") == (["lm_eval"], ("piqa", "hellaswag"))
    assert _suites("lm,lm_eval:piqa,hellaswag,niah") == (["lm", "lm_eval", "niah"], ("piqa", "hellaswag"))
    assert _suites("lm,niah")[1] == ()
    with pytest.raises(app.UsageError, match="name the harness tasks"):
        _suites("lm_eval")
    with pytest.raises(app.UsageError, match=r"unknown \['piqa'\]"):
        _suites("lm,piqa")


def test_local_task_is_scored_like_the_adapter_and_missing_ones_are_named(tmp_path, capsys):
    data = tmp_path / "tasks" / "data.jsonl"
    data.parent.mkdir()
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    (data.parent / "local_choice.yaml").write_text(TASK_YAML.format(path=data))
    config = _config(tmp_path)
    workdir, _ = _write_run(tmp_path, config)
    options = SuiteOptions(
        lm_eval_tasks=("local_choice", "no_such_task", "piqa"), lm_eval_include=str(data.parent), batch_size=2
    )
    _, results = evaluate_workdir(workdir, ["lm_eval"], options, config=config)
    got = results["lm_eval"]
    skipped = got["_skipped"]
    assert skipped["no_such_task"].startswith("lm-evaluation-harness has no task of this name")
    assert skipped["piqa"].startswith("its data is not in the local Hugging Face cache")
    err = capsys.readouterr().err
    assert "warning: skipped lm_eval/no_such_task" in err and "warning: skipped lm_eval/piqa" in err

    # The harness's accuracy is the argmax of the adapter's log-likelihoods, question by question.
    model, config, _, mesh = load_model(workdir, options, config)
    tokenizer = load_tokenizer("byte")
    runner = ModelRunner(model, mesh=mesh, batch_size=2)
    pairs = [(r["question"], " " + c) for r in ROWS for c in r["choices"]]  # the harness's target delimiter
    lls = np.array([ll for ll, _ in harness.loglikelihood_requests(runner, tokenizer, pairs, 32)]).reshape(-1, 2)
    expected = float(np.mean(lls.argmax(-1) == [r["label"] for r in ROWS]))
    assert got["local_choice"]["acc"] == pytest.approx(expected)
    assert set(got) == {"local_choice", "_skipped"}
