"""Zero-shot multiple choice: exact log-likelihoods, acc vs acc_norm, every task's file format."""

import json
import math

import jax
import numpy as np
import pytest

from nl_jax.data import ByteTokenizer
from nl_jax.eval import loglikelihood as ll_lib
from nl_jax.eval import multiple_choice as mc
from nl_jax.eval.runner import ModelRunner

TOK = ByteTokenizer()
Z = TOK.encode("z")[0]
SPACE = TOK.encode(" ")[0]
B = TOK.encode("b")[0]


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _bigram_ll(table, context, continuation):
    logp = _log_softmax(table.astype(np.float64))
    ctx, cont = ll_lib.encode_pair(TOK, context, continuation)
    ids = [TOK.eos_id] + list(ctx) + list(cont)
    return sum(logp[a, b] for a, b in zip(ids[len(ctx) : -1], ids[len(ctx) + 1 :]))


def test_encode_pair_moves_trailing_spaces_to_the_continuation():
    ctx, cont = ll_lib.encode_pair(TOK, "Answer: ", "yes")
    assert TOK.decode(ctx) == "Answer:" and TOK.decode(cont) == " yes"


def test_loglikelihood_equals_a_direct_forward_for_every_length(tiny_transformer):
    requests = [("def f(x):", " return x"), ("", "import os"), ("a" * 70, " b"), ("class A:\n", "    pass")]
    runner = ModelRunner(tiny_transformer, batch_size=2, length_bucket=32)
    got = ll_lib.loglikelihood(runner, TOK, requests, max_len=64)
    fwd = jax.jit(lambda t: tiny_transformer(t))
    for (context, continuation), (ll, greedy) in zip(requests, got):
        ctx, cont = ll_lib.encode_pair(TOK, context, continuation)
        ids = np.concatenate([[TOK.eos_id], ctx, cont])[-65:]  # left-truncated to max_len + 1
        logp = _log_softmax(np.asarray(fwd(ids[None, :-1]), np.float64)[0])
        k = len(cont)
        rows = np.arange(len(ids) - 1 - k, len(ids) - 1)
        assert ll == pytest.approx(logp[rows, ids[-k:]].sum(), rel=1e-5, abs=1e-4)
        assert greedy == bool((logp[rows].argmax(-1) == ids[-k:]).all())


def test_acc_and_acc_norm_pick_the_certain_answer_and_differ_where_they_should(bigram):
    table = np.zeros((260, 260), np.float32)
    table[B, B] = 3.0  # after "b", "b" is likely: long " bbbb" wins per character, loses in sum
    runner = ModelRunner(bigram(table), batch_size=4, length_bucket=8)
    ex = mc.Example(["Q:"] * 2, [" a", " bbbb"], label=1)
    out = mc.evaluate_choices(runner, TOK, [ex], max_len=32)
    lls = [_bigram_ll(table, "Q:", c) for c in ex.continuations]
    np.testing.assert_allclose(out["predictions"][0]["loglikelihoods"], lls, rtol=1e-6)
    assert lls[0] > lls[1] and lls[0] / 2 < lls[1] / 5  # so acc and acc_norm must disagree
    assert (out["acc"], out["acc_norm"]) == (0.0, 100.0)

    table[SPACE, Z] = table[Z, Z] = 8.0  # " zzz" is now certain under both metrics
    runner = ModelRunner(bigram(table), batch_size=4, length_bucket=8)
    ex = mc.Example(["Q:"] * 3, [" a", " zzz", " bbbb"], label=1)
    out = mc.evaluate_choices(runner, TOK, [ex], max_len=32)
    assert (out["acc"], out["acc_norm"]) == (100.0, 100.0)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


RECORDS = {
    "piqa": [{"goal": "Open a jar", "sol1": "twist lid", "sol2": "zzz", "label": 1}],
    "hellaswag": [
        {
            "activity_label": "Cooking",
            "ctx_a": "A man cooks.",
            "ctx_b": "he",
            "endings": ["eats [title] it", "zzz", "runs", "sleeps"],
            "label": 1,
        }
    ],
    "winogrande": [{"sentence": "Tom gave _ a zzz", "option1": "Ann", "option2": "zzz", "answer": "1"}],
    "arc_easy": [
        {
            "question": {
                "stem": "Which?",
                "choices": [{"text": "rock", "label": "A"}, {"text": "zzz", "label": "B"}],
            },
            "answerKey": "B",
        }
    ],
    "arc_challenge": [
        {"question": "Which?", "choices": {"text": ["zzz", "rock"], "label": ["1", "2"]}, "answerKey": "1"}
    ],
    "siqa": [
        {
            "context": "Ann won.",
            "question": "How does Ann feel?",
            "answerA": "sad",
            "answerB": "tired",
            "answerC": "zzz",
            "label": "3",
        }
    ],
    "boolq": [{"question": "is it", "passage": "It is.", "answer": False}],
    "lambada": [{"text": "the cat sat on the zzzz"}],
}


def test_task_formats_prompts_and_a_model_that_is_certain(tmp_path, bigram):
    examples = {t: mc.load_task(t, path=_write(tmp_path / f"{t}.jsonl", r)) for t, r in RECORDS.items()}
    assert examples["piqa"][0].contexts[0] == "Question: Open a jar\nAnswer:"
    assert examples["hellaswag"][0].contexts[0] == "Cooking: A man cooks. He"
    assert examples["hellaswag"][0].continuations[0] == " eats. it"
    wino = examples["winogrande"][0]
    assert wino.contexts == ["Tom gave Ann", "Tom gave zzz"] and wino.continuations == [" a zzz"] * 2
    assert wino.label == 0  # after "zzz" a space is unlikely (z -> z is boosted), after "Ann" it is not
    assert examples["arc_easy"][0].label == 1 and examples["arc_challenge"][0].label == 0
    assert (
        examples["siqa"][0].contexts[0] == "Q: Ann won. How does Ann feel?\nA:"
        and examples["siqa"][0].label == 2
    )
    assert examples["boolq"][0].continuations == [" no", " yes"] and examples["boolq"][0].label == 0
    assert examples["lambada"][0] == ("the cat sat on the", " zzzz")

    table = np.zeros((260, 260), np.float32)
    table[SPACE, Z] = table[Z, Z] = 8.0  # " z..." is the certain continuation everywhere
    table[SPACE, TOK.encode("n")[0]] = 7.0  # boolq: " no" (below " z", so LAMBADA stays greedy)
    table[TOK.encode("e")[0], SPACE] = 8.0  # lambada: "...the" -> " " is the argmax too
    runner = ModelRunner(bigram(table), batch_size=4, length_bucket=16)
    for task in mc.TASKS:
        out = mc.evaluate_task(runner, TOK, task, examples[task], max_len=64)
        assert out["acc"] == 100.0, task
        if task == "lambada":
            logp = _log_softmax(table.astype(np.float64))
            want = logp[TOK.encode("e")[0], SPACE] + logp[SPACE, Z] + 3 * logp[Z, Z]
            assert out["perplexity"] == pytest.approx(math.exp(-want), rel=1e-6)


def test_piqa_and_siqa_label_files_and_bad_records(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}] * 2)
    (tmp_path / "p-labels.lst").write_text("1\n0\n")
    assert [e.label for e in mc.load_task("piqa", path=path, labels_path=str(tmp_path / "p-labels.lst"))] == [
        1,
        0,
    ]
    with pytest.raises(ValueError, match="expected format"):
        mc.load_task("piqa", path=path)  # no labels
    with pytest.raises(ValueError, match="unknown task"):
        mc.load_task("mmlu", path=path)
    with pytest.raises(ValueError, match="no TFDS"):
        mc.load_task("siqa")


def test_tfds_records_are_decoded_like_json():
    rec = {
        "question": b"Which?",
        "choices": {"text": np.array([b"a", b"b"], object), "label": np.array([0, 1])},
        "answerKey": np.int64(1),
    }
    ex = mc.parse_arc(mc._decoded(rec))
    assert (
        ex.contexts[0] == "Question: Which?\nAnswer:" and ex.continuations == [" a", " b"] and ex.label == 1
    )
