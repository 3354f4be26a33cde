"""Continual evaluation: carried state equals a forward over the concatenated stream; the
class-incremental metrics on a model whose choices are certain."""

import json

import jax
import numpy as np
import pytest

from nl_jax.data import ByteTokenizer
from nl_jax.eval import continual
from nl_jax.eval.runner import ModelRunner

TOK = ByteTokenizer()
TEXT = "def mean(xs):\n    return sum(xs) / len(xs)\n\nclass Point:\n    x: int = 0\n" * 2


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_carried_state_equals_one_forward_over_the_stream(tiny_transformer):
    stream = TOK.encode(TEXT)
    seg, k = 16, 3
    runner = ModelRunner(tiny_transformer, batch_size=2, length_bucket=16)
    out = continual.stream_memorization(
        runner, stream, segment_len=seg, num_segments=k, state_len=2 * seg * k
    )
    x, y = stream[: seg * k], stream[1 : seg * k + 1]
    logits = np.asarray(jax.jit(lambda t: tiny_transformer(t))(x[None]), np.float64)[0]
    nll = -_log_softmax(logits)[np.arange(seg * k), y].reshape(k, seg).mean(-1)
    np.testing.assert_allclose(out["carried"], nll, rtol=1e-4)  # state carried = one long context
    assert out["reset"][0] == pytest.approx(out["carried"][0], rel=1e-4)  # a fresh state = the forward
    assert abs(out["reset"][2] - out["carried"][2]) > 1e-4  # later segments do see the earlier ones
    full = np.concatenate([x, x])  # second pass: the stream again after the first pass
    logits2 = np.asarray(jax.jit(lambda t: tiny_transformer(t))(full[None]), np.float64)[0]
    y2 = np.concatenate([y, y])
    nll2 = -_log_softmax(logits2)[np.arange(2 * seg * k), y2][seg * k :].reshape(k, seg).mean(-1)
    np.testing.assert_allclose(out["repeat"], nll2, rtol=1e-4)
    assert out["memorization_gain"] == pytest.approx(np.mean(np.array(out["carried"]) - out["repeat"]))
    with pytest.raises(ValueError, match="need"):
        continual.stream_memorization(runner, stream[:20], segment_len=16, num_segments=2)


def test_a_model_without_memory_gains_nothing(bigram):
    table = np.random.default_rng(0).normal(size=(260, 260)).astype(np.float32)
    runner = ModelRunner(bigram(table), batch_size=2, length_bucket=8)
    out = continual.stream_memorization(runner, TOK.encode(TEXT), segment_len=8, num_segments=4)
    assert out["context_gain"] == pytest.approx(0, abs=1e-6)
    assert out["memorization_gain"] == pytest.approx(0, abs=1e-6)


def test_class_incremental_accuracy_and_forgetting_on_a_certain_model(bigram, tmp_path):
    # A memoryless model that always prefers the label "zz": once "zz" is a candidate, class "aa"
    # is forgotten completely.
    table = np.zeros((260, 260), np.float32)
    sp, z = TOK.encode(" z")
    table[sp, z] = table[z, z] = 6.0
    records = [{"text": f"item {i}", "label": lab} for i, lab in enumerate(["aa", "aa", "zz", "zz"])]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = continual.read_labelled_jsonl(str(path))
    assert continual.make_stages([lab for _, lab in data], 2) == [["aa"], ["zz"]]
    runner = ModelRunner(bigram(table), batch_size=4, length_bucket=8)
    out = continual.class_incremental(runner, TOK, data, data, num_stages=2, shots_per_class=1, state_len=64)
    assert out["accuracy"] == [[100.0], [0.0, 100.0]]
    assert out["average_accuracy"] == [100.0, 50.0]
    assert out["forgetting"] == [100.0] and out["mean_forgetting"] == 100.0
    with pytest.raises(ValueError, match="num_stages"):
        continual.make_stages(["a", "b"], 3)


def test_classification_branches_from_the_state(tiny_transformer):
    runner = ModelRunner(tiny_transformer, batch_size=4, length_bucket=16)
    demos = TOK.encode(continual.demonstration("x = 1", "code"))
    state = runner.init_state(1, 256)
    _, _, state = runner.stream(demos[None], np.zeros_like(demos)[None], state)
    queries, labels = ["y = 2", "hi yo"], ["code", "data"]  # equal lengths: one compiled shape
    preds = continual._classify(runner, TOK, state, queries, labels, 256)
    fwd = jax.jit(lambda t: tiny_transformer(t))
    for q, pred in zip(queries, preds):
        scores = []
        for lab in labels:
            tail = TOK.encode(f"Text: {q}\nLabel: {lab}")
            k = len(TOK.encode(" " + lab))
            ids = np.concatenate([demos, tail])
            logp = _log_softmax(np.asarray(fwd(ids[None, :-1]), np.float64)[0])
            rows = np.arange(len(ids) - 1 - k, len(ids) - 1)
            scores.append(logp[rows, ids[-k:]].sum())
        assert pred == labels[int(np.argmax(scores))]
