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
  recall       in-context recall on SWDE, NQ, DROP, FDA, SQuAD, TriviaQA from
               `<data_dir>/recall/<task>.jsonl` in the "Just read twice" release's format
               (nl_jax.eval.recall); a task with no file is a `warning: skipped` line.
  babilong     BABILong qa1-qa20 (nl_jax.eval.babilong) from `<data_dir>/babilong/` in the Hugging
               Face release's layouts, at every length present (or asked) that the model can stream
               in memory; a length it cannot is one `warning: skipped` line, a task with no file too.
  class_incremental
               class-incremental classification on CLINC-150, Banking77 and DBpedia from their
               published files under `<data_dir>/class_incremental/<dataset>/`
               (nl_jax.eval.class_incremental_data): the state carried across stages, restarted at
               each stage, and the in-context-learning baseline; a dataset without its files is a
               `warning: skipped` line.
  mad, formal  the suites that train a model per task: nl_jax.eval.trained_suites.
  lm_eval      named lm-evaluation-harness tasks (`lm_eval:piqa,hellaswag`) through
               `nl_jax.eval.harness`, with the task data read from the local Hugging Face datasets
               cache only; a task the harness does not know, or whose data is not local, is a
               `warning: skipped` line. Not part of "all" (it needs task names).

`mad` and `formal` train models, so they are not part of "all". Each returns its results dict;
keys starting with "_" say what was skipped.
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
from nl_jax.eval import babilong, continual, formal, mad, niah, recall
from nl_jax.eval import class_incremental_data as ci_data
from nl_jax.eval import multiple_choice as mc
from nl_jax.eval import perplexity as ppl

SUITES = ("lm", "commonsense", "niah", "continual", "recall", "babilong", "class_incremental")
TRAINED = ("mad", "formal")  # suites that train a model per task (not in "all")
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
    limit: int = 0  # examples per commonsense / recall / babilong task, documents per corpus (0: all)
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
    recall_tasks: tuple[str, ...] = recall.TASKS
    recall_max_new_tokens: int = recall.MAX_NEW_TOKENS
    babilong_tasks: tuple[str, ...] = babilong.DEFAULT_TASKS
    babilong_lengths: tuple[str, ...] = ()  # release length names; (): every length present
    ci_datasets: tuple[str, ...] = ci_data.DATASETS
    # mad / formal: training per task (scaled down; README, "MAD and formal languages")
    task_steps: int = 10
    task_batch_size: int = 8
    # the learning-rate x weight-decay grid each task trains over, best point reported; (): the run's
    # optim.lr / optim.weight_decay (MAD's protocol: README, "MAD and formal languages")
    task_lrs: tuple[float, ...] = ()
    task_weight_decays: tuple[float, ...] = ()
    task_seed: int = 0
    mad_tasks: tuple[str, ...] = tuple(mad.TASKS)
    mad_max_len: int = 64  # 0: the protocol's lengths
    mad_train_examples: int = 1280  # 0: the protocol's (12,800; memorization 256)
    mad_test_examples: int = 64  # 0: the protocol's (1,280)
    formal_languages: tuple[str, ...] = formal.LANGUAGES
    formal_train_len: int = formal.PROTOCOL_TRAIN_LEN
    formal_train_examples: int = 1000  # 0: the protocol's (formal.PROTOCOL_TRAIN_EXAMPLES)
    formal_test_examples: int = 64  # 0: the protocol's (formal.PROTOCOL_TEST_EXAMPLES)


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


def memory_shortfall(runner, length: int, prompts: int, vocab_size: int, batch_size: int = 0) -> str:
    """Why `prompts` prompts of `length` tokens, decoded `batch_size` rows at a time (default: the
    runner's), do not fit: "needs at least X GiB of <memory> (this machine has Y GiB)" for the first
    memory the lower bound of `niah.memory_needed` overflows; "" when they fit. ValueError when the
    model cannot decode `length` tokens at all."""
    host, device = niah.memory_needed(runner, length, prompts, vocab_size, batch_size)
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
            return (
                f"needs at least {n / 2**30:,.1f} GiB of {where} (this machine has {have / 2**30:,.1f} GiB)"
            )
    return ""


def check_niah(runner, tokenizer, haystack: str, options: SuiteOptions) -> None:
    """Before anything is generated: the longest length fits in memory (the lower bound of
    `niah.memory_needed`) and in what the model can decode, and every task fits the shortest.
    ValueError naming the flags otherwise."""
    lengths = list(options.niah_lengths)
    prompts = len(options.niah_depths) * options.niah_samples
    try:
        short = memory_shortfall(runner, max(lengths), prompts, tokenizer.vocab_size)
    except ValueError as e:
        raise ValueError(f"--niah_lengths={max(lengths)}: {e}") from e
    if short:
        raise ValueError(
            f"--niah_lengths={max(lengths)} {short} for {prompts} prompts (--niah_depths x "
            f"--niah_samples) in batches of {runner.batch_size}. Use shorter --niah_lengths, fewer "
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


def check_recall_data(options: SuiteOptions) -> None:
    """ValueError if no recall task has a file."""
    if not options.data_dir or not any(
        os.path.isfile(recall.task_file(options.data_dir, t)) for t in options.recall_tasks
    ):
        raise ValueError(
            "--suite=recall has no data: put <task>.jsonl files in <--data_dir>/recall/ "
            f"({', '.join(options.recall_tasks)})"
        )


def run_recall(runner, tokenizer, context_len: int, out_dir: str, options: SuiteOptions) -> dict:
    """Each task with a file: accuracy (%) of greedy continuations containing the answer; the
    outputs go to `out_dir/recall_samples.jsonl`."""
    out, skipped = {}, {}
    with open(os.path.join(out_dir, "recall_samples.jsonl"), "w") as f:
        for task in options.recall_tasks:
            path = recall.task_file(options.data_dir, task) if options.data_dir else ""
            if not path or not os.path.isfile(path):
                skipped[task] = f"no {path or 'recall/' + task + '.jsonl (no --data_dir)'}"
                skip("recall", task, skipped[task])
                continue
            t0 = time.time()
            res = recall.evaluate_task(
                runner,
                tokenizer,
                recall.read_examples(path, options.limit),
                context_len=context_len,
                max_new_tokens=options.recall_max_new_tokens,
            )
            for sample in res.pop("samples"):
                f.write(json.dumps({"task": task, **sample}) + "\n")
            res["seconds"] = time.time() - t0
            out[task] = res
            logging.info("recall %s: %s", task, res)
    if skipped:
        out["_skipped"] = skipped
    return out


def check_babilong_data(options: SuiteOptions) -> None:
    """ValueError if no asked BABILong task has a file at any asked length."""
    root = os.path.join(options.data_dir, "babilong") if options.data_dir else ""
    lengths = list(options.babilong_lengths) or (babilong.lengths_in(root) if root else [])
    if not any(babilong.task_files(root, n, t) for n in lengths for t in options.babilong_tasks):
        raise ValueError(
            "--suite=babilong has no data: put the release's files in <--data_dir>/babilong/ "
            "(<length>/<task>-*.parquet as RMT-team/babilong has them, or <length>/<task>.jsonl) for "
            f"--babilong_tasks={','.join(options.babilong_tasks)}"
        )


def run_babilong(runner, tokenizer, out_dir: str, options: SuiteOptions) -> dict:
    """Accuracy (%) per task and length, `{task: {length: {...}}}`; the outputs go to
    `out_dir/babilong_samples.jsonl`. A length the model cannot stream (memory, or what it can
    decode) is skipped before its prompts are decoded."""
    root = os.path.join(options.data_dir, "babilong") if options.data_dir else ""
    lengths = list(options.babilong_lengths) or (babilong.lengths_in(root) if root else [])
    lengths.sort(key=babilong.length_tokens)
    out: dict = {t: {} for t in options.babilong_tasks}
    skipped = {}
    if not lengths:
        skipped["all"] = f"no length directories in {root or 'babilong/ (no --data_dir)'}"
        skip("babilong", "all", skipped["all"])
    with open(os.path.join(out_dir, "babilong_samples.jsonl"), "w") as f:
        for length in lengths:
            cells = {}  # task -> (examples, prompt tokens)
            for task in options.babilong_tasks:
                paths = babilong.task_files(root, length, task) if root else []
                if not paths:
                    skipped[f"{task}/{length}"] = f"no {task} file in {os.path.join(root, length)}"
                    skip("babilong", f"{task}/{length}", skipped[f"{task}/{length}"])
                    continue
                examples = babilong.read_examples(paths, options.limit)
                cells[task] = (examples, babilong.encode_prompts(tokenizer, examples))
            if not cells:
                continue
            prompts = [p for _, ps in cells.values() for p in ps]
            longest = max(len(p) for p in prompts) + babilong.MAX_NEW_TOKENS
            rows = babilong.longest_group([len(p) for p in prompts], runner.batch_size)
            try:
                why = memory_shortfall(
                    runner, longest, max(len(ps) for _, ps in cells.values()), tokenizer.vocab_size, rows
                )
            except ValueError as e:
                why = str(e)
            if why:
                skipped[length] = f"prompts of up to {longest} tokens: {why}"
                skip("babilong", length, f"the model cannot stream {length}: {skipped[length]}")
                continue
            for task, (examples, tokens) in cells.items():
                t0 = time.time()
                res = babilong.evaluate_task(runner, tokenizer, task, examples, tokens)
                for sample in res.pop("samples"):
                    f.write(json.dumps({"task": task, "length": length, **sample}) + "\n")
                res["seconds"] = time.time() - t0
                out[task][length] = res
                logging.info("babilong %s %s: %s", task, length, res)
    out = {t: r for t, r in out.items() if r}
    if skipped:
        out["_skipped"] = skipped
    return out


def check_class_incremental_data(options: SuiteOptions) -> None:
    """ValueError if no asked class-incremental dataset has its files."""
    if not any(not ci_data.missing_files(options.data_dir, d) for d in options.ci_datasets):
        raise ValueError(
            "--suite=class_incremental has no data: put the published files in "
            "<--data_dir>/class_incremental/<dataset>/ ("
            + "; ".join(f"{d}: {', '.join(ci_data.FILES[d])}" for d in options.ci_datasets)
            + ")"
        )


def run_class_incremental(runner, tokenizer, context_len: int, options: SuiteOptions) -> dict:
    """Per dataset with its files: the class-incremental protocol (nl_jax.eval.continual) with the
    state carried across stages, restarted at each stage, and the in-context-learning baseline (a
    restarted state given demonstrations of every class seen, as many as fit in `context_len`
    tokens with the longest test query)."""
    out, skipped = {}, {}
    if not runner.can_decode:
        skipped["all"] = "the model has no decode state to carry"
        skip("class_incremental", "all", skipped["all"])
        return {"_skipped": skipped}
    for name in options.ci_datasets:
        missing = ci_data.missing_files(options.data_dir, name)
        if missing:
            skipped[name] = f"no {', '.join(missing)}" + ("" if options.data_dir else " (no --data_dir)")
            skip("class_incremental", name, skipped[name])
            continue
        t0 = time.time()
        train, test = ci_data.load(options.data_dir, name)
        stages = continual.make_stages(
            [lab for _, lab in train], min(options.ci_stages, len({c for _, c in train}))
        )
        test = _capped(test, options.ci_test_per_class)  # also what the ICL window must leave room for
        kw = dict(stages=stages, shots_per_class=options.ci_shots)
        res = {
            "carried": continual.class_incremental(
                runner, tokenizer, train, test, state_len=max(context_len, 2048), **kw
            ),
            "reset": continual.class_incremental(
                runner, tokenizer, train, test, state_len=max(context_len, 2048), carry_state=False, **kw
            ),
        }
        window = context_len - continual.longest_query(tokenizer, test, [c for s in stages for c in s])
        if window > 1:
            res["icl"] = continual.class_incremental(
                runner, tokenizer, train, test, state_len=context_len, icl_window=window, **kw
            )
        else:
            skipped[f"{name}/icl"] = f"its longest test query does not fit in {context_len} tokens of context"
            skip("class_incremental", f"{name}/icl", skipped[f"{name}/icl"])
        res["seconds"] = time.time() - t0
        out[name] = res
        logging.info(
            "class_incremental %s: %s",
            name,
            {k: v["final_average_accuracy"] for k, v in res.items() if k != "seconds"},
        )
    if skipped:
        out["_skipped"] = skipped
    return out


def _capped(examples, per_class: int):
    """The first `per_class` examples of each class (all with 0), in order."""
    if per_class <= 0:
        return examples
    count: dict[str, int] = {}
    out = []
    for text, label in examples:
        count[label] = count.get(label, 0) + 1
        if count[label] <= per_class:
            out.append((text, label))
    return out
