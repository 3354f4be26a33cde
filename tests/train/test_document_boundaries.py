"""data.document_boundaries in the trainer: which batch keys the steps read, the segment ids of the
inputs reaching the model, a short run with masked attention end to end, and the config check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import configs
from nl_jax.data.pipeline import as_batch
from nl_jax.parallel import make_mesh
from nl_jax.train import check_config, run
from nl_jax.train.program import build_train_program
from nl_jax.train.state import init_train_state
from nl_jax.train.step import token_nll
from tests.memory.inputs import fresh_seed
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
    "model,mode", [("hope", "mask"), ("ttt", "mask"), ("deltanet", "mask"), ("rwkv7", "mask")]
)
def test_unsupported_combinations_fail_the_config_check(model, mode):
    cfg = tiny_config(data__document_boundaries=mode)
    cfg.model.name = model
    with pytest.raises(ValueError, match=f"document_boundaries='{mode}' is not supported by model '{model}'"):
        check_config(cfg)


def test_documents_off_a_memory_chunk_grid_stop_the_step():
    """titans with "reset": a row whose document starts inside a memory chunk (EOS at 20: a start
    at 21, chunks of 8) stops the compiled eval step with the model's one-line error."""
    cfg = tiny_config(data__document_boundaries="reset")
    cfg.model = configs.load("titans_tiny").model
    cfg.model.update(d_model=32, num_layers=2, num_heads=2, mlp_hidden=64)
    cfg.model.titans.memory.chunk_size = 8
    program = build_train_program(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    state = init_train_state(program.model, program.tx, program.shardings, 0)
    batch = _eval_batch(cfg)
    with pytest.raises(Exception, match="a document starts at position 21: pad documents to multiples of 8"):
        jax.block_until_ready(program.jit_eval(state["params"], {k: batch[k] for k in program.eval_keys}))


def _aligned_batch(cfg, alignment, seed):
    """Rows of the aligned layout: random documents, EOS, pads up to the grid."""
    from nl_jax.data import packing
    from nl_jax.data.pipeline import as_batch

    rng = np.random.default_rng(seed)
    b, n = cfg.data.global_batch_size, cfg.data.seq_len + 1
    docs = [rng.integers(3, 259, size=int(rng.integers(1, 20))) for _ in range(8 * b)]
    stream = packing.pack_documents(docs, EOS, alignment, 0)
    return as_batch(packing.windows(stream, n - 1)[:b], EOS, 0)


def test_aligned_batches_train_on_their_weighted_targets():
    """data.document_alignment: the train step reads the weights, and its loss (with gradient
    accumulation too) is the weighted mean over the global batch: pads' targets do not count."""
    from nl_jax.train.step import make_loss_fn

    seed = fresh_seed()
    losses, batch = {}, None
    for accum in (1, 2):
        cfg = tiny_config(
            data__document_boundaries="mask", data__document_alignment=8, train__grad_accum_steps=accum
        )
        program = build_train_program(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
        assert program.train_keys == ("tokens", "weights", "segment_ids")
        state = init_train_state(program.model, program.tx, program.shardings, 0)
        batch = _aligned_batch(cfg, 8, seed) if batch is None else batch
        _, metrics = program.jit_train(state, {k: batch[k] for k in program.train_keys})
        losses[accum] = float(metrics["loss"])
    inputs = jnp.asarray(batch["tokens"][:, :-1]), jnp.asarray(batch["segment_ids"][:, :-1])
    state = init_train_state(program.model, program.tx, program.shardings, 0)
    nll = token_nll(program.model.apply(state["params"], *inputs), jnp.asarray(batch["tokens"][:, 1:]))
    w = batch["weights"]
    assert (w == 0).any()
    expected = float((nll * w).sum() / w.sum())
    np.testing.assert_allclose(list(losses.values()), [expected] * 2, rtol=1e-5, err_msg=f"seed {seed}")
    assert abs(expected - float(nll.mean())) > 1e-4, f"seed {seed}"
    full = make_loss_fn(program.model)(state["params"], {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(full, expected, rtol=1e-5, err_msg=f"seed {seed}")


def test_reset_with_an_alignment_off_the_grid_fails_the_config_check():
    cfg = tiny_config(data__document_boundaries="reset", data__document_alignment=4)
    cfg.model = configs.load("titans_tiny").model
    cfg.model.update(d_model=32, num_layers=2, num_heads=2, mlp_hidden=64)
    cfg.model.titans.variant = "lmm"
    cfg.model.titans.memory.chunk_size = 8
    with pytest.raises(ValueError, match="set data.document_alignment to a multiple of 8$"):
        check_config(cfg)
