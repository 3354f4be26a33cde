r"""Evaluate a trained model: the paper's benchmarks as one command.

    python -m experiments.pretrain --config=transformer_tiny --workdir=runs/transformer_tiny
    python -m experiments.evaluate --workdir=runs/transformer_tiny --suite=lm,commonsense,continual \
        --data_dir=/data/eval --limit=200
    python -m experiments.evaluate --workdir=runs/transformer_tiny --suite=niah \
        --niah_lengths=1024,2048 --niah_samples=2          # a small NIAH grid for a CPU
    python -m experiments.evaluate --workdir=runs/hope_760m --suite=commonsense --data_dir=/data/eval
    python -m experiments.evaluate --workdir=runs/hope_760m --suite=niah --niah_lengths=4096,8192,16384
    python -m experiments.evaluate --workdir=runs/hope_tiny,runs/transformer_tiny --suite=all \
        --niah_lengths=512,1024 --niah_samples=2       # one table, a row per run: runs/eval/comparison.md

The newest checkpoint in `--workdir` (written by experiments.pretrain, on any mesh) is restored
onto the devices here, only its parameters are read. Results go to
`<workdir>/eval/step_<N>/eval_results.{json,md}` (NIAH heatmaps next to them); running suites one at
a time adds to the same files.

Suites (nl_jax/eval/ holds the definitions of every number):
  lm           perplexity, loss, bits per byte of the run's own validation split (config.data), and
               of WikiText if `<data_dir>/wikitext.txt` (or `wiki.test.raw`) exists: the raw file
               is cut into articles at its top-level " = Title = " headings and reported as word
               perplexity ("Wiki ppl"). Long documents: sliding windows of the training length
               (--ppl_mode=sliding, --stride) and/or the state streamed across segments
               (--ppl_mode=stream; recurrent memories carry over, attention keeps a KV window).
  commonsense  LAMBADA, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, SIQA, BoolQ from
               `<data_dir>/<task>.jsonl` (each dataset's published JSONL; `<task>-labels.lst`
               beside it for releases that keep labels apart), else TFDS from --tfds_data_dir.
               Each task with no data is a `warning: skipped` line; a run where every task of
               the asked suites was skipped, or --suite=commonsense with no data at all, is an error.
  niah         RULER-style needle tasks at --niah_lengths x --niah_depths, greedy decoding; the
               haystack is --niah_haystack (a text file) or the run's validation text. The lengths
               are checked against what the model can decode and the memory they need at least
               before any prompt is built.
  continual    test-time memorization over the validation stream (state carried across
               --continual_segments segments of the training length, twice), and class-incremental
               classification if `<data_dir>/continual/{train,test}.jsonl` ({"text", "label"}) exist.
"""

import json
import os
import re
import sys
import time

from absl import app, flags, logging

from experiments import cli

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "training workdir (config.json + checkpoints/); several, comma-separated, for one table"
)
_SUITE = flags.DEFINE_string(
    "suite", "all", "lm | commonsense | niah | continual | all (comma-separated list ok)"
)
_DATA_DIR = flags.DEFINE_string("data_dir", "", "local evaluation data (see the module docstring)")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", "", "prepared TFDS datasets for the commonsense tasks")
_CONFIG = flags.DEFINE_string("config", "", "config name, when the workdir has no config.json")
_RANDOM_INIT = flags.DEFINE_bool(
    "random_init", False, "evaluate freshly initialised weights (no checkpoint; smoke tests)"
)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)", lower_bound=0)
_OUT_DIR = flags.DEFINE_string(
    "out_dir",
    "",
    "where results go (default <workdir>/eval/step_<N>); with several workdirs, where the comparison goes "
    "(default <their common parent>/eval)",
)
_BATCH = flags.DEFINE_integer(
    "batch_size", 8, "rows per forward (rounded up to the data x fsdp devices)", lower_bound=1
)
_CONTEXT = flags.DEFINE_integer(
    "context_len", 0, "scoring context in tokens (0: the training seq_len)", lower_bound=0
)
_LIMIT = flags.DEFINE_integer(
    "limit", 0, "examples per commonsense task / documents per corpus (0: all)", lower_bound=0
)
_PPL_MODE = flags.DEFINE_enum("ppl_mode", "sliding", ["sliding", "stream", "both"], "long-document scoring")
_STRIDE = flags.DEFINE_integer(
    "stride", 0, "sliding-window stride (0: the context, i.e. disjoint windows)", lower_bound=0
)
_NIAH_TASKS = flags.DEFINE_list(
    "niah_tasks", ["s_niah_1", "s_niah_2", "s_niah_3", "mk_niah_1", "mq_niah", "mv_niah"], ""
)
_NIAH_LENGTHS = flags.DEFINE_list("niah_lengths", ["4096", "8192", "16384"], "prompt lengths in tokens")
_NIAH_DEPTHS = flags.DEFINE_list("niah_depths", ["0", "0.25", "0.5", "0.75", "1"], "needle depths in [0, 1]")
_NIAH_SAMPLES = flags.DEFINE_integer("niah_samples", 4, "samples per task, length and depth", lower_bound=1)
_NIAH_HAYSTACK = flags.DEFINE_string("niah_haystack", "", "haystack text file (default: the validation text)")
_SEGMENTS = flags.DEFINE_integer(
    "continual_segments", 4, "segments of the memorization stream", lower_bound=1
)
_CI_STAGES = flags.DEFINE_integer("ci_stages", 5, "class-incremental stages", lower_bound=1)
_CI_SHOTS = flags.DEFINE_integer("ci_shots", 4, "demonstrations per class", lower_bound=0)
_CI_TEST = flags.DEFINE_integer("ci_test_per_class", 20, "test examples per class (0: all)", lower_bound=0)

SUITES = ("lm", "commonsense", "niah", "continual")


@flags.validator("niah_lengths")
def _check_lengths(values):
    bad = [v for v in values if not (v.strip().isdigit() and int(v) > 0)]
    if bad or not values:
        raise flags.ValidationError("prompt lengths are positive whole numbers of tokens, e.g. 4096,8192")
    return True


@flags.validator("niah_depths")
def _check_depths(values):
    def ok(v):
        try:
            return 0.0 <= float(v) <= 1.0
        except ValueError:
            return False

    bad = [v for v in values if not ok(v)]
    if bad or not values:
        raise flags.ValidationError("needle depths are fractions in [0, 1], e.g. 0,0.5,1")
    return True


@flags.validator("niah_tasks")
def _check_tasks(values):
    from nl_jax.eval.niah import TASKS

    bad = [v for v in values if v not in TASKS]
    if bad or not values:
        raise flags.ValidationError(f"unknown task {bad or values}; choose from {', '.join(TASKS)}")
    return True


def _check_paths() -> None:
    """The directories and files named by flags exist (before any model is loaded)."""
    for flag, value, isdir in (
        ("--data_dir", _DATA_DIR.value, True),
        ("--tfds_data_dir", _TFDS_DATA_DIR.value, True),
        ("--niah_haystack", _NIAH_HAYSTACK.value, False),
    ):
        if value and not (os.path.isdir(value) if isdir else os.path.isfile(value)):
            raise cli.CommandError(f"{flag}={value}: no such {'directory' if isdir else 'file'}")


def _suites(value: str) -> list[str]:
    names = [s.strip() for s in value.split(",") if s.strip()]
    if "all" in names:
        return list(SUITES)
    bad = [s for s in names if s not in SUITES]
    if bad or not names:
        raise app.UsageError(f"--suite: unknown {bad or value!r}; choose from {SUITES + ('all',)}")
    return names


def _model_and_config(workdir: str):
    """(model, config, step, mesh): restored from the workdir, or fresh with --random_init."""
    import jax
    import ml_collections
    from flax import nnx

    from experiments import configs
    from nl_jax.eval import restore
    from nl_jax.models import build_model
    from nl_jax.parallel.mesh import make_mesh

    if _CONFIG.value:
        config = configs.load(_CONFIG.value)
    else:
        config = restore.load_config(workdir)
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
    if _RANDOM_INIT.value:
        return build_model(config.model, nnx.Rngs(0)), config, 0, mesh
    model, step = restore.restore_model(workdir, config, mesh, _STEP.value)
    return model, config, step, mesh


def _validation_docs(config, tokenizer, limit: int):
    from nl_jax.data.config import build_source
    from nl_jax.eval import perplexity as ppl

    return ppl.documents_from_source(
        build_source(config.data), tokenizer, config.data.get("eval_split", "validation"), limit
    )


def _wikitext_docs(data_dir: str, tokenizer, limit: int):
    from nl_jax.data.sources import read_text
    from nl_jax.eval import perplexity as ppl

    for name in ("wikitext.txt", "wiki.test.raw", "wikitext-103/wiki.test.raw"):
        path = os.path.join(data_dir, name)
        if data_dir and os.path.isfile(path):
            text = read_text(path)
            articles = re.split(r"\n(?= = [^=\n].* = \n)", text)  # top-level headings only
            articles = [a.strip("\n") for a in articles if a.strip()]
            return ppl.documents_from_texts(articles[:limit] if limit else articles, tokenizer), path
    return None, None


def run_lm(runner, tokenizer, config, context_len: int) -> dict:
    from nl_jax.eval import perplexity as ppl

    out = {}
    corpora = {"validation": _validation_docs(config, tokenizer, _LIMIT.value)}
    wiki, path = _wikitext_docs(_DATA_DIR.value, tokenizer, _LIMIT.value)
    if wiki:
        corpora["wikitext"] = wiki
    modes = ["sliding", "stream"] if _PPL_MODE.value == "both" else [_PPL_MODE.value]
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
                stride=_STRIDE.value,
            )
            out[key]["seconds"] = time.time() - t0
            logging.info("lm %s: %s", key, {k: out[key][k] for k in ("loss", "perplexity", "bits_per_byte")})
    return out


def _commonsense_source(task: str) -> tuple[str, str]:
    """("jsonl" | "tfds" | "", the file, or why the task has no data)."""
    from nl_jax.eval import multiple_choice as mc

    path = os.path.join(_DATA_DIR.value, f"{task}.jsonl") if _DATA_DIR.value else ""
    if path and os.path.isfile(path):
        return "jsonl", path
    if _TFDS_DATA_DIR.value and task in mc.TFDS_NAMES:
        return "tfds", _TFDS_DATA_DIR.value
    where = f"--data_dir={_DATA_DIR.value}" if _DATA_DIR.value else "no --data_dir"
    return "", f"no {task}.jsonl ({where})" + ("" if task == "siqa" else " and no --tfds_data_dir")


def _skip(suite: str, task: str, why: str) -> None:
    print(f"warning: skipped {suite}/{task}: {' '.join(why.split())}", file=sys.stderr, flush=True)


def run_commonsense(runner, tokenizer, context_len: int) -> dict:
    from nl_jax.eval import multiple_choice as mc

    out, skipped = {}, {}
    for task in mc.TASKS:
        kind, where = _commonsense_source(task)
        if kind == "jsonl":
            labels = os.path.join(_DATA_DIR.value, f"{task}-labels.lst")
            data = mc.load_task(
                task, path=where, labels_path=labels if os.path.isfile(labels) else "", limit=_LIMIT.value
            )
        elif kind == "tfds":
            try:
                data = mc.load_task(task, tfds_data_dir=where, limit=_LIMIT.value)
            except ValueError as e:
                skipped[task] = str(e)[:200]
                _skip("commonsense", task, skipped[task])
                continue
        else:
            skipped[task] = where
            _skip("commonsense", task, where)
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


def _niah_haystack(config, tokenizer) -> str:
    from nl_jax.data.sources import read_text

    if _NIAH_HAYSTACK.value:
        return read_text(_NIAH_HAYSTACK.value)
    docs = _validation_docs(config, tokenizer, 0)
    return "\n".join(tokenizer.decode(d.tokens) for d in docs[:200])


def _available_memory() -> tuple[int, int | None]:
    """(host RAM bytes, bytes per accelerator or None on CPU, whose devices share the host's RAM)."""
    import jax

    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return host, None
    stats = device.memory_stats() or {}
    return host, stats.get("bytes_limit")


def check_niah(runner, tokenizer, haystack: str) -> None:
    """Before anything is generated: the longest length fits in memory (the lower bound of
    `niah.memory_needed`) and in what the model can decode, and every task fits the shortest."""
    import jax

    from nl_jax.eval import niah

    lengths = [int(x) for x in _NIAH_LENGTHS.value]
    prompts = len(_NIAH_DEPTHS.value) * _NIAH_SAMPLES.value
    try:
        host, device = niah.memory_needed(runner, max(lengths), prompts, tokenizer.vocab_size)
    except ValueError as e:
        raise cli.CommandError(f"--niah_lengths={max(lengths)}: {e}") from e
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
            raise cli.CommandError(
                f"--niah_lengths={max(lengths)} needs at least {n / 2**30:,.1f} GiB of {where} for "
                f"{prompts} prompts (--niah_depths x --niah_samples) in batches of {runner.batch_size}; "
                f"this machine has {have / 2**30:,.1f} GiB. Use shorter --niah_lengths, fewer "
                "--niah_samples / --niah_depths, or a smaller --batch_size"
            )
    for task in _NIAH_TASKS.value:
        try:
            niah.make_sample(task, tokenizer, min(lengths), 0.0, haystack_text=haystack)
        except ValueError as e:
            raise cli.CommandError(f"--niah_lengths / --niah_tasks: {e}") from e


def run_niah(runner, tokenizer, haystack: str, out_dir: str) -> dict:
    from nl_jax.eval import niah

    res = niah.evaluate_niah(
        runner,
        tokenizer,
        tasks=_NIAH_TASKS.value,
        lengths=[int(x) for x in _NIAH_LENGTHS.value],
        depths=[float(x) for x in _NIAH_DEPTHS.value],
        num_samples=_NIAH_SAMPLES.value,
        haystack_text=haystack,
    )
    res["heatmaps"] = niah.plot_heatmaps(res, out_dir)
    with open(os.path.join(out_dir, "niah_samples.jsonl"), "w") as f:
        for s in res.pop("samples"):
            f.write(json.dumps(s) + "\n")
    return res


def run_continual(runner, tokenizer, config, context_len: int) -> dict:
    import numpy as np

    from nl_jax.eval import continual

    out = {}
    if not runner.can_decode:
        _skip("continual", "all", "the model has no decode state to carry")
        return {"_skipped": "the model has no decode state to carry"}
    docs = _validation_docs(config, tokenizer, 0)
    stream = np.concatenate([np.concatenate([d.tokens, [tokenizer.eos_id]]) for d in docs]).astype(np.int32)
    segments = min(_SEGMENTS.value, (len(stream) - 1) // context_len)
    if segments >= 1:
        out["memorization"] = continual.stream_memorization(
            runner, stream, segment_len=context_len, num_segments=segments
        )
    ci_dir = os.path.join(_DATA_DIR.value, "continual") if _DATA_DIR.value else ""
    train, test = os.path.join(ci_dir, "train.jsonl"), os.path.join(ci_dir, "test.jsonl")
    if ci_dir and os.path.isfile(train) and os.path.isfile(test):
        train_data, test_data = continual.read_labelled_jsonl(train), continual.read_labelled_jsonl(test)
        stages = min(_CI_STAGES.value, len({lab for _, lab in train_data}))
        kw = dict(
            num_stages=stages,
            shots_per_class=_CI_SHOTS.value,
            max_test_per_class=_CI_TEST.value,
            state_len=max(context_len, 2048),
        )
        out["class_incremental"] = continual.class_incremental(runner, tokenizer, train_data, test_data, **kw)
        out["class_incremental_reset"] = continual.class_incremental(
            runner, tokenizer, train_data, test_data, carry_state=False, **kw
        )
    else:
        out["_skipped_class_incremental"] = "no <data_dir>/continual/{train,test}.jsonl"
        _skip("continual", "class_incremental", out["_skipped_class_incremental"])
    return out


def evaluate_workdir(workdir: str, suites: list[str], out_dir: str = "") -> tuple[str, dict]:
    """Runs `suites` on the newest (or --step) checkpoint of one run; writes and returns its results."""
    import jax

    from nl_jax.data.tokenizers import check_vocab, load_tokenizer
    from nl_jax.eval import report
    from nl_jax.eval.runner import ModelRunner

    model, config, step, mesh = _model_and_config(workdir)
    tokenizer = load_tokenizer(config.data.get("tokenizer", "byte"))
    check_vocab(tokenizer, config.model.vocab_size)
    context_len = _CONTEXT.value or int(config.data.seq_len)
    runner = ModelRunner(model, mesh=mesh, batch_size=_BATCH.value, length_bucket=min(256, context_len))
    name = config.get("config_name", "") or os.path.basename(os.path.normpath(workdir))
    out_dir = cli.writable_dir(out_dir or os.path.join(workdir, "eval", f"step_{step}"), "--out_dir")
    if "niah" in suites:  # checked before any suite runs
        haystack = _niah_haystack(config, tokenizer)
        check_niah(runner, tokenizer, haystack)
    json_path = os.path.join(out_dir, "eval_results.json")
    results = json.load(open(json_path)) if os.path.isfile(json_path) else {}
    results["meta"] = {
        "workdir": workdir,
        "model": config.model.name,
        "step": step,
        "context_len": context_len,
        "devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "random_init": _RANDOM_INIT.value,
    }
    print(
        f"evaluating {name} ({config.model.name}) step {step} on {jax.device_count()} devices, "
        f"mesh {dict(mesh.shape)}: {suites}",
        flush=True,
    )
    for suite in suites:
        t0 = time.time()
        if suite == "lm":
            results["lm"] = run_lm(runner, tokenizer, config, context_len)
        elif suite == "commonsense":
            results["commonsense"] = run_commonsense(runner, tokenizer, context_len)
        elif suite == "niah":
            results["niah"] = run_niah(runner, tokenizer, haystack, out_dir)
        elif suite == "continual":
            results["continual"] = run_continual(runner, tokenizer, config, context_len)
        print(f"  {suite}: {time.time() - t0:.1f}s", flush=True)
    if not any(k for suite in suites for k in results[suite] if not k.startswith("_")):
        raise cli.CommandError(
            f"nothing was evaluated: every task of --suite={','.join(suites)} was skipped (see the "
            "warnings above); give --data_dir / --tfds_data_dir with the tasks' data"
        )
    if jax.process_index() == 0:
        jpath, mpath = report.write_results(out_dir, {name: results})
        print(open(mpath).read())
        print(f"results: {jpath}\n         {mpath}", flush=True)
    return name, results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO; -v 0 shows it
    workdirs = [w for w in (_WORKDIR.value or "").split(",") if w]
    if not workdirs:
        raise app.UsageError("--workdir is required (one run, or several separated by commas)")
    missing = [w for w in workdirs if not _RANDOM_INIT.value and not os.path.isdir(w)]
    if missing:
        raise app.UsageError(f"--workdir: no such directory {missing}")
    _check_paths()
    suites = _suites(_SUITE.value)
    if suites == ["commonsense"]:
        from nl_jax.eval.multiple_choice import TASKS

        if not any(_commonsense_source(t)[0] for t in TASKS):
            raise cli.CommandError(
                "--suite=commonsense has no data: put <task>.jsonl files in --data_dir "
                f"({', '.join(TASKS)}) or give --tfds_data_dir"
            )
    if len(workdirs) == 1:
        evaluate_workdir(workdirs[0], suites, _OUT_DIR.value)
        return
    import jax

    from nl_jax.eval import report

    rows = {}
    for workdir in workdirs:  # each run's own results go to its workdir, as for one run
        name, results = evaluate_workdir(workdir, suites)
        rows[name if name not in rows else workdir] = results
    if jax.process_index() == 0:
        out_dir = _OUT_DIR.value or os.path.join(
            os.path.commonpath([os.path.abspath(w) for w in workdirs]), "eval"
        )
        jpath, mpath = report.write_results(out_dir, rows, stem="comparison")
        print(open(mpath).read())
        print(f"comparison: {jpath}\n            {mpath}", flush=True)


if __name__ == "__main__":
    cli.run(main)
