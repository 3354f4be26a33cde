"""Two processes on localhost (`jax.distributed` over gloo, 2 CPU devices each) train exactly what one
process with the same 4 devices trains: same losses at every logged step, checkpoints written once."""

import os
import socket
import subprocess

import jax
import pytest

from nl_jax.metrics import read_jsonl
from nl_jax.train import run
from nl_jax.train.checkpoint import checkpoint_files
from tests.train.tiny import ROOT, cli_args, pretrain_env, tiny_config

pytestmark = pytest.mark.e2e

SHORT = dict(train__steps=6, eval__every=3, checkpoint__every=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    one = tmp_path / "one"
    run(tiny_config(**SHORT), str(one), devices=jax.devices()[:4])

    two = tmp_path / "two"
    port = _free_port()
    procs = [
        subprocess.Popen(
            ["timeout", "-k", "5", "240"]
            + cli_args(two, **SHORT)
            + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=pretrain_env(device_count=2),
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=260) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert "devices: 4 x cpu (cpu) over 2 process(es)" in outs[0][0]
    assert "summary:" in outs[0][0] and "summary:" not in outs[1][0]  # process 0 reports

    a = read_jsonl(str(one / "metrics.jsonl"))
    b = read_jsonl(str(two / "metrics.jsonl"))
    assert [(r["split"], r["step"]) for r in a] == [(r["split"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5, rel=1e-5), (ra, rb)
    assert checkpoint_files(str(two)) == ["3", "6"]
    data_files = set(os.listdir(two / "checkpoints" / "6" / "data"))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= data_files  # one iterator state per process
