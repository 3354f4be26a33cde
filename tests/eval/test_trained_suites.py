"""The suites that train a model per task (mad, formal): the task loss, the config a task trains
with, the learning-rate x weight-decay grid, and a run of each suite on a tiny Transformer writing
its table rows."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import configs
from nl_jax.eval import report, suites, trained_suites
from nl_jax.eval.task_training import TaskTrainer, _class_args, _loss, task_config
from nl_jax.parallel.mesh import make_mesh


@pytest.fixture(scope="module")
def tiny_config():
    config = configs.load("transformer_tiny")
    config.model.update(d_model=32, num_layers=1, num_heads=2, mlp_hidden=64)
    return config


def test_loss_counts_only_weighted_positions_and_real_classes():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 12)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 12, size=(2, 5)))
    weights = jnp.asarray([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], jnp.float32)
    ids, cw = _class_args((2, 4, 5))
    loss = _loss("softmax", logits, targets, weights, ids, cw)
    logp = np.asarray(logits) - np.log(np.exp(np.asarray(logits)).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, (nll * weights).sum() / 4, rtol=1e-5)
    # multilabel: what sits at weight-0 positions or in the padding classes changes nothing
    multi = jnp.asarray(rng.integers(0, 2, size=(2, 5, 8)), jnp.float32)
    changed = multi.at[0, 0].set(1 - multi[0, 0]).at[:, :, 3:].set(1.0)
    a = _loss("multilabel", logits, multi, weights, ids, cw)
    b = _loss("multilabel", logits, changed, weights, ids, cw)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.isclose(
        a, _loss("multilabel", logits, multi.at[0, 1, 0].set(1 - multi[0, 1, 0]), weights, ids, cw)
    )


def test_task_config_keeps_the_model_and_fits_the_schedule(tiny_config):
    cfg = task_config(tiny_config, steps=10, batch_size=4, seq_len=64, lr=1e-2)
    assert cfg.model.to_dict() == tiny_config.model.to_dict()
    assert (cfg.train.steps, cfg.data.global_batch_size, cfg.data.seq_len) == (10, 4, 64)
    assert cfg.optim.warmup_steps <= 1 and cfg.optim.lr == 1e-2
    assert tiny_config.train.steps != 10  # the run's config is left as it was
    assert cfg.optim.weight_decay == tiny_config.optim.weight_decay  # None: the run's
    decayed = task_config(tiny_config, steps=10, batch_size=4, seq_len=64, weight_decay=0.25)
    assert decayed.optim.weight_decay == 0.25


def _zero_grad_update(trainer):
    """(params, the first update of the trainer's optimizer for zero gradients): with Adam's moments
    at zero, all that is left of it is the decoupled weight decay."""
    program = trainer._program(64, "softmax")[0]
    params = jax.device_get(trainer._program(64, "softmax")[1](np.int32(0))["params"])
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = program.tx.update(zeros, program.tx.init(params), params)
    return params, jax.device_get(updates)


def test_the_task_weight_decay_reaches_the_optimizer(tiny_config):
    mesh = make_mesh(tiny_config.mesh)
    kw = dict(steps=10, batch_size=2, lr=1e-2)
    params, decayed = _zero_grad_update(TaskTrainer(tiny_config, mesh, weight_decay=0.5, **kw))
    _, none = _zero_grad_update(TaskTrainer(tiny_config, mesh, weight_decay=0.0, **kw))
    assert all(not np.any(u) for u in jax.tree.leaves(none))
    # decoupled: u = -lr(step 0) * wd * W on the matrices; the warm-up (cut to 1 step) starts below lr
    pairs = zip(jax.tree.leaves(decayed), jax.tree.leaves(params))
    ratios = [u / w for u, w in pairs if np.any(u) and np.all(w != 0)]
    assert ratios, "no parameter was decayed"
    for r in ratios:
        np.testing.assert_allclose(r, r.flat[0], rtol=1e-4)
        assert -0.5 * 1e-2 <= r.flat[0] < 0


class _FakeTrainer:
    def __init__(self, lr, weight_decay):
        self.lr, self.weight_decay = lr, weight_decay


def test_best_of_grid_keeps_every_point_and_reports_the_best():
    trainers = [_FakeTrainer(lr, wd) for lr, wd in [(1e-4, 0.0), (1e-4, 0.1), (1e-3, 0.0), (1e-3, 0.1)]]
    scores = {(1e-4, 0.0): 10.0, (1e-4, 0.1): 40.0, (1e-3, 0.0): 40.0, (1e-3, 0.1): float("nan")}
    calls = []

    def train_and_score(trainer):
        calls.append(trainer)
        return {"accuracy": scores[trainer.lr, trainer.weight_decay]}

    out = trained_suites._best_of_grid(
        trainers, train_and_score, lambda p: trained_suites._finite(p["accuracy"])
    )
    assert calls == trainers  # each point trained once, in order
    assert (out["lr"], out["weight_decay"], out["accuracy"]) == (1e-4, 0.1, 40.0)  # a tie: the first
    assert [(p["lr"], p["weight_decay"]) for p in out["grid"]] == list(scores)
    assert [p["accuracy"] for p in out["grid"]][:3] == [10.0, 40.0, 40.0]


def test_the_grid_is_every_learning_rate_with_every_weight_decay():
    grid = trained_suites.task_grid(
        suites.SuiteOptions(task_lrs=(1e-4, 5e-4, 1e-3), task_weight_decays=(0.0, 0.1))
    )
    assert grid == [(1e-4, 0.0), (1e-4, 0.1), (5e-4, 0.0), (5e-4, 0.1), (1e-3, 0.0), (1e-3, 0.1)]
    assert trained_suites.task_grid(suites.SuiteOptions()) == [(None, None)]  # the run's optimizer, once
    assert trained_suites.task_grid(suites.SuiteOptions(task_weight_decays=(0.0, 0.1))) == [
        (None, 0.0),
        (None, 0.1),
    ]


def test_mad_trains_a_task_at_each_grid_point_and_reports_the_best(tiny_config):
    mesh = make_mesh(tiny_config.mesh)
    options = suites.SuiteOptions(
        task_steps=6,
        task_batch_size=4,
        task_lrs=(3e-3,),
        task_weight_decays=(0.0, 0.5),
        mad_tasks=("selective_copy",),
        mad_max_len=32,
        mad_train_examples=32,
        mad_test_examples=8,
    )
    r = trained_suites.run_mad(tiny_config, mesh, options)["selective_copy"]
    grid = r["grid"]
    assert [(p["lr"], p["weight_decay"]) for p in grid] == [(3e-3, 0.0), (3e-3, 0.5)]
    # the same weights and batches at every point: the first loss agrees, the decay changes the rest
    assert grid[0]["first_loss"] == pytest.approx(grid[1]["first_loss"], rel=1e-6)
    assert grid[0]["last_loss"] != pytest.approx(grid[1]["last_loss"], rel=1e-6)
    assert r["accuracy"] == max(p["accuracy"] for p in grid)
    best = grid.index(next(p for p in grid if p["accuracy"] == r["accuracy"]))
    winner = (3e-3, grid[best]["weight_decay"], grid[best]["last_loss"])
    assert (r["lr"], r["weight_decay"], r["last_loss"]) == winner
    md = report.markdown_report({"tiny": {"mad": {"selective_copy": r}}})
    assert f"- tiny: Selective Copying 0.003 / {grid[best]['weight_decay']:g}" in md


def test_suites_train_each_task_and_write_table_rows(tiny_config):
    mesh = make_mesh(tiny_config.mesh)
    options = suites.SuiteOptions(
        task_steps=20,
        task_batch_size=8,
        task_lrs=(3e-3,),
        mad_tasks=("recall", "selective_copy"),
        mad_max_len=32,
        mad_train_examples=64,
        mad_test_examples=16,
        formal_languages=("anbn", "shuffle2"),
        formal_train_len=8,
        formal_train_examples=64,
        formal_test_examples=16,
    )
    results = {"mad": trained_suites.run_mad(tiny_config, mesh, options)}
    results["formal"] = trained_suites.run_formal(tiny_config, mesh, options)
    assert set(results["mad"]) == {"recall", "selective_copy"}
    assert set(results["formal"]) == {"anbn", "shuffle2"}
    for r in [*results["mad"].values(), *results["formal"].values()]:
        assert r["last_loss"] < r["first_loss"] and r["steps"] == 20
    for r in results["mad"].values():
        assert 0.0 <= r["accuracy"] <= 100.0 and r["seq_len"] == 32
    for r in results["formal"].values():
        assert 0.0 <= r["accuracy_id"] <= 100.0 and 0.0 <= r["accuracy_ood"] <= 100.0
    md = report.markdown_report({"tiny": results})
    assert "| Model | ICR | Selective Copying | Avg |" in md
    assert "| Model | a^n b^n | Shuffle-2 |" in md and "lengths 1-8, as trained / 9-16" in md
    acc = results["mad"]["recall"]["accuracy"]
    assert f"| tiny | {acc:.1f} |" in md
    assert "Best (learning rate" not in md  # one grid point: nothing to choose between
    # a task's data and weights come from the seed and the task, not from the other tasks asked
    alone = trained_suites.run_mad(
        tiny_config, mesh, dataclasses.replace(options, mad_tasks=("selective_copy",))
    )
    for key in ("first_loss", "last_loss", "accuracy"):
        assert alone["selective_copy"][key] == pytest.approx(results["mad"]["selective_copy"][key], rel=1e-5)


def test_a_task_whose_vocabulary_the_model_lacks_is_skipped(tiny_config):
    config = tiny_config.copy_and_resolve_references()
    config.model.vocab_size = 64
    mesh = make_mesh(config.mesh)
    out = trained_suites.run_mad(config, mesh, suites.SuiteOptions(mad_tasks=("memorization",)))
    assert set(out) == {"_skipped"} and "256" in out["_skipped"]["memorization"]


def test_suite_flag_takes_mad_and_formal_which_all_leaves_out():
    from experiments.evaluate import _suites

    assert _suites("mad,formal") == (["mad", "formal"], ())
    every = ["lm", "commonsense", "niah", "continual", "recall", "babilong", "class_incremental"]
    assert _suites("all")[0] == every
    assert _suites("all,mad")[0] == every + ["mad"]


class _Stop(Exception):
    pass


def test_formal_examples_of_zero_are_the_published_sizes(tiny_config, monkeypatch):
    seen = []

    def split(language, train_len, train_examples, test_examples, seed=0):
        seen.append((train_len, train_examples, test_examples))
        raise _Stop  # the sizes are all this test asks about

    monkeypatch.setattr(suites.formal, "make_split", split)
    monkeypatch.setattr(trained_suites, "_trainers", lambda *args: [])
    options = suites.SuiteOptions(
        formal_languages=("parity",), formal_train_examples=0, formal_test_examples=0
    )
    with pytest.raises(_Stop):
        trained_suites.run_formal(tiny_config, None, options)
    with pytest.raises(_Stop):
        trained_suites.run_formal(tiny_config, None, suites.SuiteOptions(formal_languages=("parity",)))
    assert seen == [(50, 10_000, 2_000), (50, 1_000, 64)]
