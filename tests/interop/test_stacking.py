"""Ad-hoc level stacking: HOPE-Attention whose CMS levels start from a pretrained Llama's MLPs gives
the Llama's logits while the levels have not moved (inner lr 0, or before the first level boundary),
and `experiments.pretrain --config=hope_attention_from_pretrained` trains it with only the levels
moving."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import configs
from nl_jax.eval.restore import load_config
from nl_jax.interop import llama, stacking
from nl_jax.train.checkpoint import restore_params
from nl_jax.train.state import ModelFn
from tests.interop.test_llama import SHAPES, _hf_logits, _hf_model
from tests.train.tiny import ROOT, pretrain_env

TOKENS = np.random.default_rng(1).integers(0, 260, size=(2, 32))
PERIOD = 8  # the first level boundary: tokens 0..7 are read before any level update


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(directory, config.json, LlamaWeights, transformers' logits of TOKENS) of a small random Llama."""
    directory = tmp_path_factory.mktemp("llama")
    model = _hf_model(**SHAPES["gqa_untied"])
    model.save_pretrained(directory)
    hf, weights = llama.read_weights(str(directory))
    return directory, hf, weights, _hf_logits(model, TOKENS)


def _logits(hf, weights, *, levels, level_init, inner_lr, signal="ntp"):
    cfg = configs.load("hope_attention_from_pretrained").model
    fields = stacking.model_config(hf, levels)
    cfg.cms.update(
        hidden=fields.pop("cms_hidden"),
        periods=tuple(PERIOD * 2**i for i in range(levels)),
        inner_lr=(inner_lr,) * levels,
        signal=signal,
    )
    cfg.update(fields)
    params = stacking.hope_attention_params(weights, levels, level_init)
    return np.asarray(ModelFn.from_config(cfg).apply(params, TOKENS))


@pytest.mark.parametrize(
    "levels,level_init,signal", [(1, "copy", "ntp"), (2, "first", "ntp"), (2, "first", "local")]
)
def test_frozen_levels_give_the_pretrained_logits(pretrained, levels, level_init, signal):
    _, hf, weights, expected = pretrained
    out = _logits(hf, weights, levels=levels, level_init=level_init, inner_lr=0.0, signal=signal)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


def test_moving_levels_change_the_logits_only_after_the_first_boundary(pretrained):
    _, hf, weights, expected = pretrained
    out = _logits(hf, weights, levels=2, level_init="first", inner_lr=0.1)
    np.testing.assert_allclose(out[:, :PERIOD], expected[:, :PERIOD], rtol=1e-5, atol=1e-4)
    assert float(np.abs(out[:, PERIOD:] - expected[:, PERIOD:]).max(axis=(0, 2)).min()) > 1e-2


def test_copied_levels_chain_the_mlp_so_they_are_not_the_pretrained_layer(pretrained):
    """`level_init="copy"` with two levels applies each layer's MLP twice: a different model (which
    is why the run's default is one level, or "first" for more)."""
    _, hf, weights, expected = pretrained
    out = _logits(hf, weights, levels=2, level_init="copy", inner_lr=0.0)
    assert float(np.abs(out - expected).max()) > 1e-1
    with pytest.raises(ValueError, match=r"level_init must be one of \('copy', 'first'\)"):
        stacking.hope_attention_params(weights, 2, "zeros")


def _pretrain(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.pretrain", "--config=hope_attention_from_pretrained", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=pretrain_env(1),
    )


@pytest.mark.e2e
def test_pretrain_continues_the_llama_training_only_the_levels(pretrained, tmp_path):
    directory = pretrained[0]
    wd = tmp_path / "run"
    run = [
        f"--workdir={wd}",
        f"--config.init.checkpoint={directory}",
        "--config.data.seq_len=32",
        "--config.data.global_batch_size=2",
        "--config.eval.every=0",
        "--config.checkpoint.every=2",
    ]
    proc = _pretrain(*run, "--config.train.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"initialised from {directory}: 2 layers" in proc.stdout
    config = load_config(str(wd))
    assert config.model.d_model == 64 and tuple(config.model.cms.hidden) == (96,)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    before, _ = restore_params(str(wd), config.model, mesh, step=0)
    after, step = restore_params(str(wd), config.model, mesh)
    assert step == 2
    flat_before = dict(jax.tree_util.tree_flatten_with_path(before)[0])
    moved = {
        jax.tree_util.keystr(path): float(np.abs(np.asarray(a) - np.asarray(flat_before[path])).max())
        for path, a in jax.tree_util.tree_flatten_with_path(after)[0]
    }
    assert all(v > 0 for k, v in moved.items() if "'cms'" in k), moved
    assert all(v == 0 for k, v in moved.items() if "'cms'" not in k), moved

    again = _pretrain(*run, "--config.train.steps=3")  # resumes; the Llama is not read again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "initialised from" not in again.stdout

    empty = _pretrain(f"--workdir={tmp_path / 'other'}")
    assert empty.returncode == 2
    assert empty.stderr.strip().splitlines()[-1].endswith(
        "init.checkpoint is empty: pass --config.init.checkpoint=DIR, a Hugging Face Llama directory"
    )
