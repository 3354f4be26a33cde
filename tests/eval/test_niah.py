"""NIAH: exact lengths and needle positions, grading, greedy decoding, the heatmap."""

import os

import numpy as np
import pytest

from nl_jax.data import ByteTokenizer
from nl_jax.eval import niah
from nl_jax.eval.runner import ModelRunner

TOK = ByteTokenizer()
HAYSTACK = "Alpha beta gamma. Delta epsilon! Zeta eta theta? Iota kappa lambda.\nMu nu xi omicron."


@pytest.mark.parametrize("task", niah.TASKS)
@pytest.mark.parametrize("length", [700, 1500])
def test_prompt_length_and_needle_positions_are_exact(task, length):
    for depth in (0.0, 0.3, 0.5, 1.0):
        s = niah.make_sample(task, TOK, length, depth, seed=1, haystack_text=HAYSTACK, snap_to_sentence=False)
        assert s.tokens.shape == (length,)
        for pos, needle in zip(s.needle_positions, s.needle_tokens):
            np.testing.assert_array_equal(s.tokens[pos : pos + len(needle)], needle)
        # the first needle starts exactly round(depth * H) haystack tokens after the prefix
        prefix = len(TOK.encode(TOK.decode(s.tokens).split("\n")[0] + "\n"))
        before = sum(
            len(n) for p, n in zip(s.needle_positions[1:], s.needle_tokens[1:]) if p < s.needle_positions[0]
        )
        hay = length - prefix - sum(len(n) for n in s.needle_tokens) - len(TOK.encode(_question(s)))
        assert s.needle_positions[0] - prefix - before == round(depth * hay)
        assert s.needle_depths[0] == pytest.approx(round(depth * hay) / hay)
        for a in s.answers:  # every expected value is in the prompt, inside a needle
            assert any(a in TOK.decode(n) for n in s.needle_tokens)
    assert len(s.answers) == {"mq_niah": 4, "mv_niah": 4}.get(task, 1)


def _question(s):
    text = TOK.decode(s.tokens)
    return text[text.rindex("\n") :]


def test_snapping_puts_the_needle_at_a_sentence_start():
    s = niah.make_sample("s_niah_2", TOK, 900, 0.4, haystack_text=HAYSTACK)
    text = TOK.decode(s.tokens[: s.needle_positions[0]])
    assert text.endswith((".", "!", "?")) and abs(s.needle_depths[0] - 0.4) < 0.05


def test_needles_are_recoverable_and_errors_are_named():
    s = niah.make_sample("s_niah_1", TOK, 400, 0.5)
    assert f"The pass key is {s.answers[0]}." in TOK.decode(s.tokens)
    with pytest.raises(ValueError, match="too short"):
        niah.make_sample("mq_niah", TOK, 100, 0.5, haystack_text=HAYSTACK)
    with pytest.raises(ValueError, match="haystack"):
        niah.make_sample("s_niah_3", TOK, 1000, 0.5)
    with pytest.raises(ValueError, match="unknown NIAH task"):
        niah.make_sample("niah", TOK, 1000, 0.5)


def test_grading_right_wrong_partial():
    assert niah.grade(" 1234567.", ["1234567"]) == 1.0
    assert niah.grade(" 1234568.", ["1234567"]) == 0.0
    assert niah.grade(" 11, 22 and 44", ["11", "22", "33", "44"]) == 0.75
    assert niah.grade("ABC-def", ["abc-DEF"]) == 1.0
    ids = np.concatenate([TOK.encode(" 42"), [TOK.eos_id], TOK.encode("99")])
    assert niah.decode_until_eos(TOK, ids) == " 42"


def test_greedy_decoding_by_state_equals_by_full_forward(tiny_transformer):
    runner = ModelRunner(tiny_transformer, batch_size=2, length_bucket=32)
    prompts = np.stack([TOK.encode("def add(a, b):\n    re"), TOK.encode("import numpy as np\nim")])
    by_state = runner.generate(prompts, 6)
    assert by_state.shape == (2, 6)
    np.testing.assert_array_equal(by_state, runner._generate_by_forward(prompts, 6))


def test_evaluate_and_heatmap(tmp_path, bigram):
    # A bigram model that always continues with " 1234567." is right exactly when that is the value.
    table = np.full((260, 260), -5.0, np.float32)
    chain = TOK.encode(" 1234567.")
    for a, b in zip(chain[:-1], chain[1:]):
        table[a, b] = 5.0
    table[TOK.encode("s")[0], chain[0]] = 5.0  # the prompt ends with "...is" / "...are"
    table[TOK.encode("e")[0], chain[0]] = 5.0
    table[chain[-1], TOK.eos_id] = 5.0
    runner = ModelRunner(bigram(table), batch_size=4, length_bucket=64)
    out = niah.evaluate_niah(
        runner,
        TOK,
        tasks=("s_niah_1", "mv_niah"),
        lengths=(700, 900),
        depths=(0.0, 1.0),
        num_samples=2,
        haystack_text=HAYSTACK,
    )
    for sample in out["samples"]:
        assert sample["output"] == " 1234567."
        assert sample["score"] == niah.grade(" 1234567.", sample["answers"])
    assert set(out["accuracy"]) == {"s_niah_1", "mv_niah"}
    assert set(out["accuracy"]["mv_niah"]) == {"700", "900"}
    paths = niah.plot_heatmaps(out, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["niah_s_niah_1.png", "niah_mv_niah.png"]
    assert all(open(p, "rb").read(4) == b"\x89PNG" for p in paths)
