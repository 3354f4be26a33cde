"""Checkpoints written by an earlier version still restore: tests/fixtures/checkpoint_hope holds a
tiny HOPE run's step-2 checkpoint (parameters, optimizer state, data position) and its config, made
by tests/fixtures/make_checkpoint_fixture.py. A change that moves a parameter path, renames an
optimizer-state field or changes the data iterator's state fails here."""

import json
import os
import shutil

import jax
import numpy as np

from nl_jax.eval.restore import load_config, restore_model
from nl_jax.metrics import read_jsonl
from nl_jax.train import run
from tests.fixtures.make_checkpoint_fixture import FIXTURE, TOKENS


def _expected() -> dict:
    with open(os.path.join(FIXTURE, "expected.json")) as f:
        return json.load(f)


def test_parameters_restore_to_the_same_logits():
    model, step = restore_model(FIXTURE, load_config(FIXTURE), mesh=None)
    assert step == _expected()["step"]
    want = np.load(os.path.join(FIXTURE, "expected_logits.npy"))
    np.testing.assert_allclose(np.asarray(model(TOKENS)), want, rtol=1e-5, atol=1e-5)


def test_training_resumes_from_the_fixture(tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(FIXTURE, workdir)
    config = load_config(FIXTURE)  # the run's own config: today's defaults may differ
    config.train.steps = 3
    summary = run(config, workdir, config_name="hope_tiny", devices=jax.devices()[:1])
    assert summary["start_step"] == 2 and summary["final_step"] == 3
    (row,) = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]
    assert row["step"] == 3
    np.testing.assert_allclose(row["loss"], _expected()["train_loss_of_step_3"], rtol=1e-5)
