r"""Evaluate a trained model: the paper's benchmarks as one command.

    python -m experiments.pretrain --config=transformer_tiny --workdir=runs/transformer_tiny
    python -m experiments.evaluate --workdir=runs/transformer_tiny --suite=lm,commonsense,continual \
        --data_dir=/data/eval --limit=200
    python -m experiments.evaluate --workdir=runs/transformer_tiny --suite=niah \
        --niah_lengths=1024,2048 --niah_samples=2          # a small NIAH grid for a CPU
    python -m experiments.evaluate --workdir=runs/hope_760m --suite=commonsense --data_dir=/data/eval
    python -m experiments.evaluate --workdir=runs/hope_760m --suite=niah --niah_lengths=4096,8192,16384
    python -m experiments.evaluate --workdir=runs/hope_tiny --suite=mad,formal   # trains a model per task
    python -m experiments.evaluate --workdir=runs/hope_tiny,runs/transformer_tiny --suite=all \
        --niah_lengths=512,1024 --niah_samples=2       # one table, a row per run: runs/eval/comparison.md

The newest checkpoint in `--workdir` (written by experiments.pretrain, on any mesh) is restored
onto the devices here, only its parameters are read. Results go to
`<workdir>/eval/step_<N>/eval_results.{json,md}` (NIAH heatmaps next to them); running suites one at
a time adds to the same files.

Suites (nl_jax/eval/suites.py runs them; nl_jax/eval/ holds the definitions of every number):
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
  recall       in-context recall: SWDE, NQ, DROP, FDA, SQuAD, TriviaQA from
               `<data_dir>/recall/<task>.jsonl` in the "Just read twice" release's format (lines
               {"text", "value"} or {"context", "question", "answers"}); the prompt's last
               --context_len tokens, greedy decoding of --recall_max_new_tokens, right when the
               continuation up to its first newline contains the answer (paper Table 3). --limit:
               examples per task. A task without a file is a `warning: skipped` line.
  babilong     BABILong (Kuratov et al. 2024) qa1-qa20 (--babilong_tasks, default qa1-qa5) from
               `<data_dir>/babilong/` in the Hugging Face release's layout (`<length>/<task>-*.parquet`,
               or `<length>/<task>.jsonl` with {"input", "question", "target"}), at each length
               directory present or --babilong_lengths=1k,2k,...; greedy decoding, right when the
               answer is the only answer label in the output's first sentence (the release's
               metric). A length whose prompts the model cannot stream in memory, or decode at all,
               is one `warning: skipped` line; so is a task without a file. --limit: examples per
               task and length.
  class_incremental
               class-incremental classification (--ci_stages stages of disjoint classes,
               --ci_shots demonstrations per class, --ci_test_per_class) on CLINC-150, Banking77 and
               DBpedia (--ci_datasets) from their published files in
               `<data_dir>/class_incremental/{clinc150/data_full.json, banking77/{train,test}.csv,
               dbpedia14/{train,test}.csv + classes.txt}`: the state carried across stages, against
               the state restarted at each stage and in-context learning (a fresh state given
               demonstrations of every class seen, as many as fit in --context_len tokens). A
               dataset without its files is a `warning: skipped` line.
  mad          the MAD synthetic tasks (compression, in-context recall, fuzzy in-context recall,
               selective copying, memorization), generated: a fresh model of the run's config
               (its model section, new weights, its optimizer) is trained on each task for
               --task_steps steps at each --task_lrs x --task_weight_decays point and scored on
               the task's test split, the best point reported (paper Table 4).
  formal       parity, (aa)*, (abab)*, a^n b^n, a^n b^n c^n, Shuffle-2, generated: a fresh model per
               language trained on strings of up to --formal_train_len symbols, scored in and
               beyond that length (paper Table 5). mad and formal are not part of "all"; their
               defaults are scaled down to run on a CPU (README, "MAD and formal languages").
  lm_eval      lm-evaluation-harness tasks by name, `--suite=lm_eval:piqa,hellaswag` (the names
               after `lm_eval:` up to the next suite name are its tasks; not part of "all"), with
               their data from the local Hugging Face datasets cache (nothing is downloaded);
               --lm_eval_include=DIR adds task YAMLs (e.g. a task over a local jsonl file). Needs
               the `lm-eval` package; unknown tasks and tasks without local data are skipped lines.
"""

import importlib
import os

from absl import app, flags, logging

from experiments import cli

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "training workdir (config.json + checkpoints/); several, comma-separated, for one table"
)
_SUITE = flags.DEFINE_string(
    "suite",
    "all",
    "lm | commonsense | niah | continual | recall | babilong | class_incremental | mad | formal | "
    "lm_eval:TASK,TASK | all (comma-separated)",
)
_LM_EVAL_INCLUDE = flags.DEFINE_string("lm_eval_include", "", "a directory of extra lm-evaluation-harness task YAMLs")
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
    "limit",
    0,
    "examples per commonsense / recall task and per BABILong task and length, documents per corpus (0: all)",
    lower_bound=0,
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
_CI_STAGES = flags.DEFINE_integer(
    "ci_stages", 5, "continual / class_incremental: stages of disjoint classes", lower_bound=1
)
_CI_SHOTS = flags.DEFINE_integer("ci_shots", 4, "demonstrations per class", lower_bound=0)
_CI_TEST = flags.DEFINE_integer("ci_test_per_class", 20, "test examples per class (0: all)", lower_bound=0)
_RECALL_TASKS = flags.DEFINE_list("recall_tasks", ["swde", "nq", "drop", "fda", "squad", "triviaqa"], "")
_RECALL_NEW = flags.DEFINE_integer(
    "recall_max_new_tokens", 48, "recall: greedy tokens per answer (the protocol's 48)", lower_bound=1
)
_BABILONG_TASKS = flags.DEFINE_list(
    "babilong_tasks", ["qa1", "qa2", "qa3", "qa4", "qa5"], "BABILong tasks (qa1-qa20)"
)
_BABILONG_LENGTHS = flags.DEFINE_list(
    "babilong_lengths",
    [],
    "BABILong lengths by the release's names, e.g. 1k,2k,4k (default: every one in the data)",
)
_CI_DATASETS = flags.DEFINE_list(
    "ci_datasets", ["clinc150", "banking77", "dbpedia14"], "class_incremental: datasets"
)
_TASK_STEPS = flags.DEFINE_integer("task_steps", 10, "mad / formal: training steps per task", lower_bound=1)
_TASK_BATCH = flags.DEFINE_integer(
    "task_batch_size", 8, "mad / formal: sequences per training step (MAD's protocol: 128)", lower_bound=1
)
_TASK_LRS = flags.DEFINE_list(
    "task_lrs",
    [],
    "mad / formal: peak learning rates each task trains at, best reported (default: the run's "
    "optim.lr; MAD's protocol: 1e-4,5e-4,1e-3)",
)
_TASK_WDS = flags.DEFINE_list(
    "task_weight_decays",
    [],
    "mad / formal: weight decays each task trains at with every learning rate (default: the run's "
    "optim.weight_decay; MAD's protocol: 0,0.1)",
)
_TASK_SEED = flags.DEFINE_integer("task_seed", 0, "mad / formal: seed of the data and the fresh weights")
_MAD_TASKS = flags.DEFINE_list(
    "mad_tasks", ["compression", "recall", "fuzzy_recall", "selective_copy", "memorization"], ""
)
_MAD_MAX_LEN = flags.DEFINE_integer(
    "mad_max_len", 64, "cap on each MAD task's sequence length (0: the protocol's, 32 to 256)", lower_bound=0
)
_MAD_TRAIN = flags.DEFINE_integer(
    "mad_train_examples",
    1280,
    "MAD training sequences per task (0: the protocol's 12,800; memorization keeps 256)",
    lower_bound=0,
)
_MAD_TEST = flags.DEFINE_integer(
    "mad_test_examples", 64, "MAD test sequences per task (0: the protocol's 1,280)", lower_bound=0
)
_FORMAL_LANGS = flags.DEFINE_list(
    "formal_languages", ["parity", "aa", "abab", "anbn", "anbncn", "shuffle2"], ""
)
_FORMAL_LEN = flags.DEFINE_integer(
    "formal_train_len", 50, "longest training string; tests go to twice that", lower_bound=1
)
_FORMAL_TRAIN = flags.DEFINE_integer(
    "formal_train_examples",
    1000,
    "training strings per language (0: the protocol's 10,000)",
    lower_bound=0,
)
_FORMAL_TEST = flags.DEFINE_integer(
    "formal_test_examples",
    64,
    "test strings per language and length range (0: the protocol's 2,000)",
    lower_bound=0,
)


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


def _validate_choices(flag: str, module: str, names: str, noun: str) -> None:
    """Registers a validator: every value of list flag `flag` is one of `module.names`."""

    def check(values):
        choices = getattr(importlib.import_module(module), names)
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise flags.ValidationError(f"unknown {noun} {bad or values}; choose from {', '.join(choices)}")
        return True

    flags.register_validator(flag, check)


def _validate_numbers(flag: str, ok, what: str, example: str) -> None:
    """Registers a validator: every value of list flag `flag` is a number for which `ok` holds."""

    def check(values):
        def good(v):
            try:
                return ok(float(v))
            except ValueError:
                return False

        bad = [v for v in values if not good(v)]
        if bad:
            raise flags.ValidationError(f"{bad} are not {what}; give a list such as {example}")
        return True

    flags.register_validator(flag, check)


_validate_numbers("task_lrs", lambda x: 0 < x < float("inf"), "learning rates > 0", "1e-4,5e-4,1e-3")
_validate_numbers("task_weight_decays", lambda x: 0 <= x < float("inf"), "weight decays >= 0", "0,0.1")
_validate_choices("recall_tasks", "nl_jax.eval.recall", "TASKS", "task")
_validate_choices("mad_tasks", "nl_jax.eval.mad", "TASKS", "task")
_validate_choices("formal_languages", "nl_jax.eval.formal", "LANGUAGES", "language")
_validate_choices("niah_tasks", "nl_jax.eval.niah", "TASKS", "task")
_validate_choices("babilong_tasks", "nl_jax.eval.babilong", "TASKS", "task")
_validate_choices("ci_datasets", "nl_jax.eval.class_incremental_data", "DATASETS", "dataset")


@flags.validator("babilong_lengths")
def _check_babilong_lengths(values):
    from nl_jax.eval.babilong import length_tokens

    for v in values:
        try:
            length_tokens(v)
        except ValueError as e:
            raise flags.ValidationError(str(e)) from e
    return True


def _check_paths() -> None:
    """The directories and files named by flags exist (before any model is loaded)."""
    for flag, value, isdir in (
        ("--data_dir", _DATA_DIR.value, True),
        ("--tfds_data_dir", _TFDS_DATA_DIR.value, True),
        ("--niah_haystack", _NIAH_HAYSTACK.value, False),
        ("--lm_eval_include", _LM_EVAL_INCLUDE.value, True),
    ):
        if value and not (os.path.isdir(value) if isdir else os.path.isfile(value)):
            raise cli.CommandError(f"{flag}={value}: no such {'directory' if isdir else 'file'}")


def _suites(value: str) -> tuple[list[str], tuple[str, ...]]:
    """(suite names, lm_eval task names): "lm,lm_eval:piqa,hellaswag" -> (["lm", "lm_eval"], ("piqa",
    "hellaswag")); after `lm_eval:` every name up to the next suite name is a task."""
    from nl_jax.eval.suites import LM_EVAL, SUITES, TRAINED

    names, tasks, bad, in_lm_eval = [], [], [], False
    for item in (s.strip() for s in value.split(",") if s.strip()):
        if item.startswith(LM_EVAL + ":") or item == LM_EVAL:
            names.append(LM_EVAL)
            tasks += [item[len(LM_EVAL) + 1 :]] if ":" in item and item[len(LM_EVAL) + 1 :] else []
            in_lm_eval = True
        elif item in SUITES + TRAINED or item == "all":
            names.append(item)
            in_lm_eval = False
        elif in_lm_eval:
            tasks.append(item)
        else:
            bad.append(item)
    choices = SUITES + TRAINED + ("all", f"{LM_EVAL}:TASK,...")
    if bad or not names:
        raise app.UsageError(f"--suite: unknown {bad or value!r}; choose from {choices}")
    if LM_EVAL in names and not tasks:
        raise app.UsageError(
            f"--suite={value}: name the harness tasks, e.g. --suite={LM_EVAL}:piqa,hellaswag"
        )
    if "all" in names:
        names = list(SUITES) + [n for n in names if n in TRAINED or n == LM_EVAL]
    return list(dict.fromkeys(names)), tuple(tasks)


def _options(lm_eval_tasks: tuple[str, ...] = ()):
    from nl_jax.eval.suites import SuiteOptions

    return SuiteOptions(
        data_dir=_DATA_DIR.value,
        tfds_data_dir=_TFDS_DATA_DIR.value,
        random_init=_RANDOM_INIT.value,
        step=_STEP.value,
        batch_size=_BATCH.value,
        context_len=_CONTEXT.value,
        limit=_LIMIT.value,
        ppl_mode=_PPL_MODE.value,
        stride=_STRIDE.value,
        niah_tasks=tuple(_NIAH_TASKS.value),
        niah_lengths=tuple(int(x) for x in _NIAH_LENGTHS.value),
        niah_depths=tuple(float(x) for x in _NIAH_DEPTHS.value),
        niah_samples=_NIAH_SAMPLES.value,
        niah_haystack=_NIAH_HAYSTACK.value,
        continual_segments=_SEGMENTS.value,
        ci_stages=_CI_STAGES.value,
        ci_shots=_CI_SHOTS.value,
        ci_test_per_class=_CI_TEST.value,
        lm_eval_tasks=lm_eval_tasks,
        lm_eval_include=_LM_EVAL_INCLUDE.value,
        recall_tasks=tuple(_RECALL_TASKS.value),
        recall_max_new_tokens=_RECALL_NEW.value,
        babilong_tasks=tuple(_BABILONG_TASKS.value),
        babilong_lengths=tuple(_BABILONG_LENGTHS.value),
        ci_datasets=tuple(_CI_DATASETS.value),
        task_steps=_TASK_STEPS.value,
        task_batch_size=_TASK_BATCH.value,
        task_lrs=tuple(float(x) for x in _TASK_LRS.value),
        task_weight_decays=tuple(float(x) for x in _TASK_WDS.value),
        task_seed=_TASK_SEED.value,
        mad_tasks=tuple(_MAD_TASKS.value),
        mad_max_len=_MAD_MAX_LEN.value,
        mad_train_examples=_MAD_TRAIN.value,
        mad_test_examples=_MAD_TEST.value,
        formal_languages=tuple(_FORMAL_LANGS.value),
        formal_train_len=_FORMAL_LEN.value,
        formal_train_examples=_FORMAL_TRAIN.value,
        formal_test_examples=_FORMAL_TEST.value,
    )


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
    suites, lm_eval_tasks = _suites(_SUITE.value)
    from experiments import configs
    from nl_jax.eval.workdir import evaluate_workdirs

    evaluate_workdirs(
        workdirs,
        suites,
        _options(lm_eval_tasks),
        config=configs.load(_CONFIG.value) if _CONFIG.value else None,
        out_dir=_OUT_DIR.value,
        writable_dir=lambda path: cli.writable_dir(path, "--out_dir"),
    )


if __name__ == "__main__":
    cli.run(main)
