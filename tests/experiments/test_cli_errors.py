"""Every command answers a bad input with one line, `error: ...`, and the exit code of its kind
(experiments/cli.py), the traceback only when asked for; what it accepts with less than was asked
for, it says."""

import subprocess
import sys

import pytest
from absl import app, flags

from experiments import cli
from nl_jax.train import NonFiniteLossError
from tests.eval.test_evaluate_command import _config, _write_run
from tests.train.tiny import ROOT, pretrain_env

TINY = ["--config=transformer_tiny", "--config.model.num_layers=1", "--config.model.d_model=32"]


def _command(module, *args, env=None, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", f"experiments.{module}", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**pretrain_env(1), **(env or {})},
    )


def _assert_one_error_line(proc, code: int, *expected: str) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    assert sum(ln.startswith("error:") for ln in lines) == 1
    for text in expected:
        assert text in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "syntax.py").write_text("def get_config(:\n    pass\n")
    (d / "a_file").write_text("not a directory\n")
    (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (d / "program").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)  # an executable
    (d / "empty_data").mkdir()
    config = _config(d)
    _write_run(d, config, step=3, name="run")
    (d / "no_config").mkdir()
    (d / "gpt2").mkdir()
    (d / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    (d / "no_checkpoint").mkdir()
    (d / "no_checkpoint" / "config.json").write_text(config.to_json_best_effort())
    return d


# (command, its arguments, exit code, what the line says). {d}: the files fixture's directory.
CASES = {
    "override_typo": (
        "pretrain",
        [*TINY, "--config.optim.lrr=1"],
        2,
        ["--config.optim.lrr", "Did you mean optim.lr"],
    ),
    "config_syntax": ("pretrain", ["--config={d}/syntax.py"], 2, ["syntax.py, line 1"]),
    "config_missing": ("pretrain", ["--config={d}/nope.py"], 2, ["nope.py' does not exist"]),
    "data_missing": (
        "pretrain",
        [*TINY, "--workdir={d}/w1", "--config.data.source=text", "--config.data.path={d}/nope.txt"],
        2,
        ["does not exist", "nope.txt"],
    ),
    "tokenizer_missing": (
        "pretrain",
        [*TINY, "--workdir={d}/w2", "--config.data.tokenizer={d}/nope.model"],
        2,
        ["nope.model"],
    ),
    # /sys refuses new directories to every user, root included.
    "workdir_read_only": (
        "pretrain",
        [*TINY, "--workdir=/sys/nl_jax_run"],
        4,
        ["--workdir=/sys/nl_jax_run cannot be written"],
    ),
    "workdir_is_a_file": ("pretrain", [*TINY, "--workdir={d}/a_file"], 4, ["a_file is a file"]),
    "process_id": (
        "pretrain",
        [
            *TINY,
            "--workdir={d}/w3",
            "--num_processes=2",
            "--process_id=5",
            "--coordinator_address=localhost:1",
        ],
        2,
        ["--process_id=5 must be in [0, --num_processes=2)"],
    ),
    "data_binary": (
        "pretrain",
        [*TINY, "--workdir={d}/w5", "--config.data.source=text", "--config.data.path={d}/program"],
        2,
        ["program is not text (a NUL byte at offset 7", "decode_errors=replace"],
    ),
    "batch_size_0": (
        "pretrain",
        [*TINY, "--workdir={d}/w4", "--config.data.global_batch_size=0"],
        2,
        ["global_batch_size must be >= 1"],
    ),
    "eval_no_checkpoint": (
        "evaluate",
        ["--workdir={d}/no_checkpoint", "--suite=lm"],
        2,
        ["no checkpoint under", "--random_init"],
    ),
    "eval_no_config": ("evaluate", ["--workdir={d}/no_config", "--suite=lm"], 2, ["config.json not found"]),
    "eval_step_99": (
        "evaluate",
        ["--workdir={d}/run", "--suite=lm", "--step=99"],
        2,
        ["no checkpoint of step 99", "its steps: 3"],
    ),
    "eval_lengths_abc": (
        "evaluate",
        ["--workdir={d}/run", "--suite=niah", "--niah_lengths=abc"],
        2,
        ["--niah_lengths", "whole numbers"],
    ),
    "eval_depths_2": (
        "evaluate",
        ["--workdir={d}/run", "--suite=niah", "--niah_depths=2"],
        2,
        ["--niah_depths", "[0, 1]"],
    ),
    "eval_task_lrs_abc": (
        "evaluate",
        ["--workdir={d}/run", "--suite=mad", "--task_lrs=1e-3,abc"],
        2,
        ["--task_lrs", "['abc'] are not learning rates > 0", "1e-4,5e-4,1e-3"],
    ),
    "eval_task_weight_decays_negative": (
        "evaluate",
        ["--workdir={d}/run", "--suite=mad", "--task_weight_decays=0,-0.1"],
        2,
        ["--task_weight_decays", "['-0.1'] are not weight decays >= 0", "0,0.1"],
    ),
    "eval_batch_size_0": (
        "evaluate",
        ["--workdir={d}/run", "--suite=lm", "--batch_size=0"],
        2,
        ["--batch_size=0"],
    ),
    "eval_data_dir_missing": (
        "evaluate",
        ["--workdir={d}/run", "--suite=lm", "--data_dir={d}/nope"],
        2,
        ["--data_dir=", "no such directory"],
    ),
    "eval_no_commonsense_data": (
        "evaluate",
        ["--workdir={d}/run", "--suite=commonsense", "--data_dir={d}/empty_data"],
        2,
        ["--suite=commonsense has no data"],
    ),
    "eval_niah_too_long": (
        "evaluate",
        ["--workdir={d}/run", "--suite=niah", "--niah_lengths=10000000000"],
        2,
        ["--niah_lengths=10000000000 needs at least", "GiB of host memory"],
    ),
    "compile_save_dir_missing": (
        "compile",
        ["--config=transformer_tiny", "--topology=v5e-4", "--save={d}/nope/step.pkl"],
        2,
        ["--save=", "does not exist"],
    ),
    "prepare_bad_jsonl": (
        "prepare_data",
        ["--input={d}/bad.jsonl", "--format=jsonl", "--output_dir={d}/shards"],
        2,
        ["bad.jsonl:2: invalid JSON"],
    ),
    "prepare_binary": (
        "prepare_data",
        ["--input={d}/program", "--output_dir={d}/shards2"],
        2,
        ["program is not text", "--decode_errors"],
    ),
    "prepare_output_is_a_file": (
        "prepare_data",
        ["--input={d}/bad.jsonl", "--output_dir={d}/a_file"],
        4,
        ["a_file is a file"],
    ),
    "tokenizer_input_missing": (
        "train_tokenizer",
        ["--input={d}/nope.txt", "--model_prefix={d}/spm"],
        2,
        ["nope.txt"],
    ),
    "convert_no_hf_dir": (
        "convert",
        ["--from_hf={d}/nope", "--to={d}/w6"],
        2,
        ["--from_hf=", "nope: no such directory"],
    ),
    "convert_not_llama": (
        "convert",
        ["--from_hf={d}/gpt2", "--to={d}/w7"],
        2,
        ["model_type 'gpt2' is not supported; nl_jax imports llama"],
    ),
    "convert_export_step_99": (
        "convert",
        ["--workdir={d}/run", "--to_hf={d}/hf_out", "--step=99"],
        2,
        ["has no checkpoint of step 99; its steps: 3"],
    ),
    "sweep_override_typo": (
        "sweep",
        [*TINY, "--config.optim.lrr=1", "--mode=print"],
        2,
        ["Did you mean optim.lr"],
    ),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line_with_its_exit_code(files, case):
    module, args, code, expected = CASES[case]
    _assert_one_error_line(_command(module, *[a.format(d=files) for a in args]), code, *expected)


@pytest.mark.e2e
def test_every_task_skipped_is_a_warning_each_and_an_error(files):
    """TFDS named but holding none of the datasets: each task says why it is skipped, and a run
    that evaluated nothing fails."""
    args = ["--workdir={d}/run", "--suite=commonsense", "--tfds_data_dir={d}/empty_data"]
    proc = _command("evaluate", *[a.format(d=files) for a in args])
    _assert_one_error_line(proc, 2, "nothing was evaluated: every task of --suite=commonsense was skipped")
    skipped = [ln.split(": ")[1] for ln in proc.stderr.splitlines() if ln.startswith("warning: skipped")]
    assert len(skipped) == 8 and "skipped commonsense/piqa" in skipped


@pytest.mark.e2e
def test_train_tokenizer_says_it_wrote_fewer_pieces_than_asked(files):
    (files / "small.txt").write_text("def f(x):\n    return x + 1\n\nprint(f(2))\n" * 20)
    proc = _command(
        "train_tokenizer", f"--input={files}/small.txt", f"--model_prefix={files}/spm", "--vocab_size=100000"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    pieces = int(line.split(" has ")[1].split(" pieces")[0])
    assert pieces < 1000 and "fewer than --vocab_size=100000" in line and f"vocab_size >= {pieces}" in line


@pytest.mark.e2e
def test_the_traceback_comes_with_an_env_flag_or_verbosity(files):
    args = [*TINY, "--workdir=/sys/nl_jax_run"]
    for env, extra in (({"NL_JAX_TRACEBACK": "1"}, []), ({}, ["--verbosity=1"])):
        proc = _command("pretrain", *args, *extra, env=env)
        assert proc.returncode == 4 and "Traceback" in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("error: --workdir=/sys/nl_jax_run")


def test_kinds_of_failure_map_to_their_codes(tmp_path):
    assert cli.classify(ValueError("bad"))[0] == cli.BAD_INPUT == 2
    assert cli.classify(KeyError("the config has no field 'x'")) == (2, "the config has no field 'x'")
    assert cli.classify(app.UsageError("--config is required"))[0] == 2
    assert cli.classify(flags.IllegalFlagValueError("flag --x=1: no"))[0] == 2
    assert cli.classify(NonFiniteLossError("nan at step 4"))[0] == cli.NON_FINITE == 3
    missing = FileNotFoundError(2, "No such file or directory", str(tmp_path / "x"))
    assert cli.classify(missing) == (2, f"{tmp_path / 'x'}: No such file or directory")
    assert cli.classify(PermissionError(13, "Permission denied", "/ro"))[0] == cli.FILESYSTEM == 4
    assert cli.classify(cli.CommandError("--save is a file", cli.FILESYSTEM))[0] == 4
    code, message = cli.classify(RuntimeError("boom"))
    assert (
        code == cli.INTERNAL == 5
        and message.startswith("RuntimeError: boom")
        and "NL_JAX_TRACEBACK" in message
    )
    assert cli.classify(KeyboardInterrupt())[0] == cli.INTERRUPTED == 130
    assert cli.one_line("first\n  second\nthird") == "first second third"
    assert cli.writable_dir(str(tmp_path / "new" / "dir"), "--out") == str(tmp_path / "new" / "dir")
