"""data.document_boundaries in the trainer: which batch keys the steps read, the segment ids of the
inputs reaching the model, a short run with masked attention end to end, and the config check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nl_jax.data.pipeline import as_batch
from nl_jax.parallel import make_mesh
from nl_jax.train import check_config, run
from nl_jax.train.program import build_train_program
from nl_jax.train.state import init_train_state
from nl_jax.train.step import token_nll
from tests.train.tiny import tiny_config

EOS = 2  # the byte tokenizer's


def _program(mode):
    cfg = tiny_config(data__document_boundaries=mode)
    return cfg, build_train_program(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))


def _eval_batch(cfg):
    """Rows of random bytes with EOS inside, so each row packs several documents."""
    rng = np.random.default_rng(0)
    b, n = cfg.data.global_batch_size, cfg.data.seq_len + 1
    tokens = rng.integers(3, 259, size=(b, n))
    tokens[:, [7, 20]] = EOS
    batch = as_batch(tokens, EOS)
    batch["weights"] = np.ones((b, n - 1), np.float32)
    return batch


@pytest.mark.parametrize(
    "mode,train_keys,eval_keys",
    [
        ("ignore", ("tokens",), ("tokens", "weights")),
        ("mask", ("tokens", "segment_ids"), ("tokens", "weights", "segment_ids")),
    ],
)
def test_segment_ids_reach_the_model_only_when_asked(mode, train_keys, eval_keys):
    cfg, program = _program(mode)
    assert program.train_keys == train_keys and program.eval_keys == eval_keys
    assert tuple(program.abstract_batch) == train_keys
    state = init_train_state(program.model, program.tx, program.shardings, 0)
    batch = _eval_batch(cfg)
    sums = program.jit_eval(state["params"], {k: batch[k] for k in eval_keys})
    # The step's inputs are tokens[:, :-1] with segment_ids[:, :-1].
    segments = jnp.asarray(batch["segment_ids"][:, :-1]) if mode == "mask" else None
    logits = program.model.apply(state["params"], jnp.asarray(batch["tokens"][:, :-1]), segments)
    expected = token_nll(logits, jnp.asarray(batch["tokens"][:, 1:])).sum()
    np.testing.assert_allclose(sums["nll_sum"], expected, rtol=1e-5)
    across = program.model.apply(state["params"], jnp.asarray(batch["tokens"][:, :-1]))
    crossing = token_nll(across, jnp.asarray(batch["tokens"][:, 1:])).sum()
    if mode == "mask":
        assert abs(float(sums["nll_sum"]) - float(crossing)) > 1e-3  # the mask changed the loss
    else:
        np.testing.assert_array_equal(logits, across)


def test_short_run_with_masked_attention_and_accumulation(tmp_path):
    cfg = tiny_config(
        data__document_boundaries="mask",
        train__steps=4,
        train__grad_accum_steps=2,
        eval__every=4,
        checkpoint__enabled=False,
    )
    s = run(cfg, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert s["final_step"] == 4 and np.isfinite(s["final_eval_loss"])
    assert s["final_eval_loss"] < s["initial_eval_loss"]


@pytest.mark.parametrize(
    "model,mode", [("hope", "reset"), ("hope_attention", "mask"), ("deltanet", "mask"), ("samba", "reset")]
)
def test_unsupported_combinations_fail_the_config_check(model, mode):
    cfg = tiny_config(data__document_boundaries=mode)
    cfg.model.name = model
    with pytest.raises(ValueError, match=f"document_boundaries='{mode}' is not supported by model '{model}'"):
        check_config(cfg)
