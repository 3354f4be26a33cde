"""The four evaluation suites of `experiments.evaluate`, each over one model runner:

  lm           perplexity, loss, bits per byte of the run's own validation split, and of WikiText
               when `<data_dir>/wikitext.txt` (or `wiki.test.raw`) exists, cut into articles at its
               top-level " = Title = " headings; sliding windows and/or the state streamed across
               segments.
  commonsense  the multiple-choice tasks from `<data_dir>/<task>.jsonl`, else TFDS; a task with no
               data is a `warning: skipped` line on stderr.
  niah         RULER-style needle tasks over lengths x depths, greedy decoding; `check_niah` checks
               the lengths against memory and what the model can decode before any prompt is built.
  continual    test-time memorization over the validation stream, and class-incremental
               classification when `<data_dir>/continual/{train,test}.jsonl` exist.
  lm_eval      named lm-evaluation-harness tasks (`lm_eval:piqa,hellaswag`) through
               `nl_jax.eval.harness`, with the task data read from the local Hugging Face datasets
               cache only; a task the harness does not know, or whose data is not local, is a
               `warning: skipped` line. Not part of "all" (it needs task names).

Each returns its results dict; keys starting with "_" say what was skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time

import jax
import numpy as np
from absl import logging

from nl_jax.data.config import build_source
from nl_jax.data.sources import read_text
from nl_jax.eval import continual, niah
from nl_jax.eval import multiple_choice as mc
from nl_jax.eval import perplexity as ppl

SUITES = ("lm", "commonsense", "niah", "continual")
LM_EVAL = "lm_eval"  # named harness tasks: "lm_eval:task,task"


@dataclasses.dataclass(frozen=True)
class SuiteOptions:
    """What the suites read besides the model; the fields are `experiments.evaluate`'s flags."""

    data_dir: str = ""
    tfds_data_dir: str = ""
    random_init: bool = False
    step: int | None = None
    batch_size: int = 8
    context_len: int = 0  # 0: the training seq_len
    limit: int = 0  # examples per commonsense task / documents per corpus (0: all)
    ppl_mode: str = "sliding"  # sliding | stream | both
    stride: int = 0
    niah_tasks: tuple[str, ...] = niah.TASKS
    niah_lengths: tuple[int, ...] = niah.DEFAULT_LENGTHS
    niah_depths: tuple[float, ...] = niah.DEFAULT_DEPTHS
    niah_samples: int = 4
    niah_haystack: str = ""  # a text file (default: the validation text)
    continual_segments: int = 4
    ci_stages: int = 5
    ci_shots: int = 4
    ci_test_per_class: int = 20
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_include: str = ""  # a directory of extra harness task YAMLs (lm_eval's include_path)


def skip(suite: str, task: str, why: str) -> None:
    print(f"warning: skipped {suite}/{task}: {' '.join(why.split())}", file=sys.stderr, flush=True)


def validation_docs(config, tokenizer, limit: int):
    return ppl.documents_from_source(
        build_source(config.data), tokenizer, config.data.get("eval_split", "validation"), limit
    )


def wikitext_docs(data_dir: str, tokenizer, limit: int):
    """(documents, the file) of WikiText under `data_dir`, or (None, None)."""
    for name in ("wikitext.txt", "wiki.test.raw", "wikitext-103/wiki.test.raw"):
        path = os.path.join(data_dir, name)
        if data_dir and os.path.isfile(path):
            text = read_text(path)
            articles = re.split(r"\n(?= = [^=\n].* = \n)", text)  # top-level headings only
            articles = [a.strip("\n") for a in articles if a.strip()]
            return ppl.documents_from_texts(articles[:limit] if limit else articles, tokenizer), path
    return None, None


def run_lm(runner, tokenizer, config, context_len: int, options: SuiteOptions) -> dict:
    out = {}
    corpora = {"validation": validation_docs(config, tokenizer, options.limit)}
    wiki, _ = wikitext_docs(options.data_dir, tokenizer, options.limit)
    if wiki:
        corpora["wikitext"] = wiki
    modes = ["sliding", "stream"] if options.ppl_mode == "both" else [options.ppl_mode]
    for name, docs in corpora.items():
        for mode in modes:
            if mode == "stream" and not runner.can_decode:
                logging.warning("model has no decode_step: skipping stream perplexity")
                continue
            key = name if len(modes) == 1 or mode == "sliding" else f"{name}_stream"
            t0 = time.time()
            out[key] = ppl.perplexity(
                runner,
                docs,
                context_len=context_len,
                prefix_id=tokenizer.eos_id,
                mode=mode,
                stride=options.stride,
            )
            out[key]["seconds"] = time.time() - t0
            logging.info("lm %s: %s", key, {k: out[key][k] for k in ("loss", "perplexity", "bits_per_byte")})
    return out


def commonsense_source(task: str, data_dir: str, tfds_data_dir: str) -> tuple[str, str]:
    """("jsonl" | "tfds" | "", the file, or why the task has no data)."""
    path = os.path.join(data_dir, f"{task}.jsonl") if data_dir else ""
    if path and os.path.isfile(path):
        return "jsonl", path
    if tfds_data_dir and task in mc.TFDS_NAMES:
        return "tfds", tfds_data_dir
    where = f"--data_dir={data_dir}" if data_dir else "no --data_dir"
    return "", f"no {task}.jsonl ({where})" + ("" if task == "siqa" else " and no --tfds_data_dir")


def check_commonsense_data(options: SuiteOptions) -> None:
    """ValueError if no commonsense task has data."""
    if not any(commonsense_source(t, options.data_dir, options.tfds_data_dir)[0] for t in mc.TASKS):
        raise ValueError(
            "--suite=commonsense has no data: put <task>.jsonl files in --data_dir "
            f"({', '.join(mc.TASKS)}) or give --tfds_data_dir"
        )


def run_commonsense(runner, tokenizer, context_len: int, options: SuiteOptions) -> dict:
    out, skipped = {}, {}
    for task in mc.TASKS:
        kind, where = commonsense_source(task, options.data_dir, options.tfds_data_dir)
        if kind == "jsonl":
            labels = os.path.join(options.data_dir, f"{task}-labels.lst")
            data = mc.load_task(
                task, path=where, labels_path=labels if os.path.isfile(labels) else "", limit=options.limit
            )
        elif kind == "tfds":
            try:
                data = mc.load_task(task, tfds_data_dir=where, limit=options.limit)
            except ValueError as e:
                skipped[task] = str(e)[:200]
                skip("commonsense", task, skipped[task])
                continue
        else:
            skipped[task] = where
            skip("commonsense", task, where)
            continue
        t0 = time.time()
        res = mc.evaluate_task(runner, tokenizer, task, data, max_len=context_len)
        res.pop("predictions", None)
        res["seconds"] = time.time() - t0
        out[task] = res
        logging.info("commonsense %s: %s", task, res)
    if skipped:
        out["_skipped"] = skipped
    return out


def niah_haystack(config, tokenizer, options: SuiteOptions) -> str:
    if options.niah_haystack:
        return read_text(options.niah_haystack)
    docs = validation_docs(config, tokenizer, 0)
    return "\n".join(tokenizer.decode(d.tokens) for d in docs[:200])


def _available_memory() -> tuple[int, int | None]:
    """(host RAM bytes, bytes per accelerator or None on CPU, whose devices share the host's RAM)."""
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return host, None
    stats = device.memory_stats() or {}
    return host, stats.get("bytes_limit")


def check_niah(runner, tokenizer, haystack: str, options: SuiteOptions) -> None:
    """Before anything is generated: the longest length fits in memory (the lower bound of
    `niah.memory_needed`) and in what the model can decode, and every task fits the shortest.
    ValueError naming the flags otherwise."""
    lengths = list(options.niah_lengths)
    prompts = len(options.niah_depths) * options.niah_samples
    try:
        host, device = niah.memory_needed(runner, max(lengths), prompts, tokenizer.vocab_size)
    except ValueError as e:
        raise ValueError(f"--niah_lengths={max(lengths)}: {e}") from e
    have_host, have_device = _available_memory()
    if have_device is None:  # CPU devices allocate from the host's RAM
        need = {"host memory": (host + device, have_host)}
    else:  # at best the devices split their share evenly
        need = {
            "host memory": (host, have_host),
            "memory per device": (device // jax.device_count(), have_device),
        }
    for where, (n, have) in need.items():
        if n > have:
            raise ValueError(
                f"--niah_lengths={max(lengths)} needs at least {n / 2**30:,.1f} GiB of {where} for "
                f"{prompts} prompts (--niah_depths x --niah_samples) in batches of {runner.batch_size}; "
                f"this machine has {have / 2**30:,.1f} GiB. Use shorter --niah_lengths, fewer "
                "--niah_samples / --niah_depths, or a smaller --batch_size"
            )
    for task in options.niah_tasks:
        try:
            niah.make_sample(task, tokenizer, min(lengths), 0.0, haystack_text=haystack)
        except ValueError as e:
            raise ValueError(f"--niah_lengths / --niah_tasks: {e}") from e


def run_niah(runner, tokenizer, haystack: str, out_dir: str, options: SuiteOptions) -> dict:
    """The needle grid; heatmaps and the samples (niah_samples.jsonl) go to `out_dir`."""
    res = niah.evaluate_niah(
        runner,
        tokenizer,
        tasks=list(options.niah_tasks),
        lengths=list(options.niah_lengths),
        depths=list(options.niah_depths),
        num_samples=options.niah_samples,
        haystack_text=haystack,
    )
    res["heatmaps"] = niah.plot_heatmaps(res, out_dir)
    with open(os.path.join(out_dir, "niah_samples.jsonl"), "w") as f:
        for s in res.pop("samples"):
            f.write(json.dumps(s) + "\n")
    return res


def run_continual(runner, tokenizer, config, context_len: int, options: SuiteOptions) -> dict:
    out = {}
    if not runner.can_decode:
        skip("continual", "all", "the model has no decode state to carry")
        return {"_skipped": "the model has no decode state to carry"}
    docs = validation_docs(config, tokenizer, 0)
    stream = np.concatenate([np.concatenate([d.tokens, [tokenizer.eos_id]]) for d in docs]).astype(np.int32)
    segments = min(options.continual_segments, (len(stream) - 1) // context_len)
    if segments >= 1:
        out["memorization"] = continual.stream_memorization(
            runner, stream, segment_len=context_len, num_segments=segments
        )
    ci_dir = os.path.join(options.data_dir, "continual") if options.data_dir else ""
    train, test = os.path.join(ci_dir, "train.jsonl"), os.path.join(ci_dir, "test.jsonl")
    if ci_dir and os.path.isfile(train) and os.path.isfile(test):
        train_data, test_data = continual.read_labelled_jsonl(train), continual.read_labelled_jsonl(test)
        stages = min(options.ci_stages, len({lab for _, lab in train_data}))
        kw = dict(
            num_stages=stages,
            shots_per_class=options.ci_shots,
            max_test_per_class=options.ci_test_per_class,
            state_len=max(context_len, 2048),
        )
        out["class_incremental"] = continual.class_incremental(runner, tokenizer, train_data, test_data, **kw)
        out["class_incremental_reset"] = continual.class_incremental(
            runner, tokenizer, train_data, test_data, carry_state=False, **kw
        )
    else:
        out["_skipped_class_incremental"] = "no <data_dir>/continual/{train,test}.jsonl"
        skip("continual", "class_incremental", out["_skipped_class_incremental"])
    return out


def run_lm_eval(runner, tokenizer, context_len: int, options: SuiteOptions) -> dict:
    """The named lm-evaluation-harness tasks, one at a time, each a results dict of its metrics
    ("acc", "acc_norm", ...: floats). Task data is read from the local Hugging Face cache only
    (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE default to 1 here: evaluation never downloads)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from nl_jax.eval import harness

    lm = harness.make_lm(runner, tokenizer, max_len=context_len)  # ImportError says how to install it
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=options.lm_eval_include or None)
    out, skipped = {}, {}
    for task in options.lm_eval_tasks:
        if task not in manager.all_tasks:
            skipped[task] = "lm-evaluation-harness has no task of this name" + (
                f" (nor {options.lm_eval_include})" if options.lm_eval_include else ""
            )
            skip(LM_EVAL, task, skipped[task])
            continue
        t0 = time.time()
        try:
            res = lm_eval.simple_evaluate(
                model=lm, tasks=[task], task_manager=manager, limit=options.limit or None, log_samples=False
            )
        except Exception as e:  # the harness raises what `datasets` raises for data it cannot reach
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            skipped[task] = f"its data is not in the local Hugging Face cache ({first})"
            skip(LM_EVAL, task, skipped[task])
            continue
        for name, metrics in res["results"].items():  # a group task reports its subtasks too
            out[name] = {
                key.split(",")[0]: float(v)
                for key, v in metrics.items()
                if isinstance(v, (int, float)) and not key.startswith("sample_len")
            }
        out[task]["seconds"] = time.time() - t0
        logging.info("lm_eval %s: %s", task, out[task])
    if skipped:
        out["_skipped"] = skipped
    return out
