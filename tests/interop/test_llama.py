"""Llama checkpoints in the Hugging Face layout: the same tokens give the same float32 logits in
`transformers` and in nl_jax, both ways, and the convert command round-trips a checkpoint a run
trains from."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from experiments.configs import base
from nl_jax.eval.restore import load_config, restore_model
from nl_jax.interop import llama
from nl_jax.models import build_model
from nl_jax.train.checkpoint import restore_params
from nl_jax.train.state import ModelFn
from tests.train.tiny import ROOT, pretrain_env

VOCAB = 260  # the byte tokenizer's, so that the convert test can train on the embedded corpus
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 24))
# Grouped-query attention with an untied output, and plain multi-head attention with a tied one.
SHAPES = {
    "gqa_untied": {"num_key_value_heads": 2, "tie_word_embeddings": False},
    "mha_tied": {"num_key_value_heads": 4, "tie_word_embeddings": True},
}


def _hf_model(num_key_value_heads, tie_word_embeddings) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        head_dim=16,
        rms_norm_eps=1e-5,  # neither default: a convention nl_jax would not read shows in the logits
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=0.2,  # logits far from uniform
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norm scales away from 1: a (1 + w) scale or swapped norms would show
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model


def _hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


def _model_config(fields) -> ml_collections.ConfigDict:
    cfg = base.model_config()
    cfg.update(fields)
    return cfg


@pytest.mark.parametrize("shape", SHAPES)
def test_import_gives_the_logits_of_transformers(tmp_path, shape):
    hf_model = _hf_model(**SHAPES[shape])
    hf_model.save_pretrained(tmp_path)
    hf, weights = llama.read_weights(str(tmp_path))
    fields = llama.model_config(hf)
    assert (fields["num_kv_heads"], fields["tie_embeddings"]) == tuple(SHAPES[shape].values())
    assert (fields["rope_theta"], fields["norm_eps"]) == (5000.0, 1e-5)
    model = ModelFn.from_config(_model_config(fields))
    logits = np.asarray(model.apply(llama.transformer_params(weights), TOKENS))
    np.testing.assert_allclose(logits, _hf_logits(hf_model, TOKENS), rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, shape):
    kv, tied = SHAPES[shape].values()
    cfg = _model_config(
        dict(vocab_size=VOCAB, d_model=64, num_layers=2, num_heads=4, num_kv_heads=kv, head_dim=16)
        | dict(mlp_hidden=96, rope_theta=5000.0, tie_embeddings=tied, norm_eps=1e-5, init_std=0.2)
    )
    params = nnx.split(build_model(cfg, nnx.Rngs(1)), nnx.Param, ...)[1].to_pure_dict()
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(  # norm scales away from 1, as in the import test
        lambda path, x: rng.uniform(0.5, 1.5, x.shape).astype(x.dtype) if path[-1].key == "scale" else x,
        params,
    )
    llama.write_hf_checkpoint(cfg, jax.device_get(params), str(tmp_path), max_position_embeddings=64)
    hf_model = LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert hf_model.dtype == torch.float32 and hf_model.config.tie_word_embeddings == tied
    expected = np.asarray(ModelFn.from_config(cfg).apply(params, TOKENS))
    np.testing.assert_allclose(_hf_logits(hf_model, TOKENS), expected, rtol=1e-5, atol=5e-5)


def test_unsupported_checkpoints_are_refused_naming_why(tmp_path):
    hf = json.loads(LlamaConfig(vocab_size=8, hidden_size=8, num_attention_heads=2).to_json_string())
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        llama.model_config({**hf, "model_type": "gpt2"})
    scaled = {**hf, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}
    with pytest.raises(ValueError, match="rope type='llama3'"):
        llama.model_config(scaled)
    with pytest.raises(ValueError, match="attention_bias=True"):
        llama.model_config({**hf, "attention_bias": True})
    with pytest.raises(ValueError, match="sliding_window=16"):
        llama.hf_config(_model_config({"sliding_window": 16}), 64)


def _convert(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.convert", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env=pretrain_env(1),
    )


@pytest.mark.e2e
def test_convert_imports_a_run_that_trains_and_exports_the_same_tensors(tmp_path):
    hf_model = _hf_model(**SHAPES["gqa_untied"])
    hf_model.save_pretrained(tmp_path / "hf")
    wd = tmp_path / "run"
    overrides = ["--config.data.seq_len=16", "--config.data.global_batch_size=2"]
    proc = _convert(f"--from_hf={tmp_path / 'hf'}", f"--to={wd}", "--config=transformer_tiny", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Evaluation restores it like any run.
    config = load_config(str(wd))
    assert config.model.num_kv_heads == 2 and config.data.seq_len == 16
    model, step = restore_model(str(wd), config)
    assert step == 0
    np.testing.assert_allclose(np.asarray(model(TOKENS)), _hf_logits(hf_model, TOKENS), rtol=1e-5, atol=5e-5)

    # A run trains it: from the imported parameters, with a fresh optimizer state.
    train = ["--config.train.steps=1", "--config.eval.every=0", "--config.eval.max_batches=1"]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.pretrain", f"--config={wd / 'config.json'}", f"--workdir={wd}"]
        + train,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env=pretrain_env(1),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    before, _ = restore_params(str(wd), config.model, mesh, step=0)
    after, step = restore_params(str(wd), config.model, mesh)
    change = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))
    assert step == 1 and 0 < change < 0.05  # one small step from the import (a fresh init is ~0.2 away)

    # Export of step 0 gives back the checkpoint's tensors exactly.
    proc = _convert(f"--workdir={wd}", f"--to_hf={tmp_path / 'back'}", "--step=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    original, back = (
        load_file(tmp_path / "hf" / "model.safetensors"),
        load_file(tmp_path / "back" / "model.safetensors"),
    )
    assert sorted(original) == sorted(back)
    assert all(np.array_equal(original[k], back[k]) for k in original)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["max_position_embeddings"] == 16
    again = _convert(f"--from_hf={tmp_path / 'hf'}", f"--to={wd}")
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].endswith(
        "already holds a run: import into a new directory"
    )
    assert os.path.exists(wd / "checkpoints" / "1")
