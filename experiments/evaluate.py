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
               Tasks with no data are listed as skipped.
  niah         RULER-style needle tasks at --niah_lengths x --niah_depths, greedy decoding; the
               haystack is --niah_haystack (a text file) or the run's validation text.
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
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)")
_OUT_DIR = flags.DEFINE_string(
    "out_dir",
    "",
    "where results go (default <workdir>/eval/step_<N>); with several workdirs, where the comparison goes "
    "(default <their common parent>/eval)",
)
_BATCH = flags.DEFINE_integer("batch_size", 8, "rows per forward (rounded up to the data x fsdp devices)")
_CONTEXT = flags.DEFINE_integer("context_len", 0, "scoring context in tokens (0: the training seq_len)")
_LIMIT = flags.DEFINE_integer("limit", 0, "examples per commonsense task / documents per corpus (0: all)")
_PPL_MODE = flags.DEFINE_enum("ppl_mode", "sliding", ["sliding", "stream", "both"], "long-document scoring")
_STRIDE = flags.DEFINE_integer("stride", 0, "sliding-window stride (0: the context, i.e. disjoint windows)")
_NIAH_TASKS = flags.DEFINE_list(
    "niah_tasks", ["s_niah_1", "s_niah_2", "s_niah_3", "mk_niah_1", "mq_niah", "mv_niah"], ""
)
_NIAH_LENGTHS = flags.DEFINE_list("niah_lengths", ["4096", "8192", "16384"], "prompt lengths in tokens")
_NIAH_DEPTHS = flags.DEFINE_list("niah_depths", ["0", "0.25", "0.5", "0.75", "1"], "needle depths in [0, 1]")
_NIAH_SAMPLES = flags.DEFINE_integer("niah_samples", 4, "samples per task, length and depth")
_NIAH_HAYSTACK = flags.DEFINE_string("niah_haystack", "", "haystack text file (default: the validation text)")
_SEGMENTS = flags.DEFINE_integer("continual_segments", 4, "segments of the memorization stream")
_CI_STAGES = flags.DEFINE_integer("ci_stages", 5, "class-incremental stages")
_CI_SHOTS = flags.DEFINE_integer("ci_shots", 4, "demonstrations per class")
_CI_TEST = flags.DEFINE_integer("ci_test_per_class", 20, "test examples per class (0: all)")

SUITES = ("lm", "commonsense", "niah", "continual")


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
    from nl_jax.eval import perplexity as ppl

    for name in ("wikitext.txt", "wiki.test.raw", "wikitext-103/wiki.test.raw"):
        path = os.path.join(data_dir, name)
        if data_dir and os.path.isfile(path):
            text = open(path, encoding="utf-8").read()
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


def run_commonsense(runner, tokenizer, context_len: int) -> dict:
    from nl_jax.eval import multiple_choice as mc

    out, skipped = {}, {}
    for task in mc.TASKS:
        path = os.path.join(_DATA_DIR.value, f"{task}.jsonl") if _DATA_DIR.value else ""
        labels = os.path.join(_DATA_DIR.value, f"{task}-labels.lst") if _DATA_DIR.value else ""
        if path and os.path.isfile(path):
            data = mc.load_task(
                task, path=path, labels_path=labels if os.path.isfile(labels) else "", limit=_LIMIT.value
            )
        elif _TFDS_DATA_DIR.value and task in mc.TFDS_NAMES:
            try:
                data = mc.load_task(task, tfds_data_dir=_TFDS_DATA_DIR.value, limit=_LIMIT.value)
            except ValueError as e:
                skipped[task] = str(e)[:200]
                continue
        else:
            skipped[task] = f"no {task}.jsonl in --data_dir" + (
                "" if task == "siqa" else " and no --tfds_data_dir"
            )
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


def run_niah(runner, tokenizer, config, out_dir: str) -> dict:
    from nl_jax.eval import niah

    if _NIAH_HAYSTACK.value:
        haystack = open(_NIAH_HAYSTACK.value, encoding="utf-8").read()
    else:
        docs = _validation_docs(config, tokenizer, 0)
        haystack = "\n".join(tokenizer.decode(d.tokens) for d in docs[:200])
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
    out_dir = out_dir or os.path.join(workdir, "eval", f"step_{step}")
    os.makedirs(out_dir, exist_ok=True)
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
            results["niah"] = run_niah(runner, tokenizer, config, out_dir)
        elif suite == "continual":
            results["continual"] = run_continual(runner, tokenizer, config, context_len)
        print(f"  {suite}: {time.time() - t0:.1f}s", flush=True)
    if jax.process_index() == 0:
        jpath, mpath = report.write_results(out_dir, {name: results})
        print(open(mpath).read())
        print(f"results: {jpath}\n         {mpath}", flush=True)
    return name, results


def main(argv):
    del argv
    workdirs = [w for w in (_WORKDIR.value or "").split(",") if w]
    if not workdirs:
        raise app.UsageError("--workdir is required (one run, or several separated by commas)")
    missing = [w for w in workdirs if not _RANDOM_INIT.value and not os.path.isdir(w)]
    if missing:
        raise app.UsageError(f"--workdir: no such directory {missing}")
    suites = _suites(_SUITE.value)
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
    app.run(main)
    sys.exit(0)
