"""Weighted mixtures (`data.mixture`): proportions, per-component epochs, exact resume, process split,
validation, config errors."""

import json

import ml_collections
import numpy as np
import pytest

from nl_jax import data
from nl_jax.data import packing
from nl_jax.data.mixture import interleave

TOK = data.ByteTokenizer()
KW = dict(seq_len=16, global_batch_size=8)


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    """A lowercase corpus and a smaller uppercase one: a row's letters tell its component."""
    d = tmp_path_factory.mktemp("mixture")
    rng = np.random.default_rng(0)
    for name, words, n in (
        ("lower", ["alpha", "beta", "gamma"], 200),
        ("upper", ["XI", "OMICRON", "PI"], 30),
    ):
        paras = [" ".join(rng.choice(words, size=int(rng.integers(3, 40)))) for _ in range(n)]
        (d / f"{name}.txt").write_text("\n\n".join(paras) + "\n")
    return d


@pytest.fixture(scope="module")
def mixture(corpus_files):
    lower, upper = (data.TextFiles(str(corpus_files / f"{n}.txt")) for n in ("lower", "upper"))
    return data.Mixture((lower, upper), (3.0, 1.0))


def _component(rows: np.ndarray) -> np.ndarray:
    """0 for rows of the lowercase source, 1 for the uppercase one."""
    upper = (rows >= TOK.encode("A")[0]) & (rows <= TOK.encode("Z")[0])
    return upper.any(axis=-1).astype(int)


def _rows(it, n_batches):
    return np.concatenate([next(it)["tokens"] for _ in range(n_batches)])


def test_rows_follow_the_weights_and_each_component_runs_through_its_windows(mixture):
    upper_windows = packing.windows(data.tokenize_documents(mixture.sources[1], TOK, "train"), 16)
    n_batches = 4 * len(upper_windows) // 8 + 1  # a quarter of the rows: one epoch of the upper source
    rows = _rows(data.make_train_iterator(mixture, TOK, seed=0, **KW), n_batches)
    comp = _component(rows)
    for k in (8, 80, len(rows)):  # every prefix holds a quarter of upper rows, to rounding
        assert abs(comp[:k].sum() - k / 4) <= 1, (k, comp[:k].sum())
    upper = rows[comp == 1][: len(upper_windows)]
    assert sorted(r.tobytes() for r in upper) == sorted(w.tobytes() for w in upper_windows)
    lower_windows = {
        w.tobytes() for w in packing.windows(data.tokenize_documents(mixture.sources[0], TOK, "train"), 16)
    }
    assert all(r.tobytes() in lower_windows for r in rows[comp == 0])
    batch = next(data.make_train_iterator(mixture, TOK, seed=0, **KW))
    np.testing.assert_array_equal(batch["segment_ids"], packing.segment_ids(batch["tokens"], TOK.eos_id))


def test_state_round_trip_continues_identically(mixture):
    it = data.make_train_iterator(mixture, TOK, seed=4, **KW)
    _rows(it, 5)
    state = it.get_state()
    assert state == {"next_index": 5}
    json.dumps(state)  # plain JSON: it goes into checkpoints as is
    expected = _rows(it, 12)
    fresh = data.make_train_iterator(mixture, TOK, seed=4, **KW)
    fresh.set_state(state)
    np.testing.assert_array_equal(_rows(fresh, 12), expected)
    other_seed = _rows(data.make_train_iterator(mixture, TOK, seed=5, **KW), 17)[40:]
    assert not np.array_equal(other_seed, expected)


def test_process_shards_stack_to_single_process_stream(mixture):
    single = [
        next(it)["tokens"] for it in [data.make_train_iterator(mixture, TOK, seed=2, **KW)] for _ in range(5)
    ]
    per_process = [
        data.make_train_iterator(mixture, TOK, seed=2, process_index=p, process_count=2, **KW)
        for p in range(2)
    ]
    for step in range(5):
        parts = [next(it)["tokens"] for it in per_process]
        np.testing.assert_array_equal(np.concatenate(parts), single[step])


def test_validation_scores_every_token_of_every_component_once(mixture):
    batches = list(data.make_eval_iterator(mixture, TOK, **KW))
    tokens = np.concatenate([b["tokens"] for b in batches])
    weights = np.concatenate([b["weights"] for b in batches])
    real = weights.any(axis=1)
    comp = _component(tokens)
    assert abs(comp[:16].sum() - 4) <= 1  # interleaved by weight from the start
    for c, source in enumerate(mixture.sources):
        val = data.tokenize_documents(source, TOK, "validation")
        mine = (comp == c) & real
        np.testing.assert_array_equal(tokens[mine][:, 1:][weights[mine] > 0], val[1:])
    assert list(interleave([iter("aaaaaa"), iter("bb")], [3, 1])) == list("abaaabaa")


def _config(corpus_files, mixture):
    cfg = data.default_data_config()
    cfg.update(dict(seq_len=16, global_batch_size=8, eval_fraction=0.1))
    cfg.mixture = mixture
    return cfg


def test_from_config(corpus_files):
    entries = (
        dict(source="text", path=str(corpus_files / "lower.txt"), weight=3),
        ml_collections.ConfigDict(dict(source="text", path=str(corpus_files / "upper.txt"), weight=1.0)),
    )
    d = data.from_config(_config(corpus_files, entries))
    assert isinstance(d.source, data.Mixture) and d.source.weights == (3.0, 1.0)
    assert [s.eval_fraction for s in d.source.sources] == [0.1, 0.1]  # the section's own field
    assert repr(d.source).startswith("Mixture(3.0: TextFiles(path=")
    assert _component(next(d.train_iterator())["tokens"]).sum() == 2
    assert len(list(d.eval_iterator(max_batches=2))) == 2


@pytest.mark.parametrize(
    "entry,match",
    [
        (
            dict(source="text", path="x", weight=1, shuffle=False),
            r"data.mixture\[1\] has unknown fields \['shuffle'\]",
        ),
        (dict(source="text", path="x"), r"data.mixture\[1\] has no weight"),
        (dict(source="text", path="x", weight=0), "weights must be > 0"),
        (dict(source="tfds", tfds_name="c4", weight=1), "random-access sources"),
        ("text:x", r"data.mixture\[1\] must be a dict"),
    ],
)
def test_bad_mixture_entries_are_named(corpus_files, entry, match):
    first = dict(source="text", path=str(corpus_files / "lower.txt"), weight=1)
    with pytest.raises(ValueError, match=match):
        data.from_config(_config(corpus_files, (first, entry)))
