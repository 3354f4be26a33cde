"""The training loop in-process: a short run end to end, sharded = single device, resume semantics."""

import ctypes
import ctypes.util
import json
import os

import jax
import numpy as np
import pytest

from nl_jax.metrics import read_events, read_jsonl
from nl_jax.parallel import make_mesh
from nl_jax.train import Hook, restore_params, run
from nl_jax.train.checkpoint import checkpoint_files
from nl_jax.train.loop import return_free_heap
from tests.train.tiny import tiny_config


def test_short_run_end_to_end(tmp_path, monkeypatch):
    """Validation loss falls; checkpoints, metrics (jsonl + TensorBoard + W&B offline), PNG, summary,
    profile."""
    for name, value in dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off").items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    cfg = tiny_config(
        train__steps=16,
        eval__every=8,
        checkpoint__every=8,
        train__profile_start_step=3,
        train__profile_steps=2,
        train__wandb_project="nl-jax-test",
    )
    cfg.optim.lr = 1e-2
    wd = str(tmp_path / "run")
    s = run(cfg, wd, config_name="tiny", devices=jax.devices()[:1])

    assert s["final_step"] == 16 and not s["preempted"]
    assert s["final_eval_loss"] < s["initial_eval_loss"] - 1.0, s  # 5.6 nats at init (ln 260)
    assert s["checkpoints"] == [8, 16] == [int(x) for x in checkpoint_files(wd)]
    with open(os.path.join(wd, "summary.json")) as f:
        assert json.load(f)["final_eval_loss"] == s["final_eval_loss"]
    with open(os.path.join(wd, "loss_curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    rows = read_jsonl(os.path.join(wd, "metrics.jsonl"))
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train] == list(range(2, 17, 2))
    assert [r["step"] for r in evals] == [0, 8, 16]
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["lr"] > 0 for r in train)
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in train[1:])
    assert train[-1]["tokens"] == 16 * 8 * 32

    tb_dir = os.path.join(wd, "tensorboard", "train")
    (events_file,) = os.listdir(tb_dir)
    events = read_events(os.path.join(tb_dir, events_file))
    assert [e["step"] for e in events if "loss" in e["scalars"]] == [r["step"] for r in train]
    assert events[-1]["scalars"]["loss"] == pytest.approx(train[-1]["loss"], rel=1e-6)
    profile = os.path.join(wd, "profile")
    assert any(files for _, _, files in os.walk(profile)), "profiler window wrote no trace"

    # Evaluation code reads the parameters alone, sharded for its own mesh.
    params, step = restore_params(wd, cfg.model, make_mesh(cfg.mesh, jax.devices()[:2]))
    assert step == 16 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert jax.tree.leaves(params)[0].sharding.mesh.size == 2

    # Running the same command again finds the finished run: nothing is retrained.
    again = run(cfg, wd, config_name="tiny", devices=jax.devices()[:1])
    assert again["start_step"] == 16 and again["final_eval_loss"] == s["final_eval_loss"]
    # Both were the same W&B run, kept offline in the workdir.
    with open(os.path.join(wd, "wandb_run_id")) as f:
        run_id = f.read().strip()
    assert len([d for d in os.listdir(os.path.join(wd, "wandb")) if d.startswith("offline-run-")]) == 2
    assert all(d.endswith(run_id) for d in os.listdir(os.path.join(wd, "wandb")) if d.startswith("offline-"))


def test_fsdp_x_tensor_on_8_devices_and_accumulation_match_one_device(tmp_path):
    """The same run on 1 device, on 8 devices as FSDP 4 x tensor 2, and on 2 devices with 2
    accumulated microbatches per step: the same losses at every logged step, to 1e-5."""
    runs = {}
    for name, mesh, accum, devices in [
        ("one", {}, 1, jax.devices()[:1]),
        ("fsdp_tensor", dict(ici_fsdp_parallelism=4, ici_tensor_parallelism=2), 1, jax.devices()),
        ("accum", {}, 2, jax.devices()[:2]),
    ]:
        cfg = tiny_config(
            train__steps=4, eval__every=4, checkpoint__enabled=False, train__grad_accum_steps=accum
        )
        cfg.mesh.update(mesh)
        run(cfg, str(tmp_path / name), devices=devices)
        runs[name] = read_jsonl(str(tmp_path / name / "metrics.jsonl"))
    one = runs.pop("one")
    for name, rows in runs.items():
        assert [(r["split"], r["step"]) for r in rows] == [(r["split"], r["step"]) for r in one]
        for a, b in zip(one, rows):
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-5, rel=1e-5), (name, a, b)


def test_bf16_compute_keeps_float32_master_weights_and_relative_workdir(tmp_path, monkeypatch):
    seen = {}

    def inspect(step, state, row):
        seen["dtypes"] = {x.dtype for x in jax.tree.leaves(state["params"])}

    monkeypatch.chdir(tmp_path)  # the CLI default workdir is relative: runs/NAME
    cfg = tiny_config(train__steps=2, eval__every=0, checkpoint__every=2, model__dtype="bfloat16")
    s = run(cfg, "runs/bf16", devices=jax.devices()[:1], hooks=[Hook(every=1, fn=inspect)])
    assert seen["dtypes"] == {np.dtype("float32")}
    assert np.isfinite(s["final_train_loss"])
    assert checkpoint_files(str(tmp_path / "runs" / "bf16")) == ["2"]


@pytest.mark.parametrize("name", ["m3", "deep_momentum"])
def test_deep_optimizers_train_with_fsdp_sharded_state(tmp_path, name):
    """Optimizer state follows the params' FSDP sharding where it has their shape (M3's momenta),
    and is replicated where it does not (the deep-momentum MLP)."""
    seen = {}

    def inspect(step, state, row):
        specs = [x.sharding.spec for x in jax.tree.leaves(state["opt_state"]) if x.ndim >= 2]
        seen["sharded"] = any("fsdp" in str(s) for s in specs)

    cfg = tiny_config(train__steps=2, eval__every=0, checkpoint__enabled=False, optim__name=name)
    s = run(cfg, str(tmp_path), hooks=[Hook(every=2, fn=inspect)], devices=jax.devices()[:2])
    assert np.isfinite(s["final_train_loss"]) and seen["sharded"]


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_return_free_heap_hands_freed_heap_pages_back():
    """glibc keeps freed heap memory mapped (as it keeps the XLA compiler's working memory after a
    compile); `return_free_heap` gives it back, so a step's buffers do not stack on top of it."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block, count = 64 << 10, 2048  # 128 MiB in blocks under glibc's mmap threshold: heap memory
    blocks = [libc.malloc(block) for _ in range(count)]
    guard = libc.malloc(block)  # keeps the freed blocks below the heap's top, where free() cannot trim
    for b in blocks:
        ctypes.memset(b, 1, block)
    for b in blocks:
        libc.free(b)
    held = _resident_bytes()
    return_free_heap()
    released = held - _resident_bytes()
    libc.free(guard)
    assert released > count * block // 2, f"{released >> 20} MiB of {count * block >> 20} given back"
