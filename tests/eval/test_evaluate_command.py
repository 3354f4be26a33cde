"""Restoring a trainer checkpoint onto another mesh, and `experiments.evaluate` end to end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import base
from nl_jax.eval import restore
from nl_jax.models import build_model
from nl_jax.parallel.mesh import make_mesh
from nl_jax.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _IteratorState:
    def get_state(self):
        return {"next_index": 0}


def _config(tmp_path):
    config = base.get_config()
    config.model.update(vocab_size=260, d_model=32, num_layers=1, num_heads=2, mlp_hidden=64)
    text = tmp_path / "corpus.txt"
    text.write_text("def f(x):\n    return x\n\nclass A:\n    pass\n\nimport os\nprint(os.sep)\n" * 8)
    config.data.update(source="text", path=str(text), eval_path=str(text), seq_len=32)
    return config


def _write_run(tmp_path, config, step=3, name="run"):
    """A workdir as experiments.pretrain leaves it: config.json and a checkpoint with optimizer state."""
    workdir = tmp_path / name
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    model = build_model(config.model, nnx.Rngs(0))
    params = nnx.split(model, nnx.Param, ...)[1].to_pure_dict()
    state = {"step": jnp.int32(step), "params": params, "opt_state": optax.adam(1e-3).init(params)}
    ckpt_cfg = ml_collections.ConfigDict(dict(enabled=True, max_to_keep=2, keep_period=0, async_save=False))
    ckpt = Checkpointer(str(workdir), ckpt_cfg, config.model.to_dict())
    ckpt.save(step, state, _IteratorState())
    ckpt.close()
    return str(workdir), model


def test_restore_onto_an_eight_device_mesh(tmp_path):
    config = _config(tmp_path)
    workdir, model = _write_run(tmp_path, config)
    loaded = restore.load_config(workdir)
    assert loaded.model.d_model == 32 and restore.latest_step(workdir) == 3
    mesh = make_mesh(
        ml_collections.ConfigDict(
            dict(ici_data_parallelism=2, ici_fsdp_parallelism=4, ici_tensor_parallelism=1)
        )
    )
    restored, step = restore.restore_model(workdir, loaded, mesh)
    assert step == 3
    kernel = restored.blocks.layers.mlp.up.kernel[...]
    assert len(kernel.sharding.device_set) == 8 and "fsdp" in str(kernel.sharding.spec)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 259, size=(2, 12)), jnp.int32)
    np.testing.assert_allclose(
        jax.jit(lambda t: restored(t))(tokens), jax.jit(lambda t: model(t))(tokens), rtol=1e-5, atol=1e-5
    )


def test_restore_from_a_relative_workdir(tmp_path, monkeypatch):
    """A workdir given relative to the current directory (as `--workdir=runs/NAME` is) restores:
    orbax itself accepts only absolute paths."""
    config = _config(tmp_path)
    workdir, model = _write_run(tmp_path, config)
    monkeypatch.chdir(tmp_path)
    restored, step = restore.restore_model(os.path.relpath(workdir), config)
    assert step == 3
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 259, size=(1, 8)), jnp.int32)
    np.testing.assert_allclose(restored(tokens), model(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.e2e
def test_evaluate_command_end_to_end(tmp_path):
    config = _config(tmp_path)
    workdir, _ = _write_run(tmp_path, config)
    data = tmp_path / "evaldata"
    (data / "continual").mkdir(parents=True)
    (data / "piqa.jsonl").write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "bb", "label": 1}) + "\n")
    (data / "lambada.jsonl").write_text(json.dumps({"text": "import os and import sys"}) + "\n")
    (data / "wikitext.txt").write_text(" = A = \n\n A is a letter .\n\n = B = \n\n B is next .\n")
    (data / "recall").mkdir()
    (data / "recall" / "swde.jsonl").write_text(json.dumps({"text": "Name: Ada. Name:", "value": "Ada"}) + "\n")
    rows = [{"text": t, "label": lab} for lab in ("io", "math") for t in (f"{lab} one", f"{lab} two")]
    (data / "class_incremental" / "banking77").mkdir(parents=True)
    for split in ("train", "test"):
        (data / "continual" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (data / "class_incremental" / "banking77" / f"{split}.csv").write_text(
            "text,category\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)
        )
    (data / "babilong" / "1k").mkdir(parents=True)
    (data / "babilong" / "1k" / "qa1.jsonl").write_text(
        json.dumps({"input": "Mary went to the office.", "question": "Where is Mary?", "target": "office"})
        + "\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [
        sys.executable,
        "-m",
        "experiments.evaluate",
        f"--workdir={workdir}",
        "--suite=all",
        f"--data_dir={data}",
        "--limit=2",
        "--niah_tasks=s_niah_1",
        "--niah_lengths=400",
        "--niah_depths=0.5",
        "--niah_samples=1",
        "--ci_stages=2",
        "--continual_segments=2",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = os.path.join(workdir, "eval", "step_3")
    results = json.load(open(os.path.join(out, "eval_results.json")))
    assert results["meta"]["step"] == 3 and results["meta"]["devices"] == 2
    assert (
        set(results["lm"]) == {"validation", "wikitext"} and results["lm"]["wikitext"]["num_documents"] == 2
    )
    assert set(results["commonsense"]) == {"piqa", "lambada", "_skipped"}
    assert set(results["niah"]["accuracy"]) == {"s_niah_1"}
    assert results["recall"]["swde"]["num_examples"] == 1 and "nq" in results["recall"]["_skipped"]
    assert results["continual"]["class_incremental"]["stages"] == [["io"], ["math"]]
    assert (
        results["babilong"]["qa1"]["1k"]["num_examples"] == 1 and "qa2/1k" in results["babilong"]["_skipped"]
    )
    ci = results["class_incremental"]
    assert set(ci["banking77"]) == {"carried", "reset", "icl", "seconds"} and "clinc150" in ci["_skipped"]
    assert ci["banking77"]["icl"]["stages"] == [["io"], ["math"]]
    md = open(os.path.join(out, "eval_results.md")).read()
    assert "| Model | Wiki ppl |" in md and "S-NIAH-1" in md and "| Model | SWDE | Avg |" in md
    assert "| Model | task | 1K |" in md and "| Model | memory | Banking77 |" in md
    assert os.path.isfile(os.path.join(out, "niah_s_niah_1.png"))

    # Two runs in one command: each run's results in its workdir, and one table with a row per run.
    other, _ = _write_run(tmp_path, config, step=5, name="other")
    cmd = [sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir},{other}", "--suite=lm"]
    proc = subprocess.run(cmd + ["--limit=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.load(open(tmp_path / "eval" / "comparison.json"))
    assert set(rows) == {"run", "other"} and rows["other"]["meta"]["step"] == 5
    assert (
        rows["run"]["lm"]["validation"]["loss"] == rows["other"]["lm"]["validation"]["loss"]
    )  # same weights
    assert os.path.isfile(os.path.join(other, "eval", "step_5", "eval_results.json"))
    md = open(tmp_path / "eval" / "comparison.md").read()
    assert "| run | validation |" in md and "| other | validation |" in md


@pytest.mark.e2e
def test_evaluate_trains_per_task_for_mad_and_formal(tmp_path):
    """--suite=mad,formal: a model per task from the run's config, the paper-layout tables of both."""
    config = _config(tmp_path)
    workdir, _ = _write_run(tmp_path, config)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [
        sys.executable,
        "-m",
        "experiments.evaluate",
        f"--workdir={workdir}",
        "--suite=mad,formal",
        "--task_steps=3",
        "--task_batch_size=3",  # rounded up to the 2 devices
        "--task_lrs=2e-3",
        "--task_weight_decays=0.1",
        "--mad_max_len=40",
        "--mad_train_examples=16",
        "--mad_test_examples=4",
        "--formal_languages=parity,anbncn",
        "--formal_train_len=9",
        "--formal_train_examples=16",
        "--formal_test_examples=4",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = os.path.join(workdir, "eval", "step_3")
    results = json.load(open(os.path.join(out, "eval_results.json")))
    assert set(results["mad"]) == {"compression", "recall", "fuzzy_recall", "selective_copy", "memorization"}
    assert set(results["formal"]) == {"parity", "anbncn"}
    assert all(r["steps"] == 3 and r["test_examples"] == 4 for r in results["mad"].values())
    for r in [*results["mad"].values(), *results["formal"].values()]:
        assert (r["lr"], r["weight_decay"], len(r["grid"])) == (2e-3, 0.1, 1)
    assert (
        results["mad"]["recall"]["seq_len"] == 40 and results["mad"]["memorization"]["train_examples"] == 256
    )
    md = open(os.path.join(out, "eval_results.md")).read()
    assert "| Model | Compression | ICR | Fuzzy ICR | Selective Copying | Memorization | Avg |" in md
    assert "| Model | Parity | a^n b^n c^n |" in md and "lengths 1-9, as trained / 10-18" in md
    assert md.count("| run |") == 2
