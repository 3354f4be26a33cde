"""Evaluating training workdirs: a run's newest (or a given) checkpoint through the suites, its
results written to `<workdir>/eval/step_<N>/eval_results.{json,md}`, and several runs in one table.

The checkpoint may come from any mesh: only its parameters are read, onto the devices here.
Running suites one at a time adds to the same files.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import ml_collections
from absl import logging
from flax import nnx

from nl_jax.data.tokenizers import check_vocab, load_tokenizer
from nl_jax.eval import report, restore, suites, trained_suites
from nl_jax.eval.runner import ModelRunner
from nl_jax.eval.suites import SuiteOptions
from nl_jax.models import build_model
from nl_jax.parallel.mesh import make_mesh


def _makedirs(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def load_model(workdir: str, options: SuiteOptions, config=None):
    """(model, config, step, mesh): the run's checkpoint, or fresh weights with `random_init`.
    `config` (default: the workdir's config.json) names the model."""
    # A copy: one config given for several runs serves each unchanged.
    config = restore.load_config(workdir) if config is None else copy.deepcopy(config)
    try:
        mesh = make_mesh(config.mesh)
    except ValueError as e:  # the training mesh may not fit the devices here: FSDP over all of them
        logging.warning(
            "config.mesh does not fit %d devices (%s); using fsdp over all of them", jax.device_count(), e
        )
        mesh = make_mesh(
            ml_collections.ConfigDict(
                dict(ici_data_parallelism=1, ici_fsdp_parallelism=-1, ici_tensor_parallelism=1)
            )
        )
    if options.random_init:
        return build_model(config.model, nnx.Rngs(0)), config, 0, mesh
    model, step = restore.restore_model(workdir, config, mesh, options.step)
    return model, config, step, mesh


def evaluate_workdir(
    workdir: str,
    suite_names: Sequence[str],
    options: SuiteOptions,
    *,
    config=None,
    out_dir: str = "",
    writable_dir: Callable[[str], str] = _makedirs,
) -> tuple[str, dict]:
    """Runs the suites on one run; writes and returns (its name, its results).

    `writable_dir(path)` creates the results directory (a command passes its own check, whose
    error names its flag)."""
    model, config, step, mesh = load_model(workdir, options, config)
    tokenizer = load_tokenizer(config.data.get("tokenizer", "byte"))
    check_vocab(tokenizer, config.model.vocab_size)
    context_len = options.context_len or int(config.data.seq_len)
    runner = ModelRunner(model, mesh=mesh, batch_size=options.batch_size, length_bucket=min(256, context_len))
    name = config.get("config_name", "") or os.path.basename(os.path.normpath(workdir))
    out_dir = writable_dir(out_dir or os.path.join(workdir, "eval", f"step_{step}"))
    if "niah" in suite_names:  # checked before any suite runs
        haystack = suites.niah_haystack(config, tokenizer, options)
        suites.check_niah(runner, tokenizer, haystack, options)
    json_path = os.path.join(out_dir, "eval_results.json")
    results = json.load(open(json_path)) if os.path.isfile(json_path) else {}
    results["meta"] = {
        "workdir": workdir,
        "model": config.model.name,
        "step": step,
        "context_len": context_len,
        "devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "random_init": options.random_init,
    }
    print(
        f"evaluating {name} ({config.model.name}) step {step} on {jax.device_count()} devices, "
        f"mesh {dict(mesh.shape)}: {list(suite_names)}",
        flush=True,
    )
    for suite in suite_names:
        t0 = time.time()
        if suite == "lm":
            results["lm"] = suites.run_lm(runner, tokenizer, config, context_len, options)
        elif suite == "commonsense":
            results["commonsense"] = suites.run_commonsense(runner, tokenizer, context_len, options)
        elif suite == "niah":
            results["niah"] = suites.run_niah(runner, tokenizer, haystack, out_dir, options)
        elif suite == "continual":
            results["continual"] = suites.run_continual(runner, tokenizer, config, context_len, options)
        elif suite == "recall":
            results["recall"] = suites.run_recall(runner, tokenizer, context_len, out_dir, options)
        elif suite == "babilong":
            results["babilong"] = suites.run_babilong(runner, tokenizer, out_dir, options)
        elif suite == "class_incremental":
            results["class_incremental"] = suites.run_class_incremental(
                runner, tokenizer, context_len, options
            )
        elif suite == "mad":
            results["mad"] = trained_suites.run_mad(config, mesh, options)
        elif suite == "formal":
            results["formal"] = trained_suites.run_formal(config, mesh, options)
        elif suite == suites.LM_EVAL:
            results[suites.LM_EVAL] = suites.run_lm_eval(runner, tokenizer, context_len, options)
        print(f"  {suite}: {time.time() - t0:.1f}s", flush=True)
    if not any(k for suite in suite_names for k in results[suite] if not k.startswith("_")):
        raise ValueError(
            f"nothing was evaluated: every task of --suite={','.join(suite_names)} was skipped (see the "
            "warnings above); give --data_dir / --tfds_data_dir with the tasks' data"
        )
    if jax.process_index() == 0:
        jpath, mpath = report.write_results(out_dir, {name: results})
        print(open(mpath).read())
        print(f"results: {jpath}\n         {mpath}", flush=True)
    return name, results


def evaluate_workdirs(
    workdirs: Sequence[str],
    suite_names: Sequence[str],
    options: SuiteOptions,
    *,
    config=None,
    out_dir: str = "",
    writable_dir: Callable[[str], str] = _makedirs,
) -> None:
    """Each run's results in its workdir (as `evaluate_workdir`); with several runs, also one table
    with a row per run in `out_dir` (default: `<their common parent>/eval`)."""
    if list(suite_names) == ["commonsense"]:  # before any model is loaded
        suites.check_commonsense_data(options)
    if list(suite_names) == ["recall"]:
        suites.check_recall_data(options)
    if list(suite_names) == ["babilong"]:
        suites.check_babilong_data(options)
    if list(suite_names) == ["class_incremental"]:
        suites.check_class_incremental_data(options)
    if len(workdirs) == 1:
        evaluate_workdir(
            workdirs[0], suite_names, options, config=config, out_dir=out_dir, writable_dir=writable_dir
        )
        return
    rows = {}
    for workdir in workdirs:
        name, results = evaluate_workdir(
            workdir, suite_names, options, config=config, writable_dir=writable_dir
        )
        rows[name if name not in rows else workdir] = results
    if jax.process_index() == 0:
        parent = os.path.commonpath([os.path.abspath(w) for w in workdirs])
        out_dir = out_dir or os.path.join(parent, "eval")
        jpath, mpath = report.write_results(out_dir, rows, stem="comparison")
        print(open(mpath).read())
        print(f"comparison: {jpath}\n            {mpath}", flush=True)
