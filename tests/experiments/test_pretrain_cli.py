"""`python -m experiments.pretrain`: named configs with overrides, errors as one clear line."""

import subprocess
import sys

import pytest
from absl import flags

from tests.train.tiny import ROOT, pretrain_env


def _pretrain(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "experiments.pretrain", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=pretrain_env(1),
    )


@pytest.mark.e2e
def test_unknown_config_name_lists_close_matches(tmp_path):
    proc = _pretrain("--config=transfomer_tiny", f"--workdir={tmp_path}")
    assert proc.returncode != 0
    assert (
        "unknown config 'transfomer_tiny'" in proc.stderr and "Did you mean transformer_tiny" in proc.stderr
    )
    assert not list(tmp_path.iterdir())  # nothing was written


@pytest.mark.e2e
def test_config_errors_are_one_line_not_a_traceback(tmp_path):
    proc = _pretrain(
        "--config=transformer_tiny", f"--workdir={tmp_path}", "--config.mesh.ici_tensor_parallelism=3"
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: ici_data_parallelism=1, ici_fsdp_parallelism=-1, ici_tensor_parallelism=3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_named_config_parser_and_overrides():
    from experiments import config_flag

    argv = ["prog", "--config=transformer_tiny", "--config.train.steps=7", "--config.optim.name=muon"]
    fv = flags.FlagValues()
    holder = config_flag.define(fv, sys_argv=argv)
    fv(argv)
    assert holder.value.train.steps == 7 and holder.value.optim.name == "muon"
    assert holder.value.model.d_model == 128
    with pytest.raises(flags.IllegalFlagValueError, match="Did you mean transformer_tiny"):
        fv2 = flags.FlagValues()
        config_flag.define(fv2, sys_argv=["prog", "--config=transformer_tin"])
        fv2(["prog", "--config=transformer_tin"])
