"""Bad input stops the trainer with a clear error before training, and no checkpoint is lost."""

import logging
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from experiments import configs
from nl_jax.models.registry import register
from nl_jax.train import NonFiniteLossError, check_config, run
from nl_jax.train import checkpoint as checkpoint_lib
from nl_jax.train import step as step_lib
from nl_jax.train.checkpoint import checkpoint_files
from tests.train.tiny import tiny_config

ONE = jax.devices()[:1]


@register("test_chunked_lm")
class ChunkedLM(nnx.Module):
    """A minimal model that, like the chunked memory models, rejects lengths its chunk does not divide."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.chunk_size = cfg.chunk_size
        self.embed = nnx.Embed(cfg.vocab_size, 8, rngs=rngs)
        self.out = nnx.Linear(8, cfg.vocab_size, rngs=rngs)

    def __call__(self, tokens):
        if tokens.shape[1] % self.chunk_size:
            raise ValueError(
                f"chunk_size={self.chunk_size} does not divide the sequence length {tokens.shape[1]}"
            )
        return self.out(self.embed(tokens)).astype(jnp.float32)


def test_mesh_that_does_not_match_the_devices(tmp_path):
    cfg = tiny_config()
    cfg.mesh.ici_fsdp_parallelism = 3
    with pytest.raises(ValueError, match=r"ici_fsdp_parallelism=3.*product 3 does not match the 8 devices"):
        run(cfg, str(tmp_path))


def test_batch_that_does_not_split_over_the_devices(tmp_path):
    with pytest.raises(ValueError, match=r"microbatch of 4 sequences.*8 data x fsdp devices"):
        run(tiny_config(data__global_batch_size=8, train__grad_accum_steps=2), str(tmp_path))


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cfg = tiny_config(data__source="text", data__path=str(empty))
    with pytest.raises(ValueError, match=r"(?i)empty"):
        run(cfg, str(tmp_path / "run"), devices=ONE)


def test_chunk_size_that_does_not_divide_the_length_fails_before_training(tmp_path):
    cfg = tiny_config()
    cfg.model = ml_collections.ConfigDict(dict(name="test_chunked_lm", vocab_size=260, chunk_size=5))
    with pytest.raises(
        ValueError, match=r"'test_chunked_lm' cannot train on batches of 8 x 32 tokens: chunk_size=5"
    ):
        run(cfg, str(tmp_path), devices=ONE)
    assert not os.path.exists(tmp_path / "checkpoints" / "0")
    cfg.model.chunk_size = 4  # the same model trains once the chunk divides the length
    s = run(cfg, str(tmp_path), devices=ONE)
    assert np.isfinite(s["final_eval_loss"])


def test_a_cms_level_whose_period_outlasts_the_sequence_is_a_warning(caplog):
    cfg = configs.load("hope_tiny")
    cfg.data.seq_len = 64
    cfg.model.cms.periods = (16, 128)
    caplog.set_level(logging.WARNING)
    check_config(cfg)
    (record,) = [r for r in caplog.records if "cms" in r.getMessage()]
    assert "model.cms.periods[1]=128 >= data.seq_len=64: CMS level 2 never updates" in record.getMessage()
    caplog.clear()
    cfg.model.cms.periods = (16, 32)
    check_config(cfg)
    cfg.model.cms.update(periods=(16, 128), signal="none")  # static MLPs: nothing to update
    check_config(cfg)
    assert not caplog.records


def test_unknown_optimizer_lists_close_matches(tmp_path):
    with pytest.raises(ValueError, match=r"unknown optim.name 'adamw2'.*Did you mean adamw"):
        run(tiny_config(optim__name="adamw2"), str(tmp_path), devices=ONE)


def test_nan_loss_stops_without_saving_and_keeps_the_last_good_checkpoint(tmp_path):
    wd = str(tmp_path)
    run(tiny_config(train__steps=4, checkpoint__every=2), wd, devices=ONE)
    assert checkpoint_files(wd) == ["2", "4"]
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite .*at step (\d+).*Last good checkpoint: step \d+"
    ) as e:
        run(
            tiny_config(train__steps=12, checkpoint__every=2, optim__lr=1e30, optim__warmup_steps=0),
            wd,
            devices=ONE,
        )
    nan_step = int(str(e.value).split(" at step ")[1].split(";")[0])
    assert checkpoint_files(wd)[:2] == ["2", "4"]
    assert all(int(s) < nan_step for s in checkpoint_files(wd)), (nan_step, checkpoint_files(wd))
    # Whatever was saved before the NaN showed up is finite, and training continues from it.
    s = run(tiny_config(train__steps=12), wd, devices=ONE)
    assert s["start_step"] >= 4 and np.isfinite(s["final_train_loss"])


def _file_bytes(directory) -> dict:
    return {
        os.path.relpath(os.path.join(root, name), directory): open(os.path.join(root, name), "rb").read()
        for root, _, files in os.walk(directory)
        for name in files
    }


def test_nan_learning_rate_saves_nothing_and_good_checkpoints_survive_byte_for_byte(tmp_path):
    """The loss and gradient of step 4 are finite; the update with lr = NaN is not. Nothing is
    written, and checkpoints 1-3 (keep 3) are untouched: none is pushed out by a NaN one."""
    wd = str(tmp_path)
    run(tiny_config(train__steps=3, checkpoint__every=1, eval__every=0), wd, devices=ONE)
    before = _file_bytes(tmp_path / "checkpoints")
    assert checkpoint_files(wd) == ["1", "2", "3"]
    nan_lr = tiny_config(train__steps=6, checkpoint__every=1, eval__every=0, optim__lr=float("nan"))
    with pytest.raises(
        NonFiniteLossError,
        match=r"non-finite parameters or optimizer state after the update \(loss \d.*lr nan\) at step 4; "
        r"stopped without saving that state. Last good checkpoint: step 3 in ",
    ):
        run(nan_lr, wd, devices=ONE)
    assert _file_bytes(tmp_path / "checkpoints") == before


def test_a_non_finite_checkpoint_of_an_older_version_is_moved_aside(tmp_path, monkeypatch, caplog):
    wd = str(tmp_path)
    run(tiny_config(train__steps=3, checkpoint__every=1, eval__every=0), wd, devices=ONE)
    # What a version that checked only the loss and gradient wrote: step 4 with NaN parameters.
    with monkeypatch.context() as m:
        m.setattr(step_lib, "all_finite", lambda tree: jnp.asarray(True))
        m.setattr(checkpoint_lib, "_all_finite", lambda tree: jnp.asarray(True))
        nan_lr = tiny_config(train__steps=6, checkpoint__every=1, eval__every=0, optim__lr=float("nan"))
        with pytest.raises(NonFiniteLossError, match="at step 5"):
            run(nan_lr, wd, devices=ONE)
    assert checkpoint_files(wd) == ["2", "3", "4"]

    caplog.set_level(logging.WARNING)
    s = run(tiny_config(train__steps=6, checkpoint__every=1, eval__every=0), wd, devices=ONE)
    assert "checkpoint 4 in" in caplog.text and "not finite (NaN / inf); moving it to" in caplog.text
    assert s["start_step"] == 3 and np.isfinite(s["final_train_loss"])
    assert checkpoint_files(wd) == ["4", "5", "6"]
    assert os.path.isdir(tmp_path / "checkpoints_corrupt" / "4" / "state")  # kept, not deleted


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    wd = str(tmp_path)
    run(tiny_config(train__steps=4, checkpoint__every=2, eval__every=0), wd, devices=ONE)
    state_dir = tmp_path / "checkpoints" / "4" / "state"
    for root, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    s = run(tiny_config(train__steps=6, checkpoint__every=2, eval__every=0), wd, devices=ONE)
    assert s["start_step"] == 2 and s["final_step"] == 6 and np.isfinite(s["final_train_loss"])
    assert checkpoint_files(wd) == ["2", "4", "6"]
    assert os.path.isdir(tmp_path / "checkpoints_corrupt" / "4" / "state")  # kept, not deleted


def test_checkpoints_of_another_model_are_an_error_not_a_restart(tmp_path):
    wd = str(tmp_path)
    run(tiny_config(train__steps=2, checkpoint__every=2, eval__every=0), wd, devices=ONE)
    with pytest.raises(ValueError, match=r"checkpoint of a different model \(fields differ: d_model\)"):
        run(tiny_config(train__steps=4, model__d_model=64), wd, devices=ONE)
    assert checkpoint_files(wd) == ["2"]
    shutil.rmtree(tmp_path / "checkpoints")
