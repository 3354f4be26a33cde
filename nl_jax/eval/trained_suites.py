"""The evaluation suites that train a model per task (`--suite=mad,formal`; not part of "all"):

  mad          the Mechanistic Architecture Design tasks (nl_jax.eval.mad), generated: a fresh
               model of the run's configuration is trained on each task and scored on its test split.
  formal       formal-language recognition (nl_jax.eval.formal), generated: a fresh model per
               language, trained on short strings, scored in and beyond the training length.

Each trains at every point of the options' learning-rate x weight-decay grid and keeps the best.
Options and skips are those of nl_jax.eval.suites.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
from absl import logging

from nl_jax.eval import formal, mad
from nl_jax.eval.suites import SuiteOptions, skip


def task_grid(options: SuiteOptions) -> list[tuple[float | None, float | None]]:
    """The (learning rate, weight decay) points each task trains at, learning rate first; None is
    the run's value, so the default grid is the single point of the run's optimizer."""
    return list(itertools.product(options.task_lrs or (None,), options.task_weight_decays or (None,)))


def _trainers(config, mesh, options: SuiteOptions):
    """A TaskTrainer per grid point: each keeps its compiled programs for every task of the suite."""
    from nl_jax.eval.task_training import TaskTrainer

    return [
        TaskTrainer(
            config, mesh, steps=options.task_steps, batch_size=options.task_batch_size, lr=lr, weight_decay=wd
        )
        for lr, wd in task_grid(options)
    ]


def _best_of_grid(trainers, train_and_score, rank) -> dict:
    """Trains and scores a task once per grid point (`train_and_score(trainer)` -> the point's
    results); the winner's results (highest `rank(results)`, the first point on a tie) with every
    point's under "grid", so a table can say which point won."""
    points = []
    for trainer in trainers:
        result = train_and_score(trainer)
        points.append(dict(lr=trainer.lr, weight_decay=trainer.weight_decay, **result))
    best = max(range(len(points)), key=lambda k: (rank(points[k]), -k))
    return dict(points[best], grid=points)


def _finite(x: float) -> float:
    return x if np.isfinite(x) else -np.inf


def run_mad(config, mesh, options: SuiteOptions) -> dict:
    """Each MAD task: a fresh model of `config` trained on its training split at each point of the
    learning-rate x weight-decay grid, the best accuracy (%) of the scored positions of its test
    split (the protocol's score)."""
    out, skipped = {}, {}
    trainers = _trainers(config, mesh, options)
    vocab = int(config.model.vocab_size)
    for task in options.mad_tasks:
        i = list(mad.TASKS).index(task)  # a task's data and weights do not depend on the others asked
        spec = mad.scaled_spec(
            task, options.mad_max_len, options.mad_train_examples, options.mad_test_examples
        )
        if spec.vocab > vocab:
            skipped[task] = f"needs a vocabulary of {spec.vocab} tokens; the model has {vocab}"
            skip("mad", task, skipped[task])
            continue
        t0 = time.time()
        train, test = mad.make_split(task, spec, seed=options.task_seed + i)

        def train_and_score(trainer):
            # every point starts from the same weights and batches: only the optimizer differs
            trained, fit = trainer.train(train, kind="softmax", seed=options.task_seed + i)
            return dict(accuracy=mad.accuracy(trainer.logits(trained, test.inputs), test), **fit)

        out[task] = dict(
            **_best_of_grid(trainers, train_and_score, lambda p: _finite(p["accuracy"])),
            seq_len=spec.seq_len,
            vocab=spec.vocab,
            train_examples=len(train),
            test_examples=len(test),
            seconds=time.time() - t0,
        )
        logging.info("mad %s: %s", task, out[task])
    if skipped:
        out["_skipped"] = skipped
    return out


def run_formal(config, mesh, options: SuiteOptions) -> dict:
    """Each language: a fresh model of `config` trained on strings up to `formal_train_len`
    symbols at each point of the learning-rate x weight-decay grid; accuracy (%) of recognised test
    strings in and beyond that length of the point best beyond it (in distribution on a tie)."""
    out, skipped = {}, {}
    trainers = _trainers(config, mesh, options)
    vocab = int(config.model.vocab_size)
    train_examples = options.formal_train_examples or formal.PROTOCOL_TRAIN_EXAMPLES
    test_examples = options.formal_test_examples or formal.PROTOCOL_TEST_EXAMPLES
    for lang in options.formal_languages:
        i = formal.LANGUAGES.index(lang)  # a language's data and weights do not depend on the others
        classes = formal.classes(lang)
        if max(classes) >= vocab:
            skipped[lang] = f"needs token ids up to {max(classes)}; the model has a vocabulary of {vocab}"
            skip("formal", lang, skipped[lang])
            continue
        t0 = time.time()
        split = formal.make_split(
            lang, options.formal_train_len, train_examples, test_examples, seed=options.task_seed + i
        )
        train = formal.encode(lang, split.train)
        tests = {"id": formal.encode(lang, split.test_id), "ood": formal.encode(lang, split.test_ood)}

        def train_and_score(trainer):
            trained, fit = trainer.train(
                train, kind="multilabel", classes=classes, seed=options.task_seed + i
            )
            acc = {
                f"accuracy_{name}": formal.accuracy(trainer.logits(trained, data.inputs, classes), data)
                for name, data in tests.items()
            }
            return dict(**acc, **fit)

        def rank(p):
            return (_finite(p["accuracy_ood"]), _finite(p["accuracy_id"]))

        out[lang] = dict(
            **_best_of_grid(trainers, train_and_score, rank),
            train_len=options.formal_train_len,
            train_examples=len(split.train),
            test_examples=len(split.test_id),
            seconds=time.time() - t0,
        )
        logging.info("formal %s: %s", lang, out[lang])
    if skipped:
        out["_skipped"] = skipped
    return out
