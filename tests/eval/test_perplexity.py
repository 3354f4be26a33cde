"""Perplexity / bits per byte against hand computations; sliding windows and streamed state
against the full forward when the context fits."""

import math

import jax
import numpy as np
import pytest

from nl_jax.data import ByteTokenizer, JsonlFiles, TextFiles
from nl_jax.eval import perplexity as ppl
from nl_jax.eval.runner import ModelRunner

TOK = ByteTokenizer()


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_sliding_windows_score_every_target_once_with_enough_context():
    for n, length, stride in [(1, 4, 4), (10, 4, 4), (10, 4, 1), (37, 8, 3), (8, 8, 5), (5, 16, 7)]:
        seen = np.zeros(n, int)
        for begin, end, first in ppl.sliding_windows(n, length, stride):
            assert 0 <= begin <= first < end <= n and end - begin <= length
            seen[first:end] += 1
            # target i sees inputs [begin, i]: at least min(i+1, length - stride + 1) tokens
            assert first - begin + 1 >= min(first + 1, length - stride + 1)
        assert (seen == 1).all()
    with pytest.raises(ValueError, match="stride"):
        ppl.sliding_windows(10, 4, 5)


def test_metrics_match_a_hand_computation(bigram):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(260, 260)).astype(np.float32)
    texts = ["héllo world", "a b  c\nd", "x"]
    docs = ppl.documents_from_texts(texts, TOK)
    runner = ModelRunner(bigram(table), batch_size=2, length_bucket=8)
    out = ppl.perplexity(runner, docs, context_len=4, stride=3, prefix_id=TOK.eos_id)

    logp = _log_softmax(table.astype(np.float64))
    nll, ntok = 0.0, 0
    for t in texts:
        ids = [TOK.eos_id] + list(TOK.encode(t))
        nll -= sum(logp[a, b] for a, b in zip(ids[:-1], ids[1:]))
        ntok += len(ids) - 1
    nbytes = sum(len(t.encode()) for t in texts)
    words = sum(len(t.split()) for t in texts)  # no leading/trailing whitespace in these texts
    assert out["num_tokens"] == ntok == nbytes  # byte tokenizer: one token per byte
    assert out["nll"] == pytest.approx(nll, rel=1e-6)
    assert out["loss"] == pytest.approx(nll / ntok, rel=1e-6)
    assert out["perplexity"] == pytest.approx(math.exp(nll / ntok), rel=1e-6)
    assert out["bits_per_byte"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-6)
    assert out["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-6)
    streamed = ppl.perplexity(runner, docs, context_len=4, mode="stream", prefix_id=TOK.eos_id)
    assert streamed["nll"] == pytest.approx(nll, rel=1e-6)


def test_sliding_and_stream_equal_the_full_forward_when_the_context_fits(tiny_transformer):
    text = "def f(x):\n    return x + 1\n"
    docs = ppl.documents_from_texts([text, text[:9]], TOK)
    ids = np.concatenate([[TOK.eos_id], TOK.encode(text)])
    logits = np.asarray(jax.jit(lambda t: tiny_transformer(t))(ids[None, :-1]))[0]
    want = -_log_softmax(logits.astype(np.float64))[np.arange(len(ids) - 1), ids[1:]]
    runner = ModelRunner(tiny_transformer, batch_size=2, length_bucket=16)
    for mode, stride in [("sliding", 0), ("sliding", 5), ("stream", 0)]:
        lps = (
            ppl.document_logprobs_sliding(runner, docs, 64, stride or 64, TOK.eos_id)
            if mode == "sliding"
            else ppl.document_logprobs_stream(runner, docs, 64, TOK.eos_id)
        )
        np.testing.assert_allclose(-lps[0], want, rtol=1e-4, atol=1e-5)
        assert len(lps[1]) == 9
    # longer than the context: windows of 8 differ from the full forward but score every token
    short = ppl.document_logprobs_sliding(runner, docs[:1], 8, 4, TOK.eos_id)[0]
    assert short.shape == want.shape and np.abs(-short - want).max() > 1e-4
    np.testing.assert_allclose(-short[:8], want[:8], rtol=1e-4, atol=1e-5)  # first window is exact


def test_documents_from_local_text_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nline two\n\nsecond para\n")
    (tmp_path / "b.jsonl").write_text('{"text": "doc one"}\n{"text": "doc two"}\n')
    text_docs = ppl.documents_from_source(
        TextFiles(str(tmp_path / "a.txt"), eval_path=str(tmp_path / "a.txt")), TOK, "validation"
    )
    assert [d.num_bytes for d in text_docs] == [len("first para\nline two"), len("second para")]
    jsonl = JsonlFiles(str(tmp_path / "b.jsonl"), eval_path=str(tmp_path / "b.jsonl"))
    assert [TOK.decode(d.tokens) for d in ppl.documents_from_source(jsonl, TOK, "validation")] == [
        "doc one",
        "doc two",
    ]


def test_documents_from_array_record_shards(tmp_path):
    from nl_jax.data import ArrayRecordShards, write_shards

    write_shards(str(tmp_path), {"validation": ["alpha beta", "gamma"]}, TOK, block_len=4)
    docs = ppl.documents_from_source(ArrayRecordShards(str(tmp_path)), TOK, "validation")
    assert [TOK.decode(d.tokens) for d in docs] == ["alpha beta", "gamma"]
    assert [(d.num_bytes, d.num_words) for d in docs] == [(10, 2), (5, 1)]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mode"):
        ppl.perplexity(None, [ppl.Document(np.ones(3, np.int32), 3, 1)], context_len=4, prefix_id=2, mode="x")
    with pytest.raises(ValueError, match="no documents"):
        ppl.perplexity(None, [], context_len=4, prefix_id=2)


def test_documents_from_a_prepared_tfds_dataset(tmp_path):
    from nl_jax.data import TfdsText
    from tests.data import tiny_tfds_builder

    (tmp_path / "tiny.txt").write_text("".join(f"line {i}\n" for i in range(8)))
    tiny_tfds_builder.build(str(tmp_path / "tfds"), str(tmp_path))
    docs = ppl.documents_from_source(
        TfdsText("tiny_text", str(tmp_path / "tfds")), TOK, "validation", max_documents=1
    )
    assert len(docs) == 1 and TOK.decode(docs[0].tokens) in {"line 3", "line 7"}
