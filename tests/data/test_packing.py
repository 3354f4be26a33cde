"""Packing is exact: every token but the first is a target exactly once, in order."""

import grain
import numpy as np
import pytest

from nl_jax.data import packing

EOS = 2


def _docs(rng, n=13):
    return [rng.integers(3, 50, size=int(rng.integers(0, 40))).astype(np.int32) for _ in range(n)]


def test_pack_documents_exact():
    rng = np.random.default_rng(0)
    docs = _docs(rng)
    stream = packing.pack_documents(docs, EOS)
    nonempty = [d for d in docs if len(d)]
    assert len(stream) == sum(len(d) + 1 for d in nonempty)
    assert (stream == EOS).sum() == len(nonempty)
    pieces = np.split(stream, np.flatnonzero(stream == EOS) + 1)[:-1]
    for doc, piece in zip(nonempty, pieces):
        np.testing.assert_array_equal(piece, np.concatenate([doc, [EOS]]))


@pytest.mark.parametrize("seq_len,n", [(1, 10), (4, 9), (4, 10), (4, 13), (7, 100), (128, 100)])
def test_windows_cover_stream_once(seq_len, n):
    stream = np.arange(n, dtype=np.int32)
    w = packing.windows(stream, seq_len)
    assert w.shape == (packing.num_windows(n, seq_len), seq_len + 1)
    assert len(w) == max(0, (n - 1) // seq_len)
    targets = w[:, 1:].reshape(-1)
    inputs = w[:, :-1].reshape(-1)
    np.testing.assert_array_equal(targets, stream[1 : 1 + len(targets)])  # no gap, no duplicate
    np.testing.assert_array_equal(inputs, stream[: len(inputs)])
    assert n - 1 - len(targets) < seq_len  # only the tail that does not fill a window is dropped


@pytest.mark.parametrize("seq_len", [1, 5, 16])
def test_segment_ids_number_the_documents_of_each_window(seq_len):
    rng = np.random.default_rng(3)
    docs = [d for d in _docs(rng, 30) if len(d)]
    stream = packing.pack_documents(docs, EOS)
    doc_of = np.repeat(np.arange(len(docs)), [len(d) + 1 for d in docs])  # EOS ends its own document
    w = packing.windows(stream, seq_len)
    starts = np.arange(len(w)) * seq_len
    expected = doc_of[starts[:, None] + np.arange(seq_len + 1)] - doc_of[starts][:, None]
    got = packing.segment_ids(w, EOS)
    assert got.dtype == np.int32 and got.shape == w.shape
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(
        packing.segment_ids(np.array([7, EOS, 8, 9, EOS, 4]), EOS), [0, 0, 1, 1, 1, 2]
    )


def test_eval_windows_include_the_tail():
    rng = np.random.default_rng(1)
    docs = _docs(rng)
    stream = packing.pack_documents(docs, EOS)
    out = list(packing.iter_eval_windows(docs, 8, EOS))
    full = packing.windows(stream, 8)
    for i, row in enumerate(full):
        np.testing.assert_array_equal(out[i][0], row)
        assert out[i][1] == 9
    tail, n_valid = out[-1]
    assert len(out) == len(full) + 1 and n_valid < 9
    np.testing.assert_array_equal(tail[:n_valid], stream[len(full) * 8 :])
    assert sum(v - 1 for _, v in out) == len(stream) - 1  # every target once


def test_pack_iter_dataset_matches_windows_and_resumes():
    rng = np.random.default_rng(2)
    docs = _docs(rng, 40)
    expected = packing.windows(packing.pack_documents(docs, EOS), 6)
    ds = packing.PackWindowsIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), 6, EOS)
    got = np.stack(list(ds))
    np.testing.assert_array_equal(got, expected)
    for k in (0, 1, 7, len(expected) - 1):
        it = iter(ds)
        for _ in range(k):
            next(it)
        state = it.get_state()
        rest = list(it)
        it2 = iter(ds)
        it2.set_state(state)
        np.testing.assert_array_equal(np.stack(list(it2)), np.stack(rest))


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_seq_len(bad):
    with pytest.raises(ValueError, match="seq_len"):
        packing.num_windows(100, bad)
    with pytest.raises(ValueError, match="seq_len"):
        packing.PackWindowsIterDataset(grain.MapDataset.range(3).to_iter_dataset(), bad, EOS)


PAD = 0


def _aligned_stream_checks(stream, docs, alignment):
    """Every document starts at a multiple of `alignment`, followed by EOS and pads only."""
    pos = 0
    for doc in docs:
        assert pos % alignment == 0
        np.testing.assert_array_equal(stream[pos : pos + len(doc) + 1], np.concatenate([doc, [EOS]]))
        end = -(-(pos + len(doc) + 1) // alignment) * alignment
        assert (stream[pos + len(doc) + 1 : end] == PAD).all()
        pos = end
    assert pos == len(stream)


@pytest.mark.parametrize("alignment", [2, 4, 8])
def test_aligned_layout_starts_documents_on_the_grid(alignment):
    rng = np.random.default_rng(alignment)
    docs = [d for d in _docs(rng, 30) if len(d)]
    stream = packing.pack_documents(docs, EOS, alignment, PAD)
    _aligned_stream_checks(stream, docs, alignment)
    seq_len = 2 * alignment
    w = packing.windows(stream, seq_len)
    seg = packing.aligned_segment_ids(w, EOS, PAD)
    weights = packing.target_weights(w, PAD)
    for row, ids in zip(w, seg):
        inputs = ids[:-1]
        starts = np.flatnonzero(inputs[1:] != inputs[:-1]) + 1
        assert (starts % alignment == 0).all()  # every segment, pads included, starts on the grid
        real = row[starts] != PAD
        assert real.all()  # and each new one is a document's first token
    assert weights.shape == (len(w), seq_len)
    np.testing.assert_array_equal(weights == 0, w[:, 1:] == PAD)
    # per window: leading pads take id 0 and the document after them 1; trailing pads their document's
    np.testing.assert_array_equal(
        packing.aligned_segment_ids(np.array([PAD, PAD, 5, EOS, PAD, PAD, 7, 8]), EOS, PAD),
        [0, 0, 1, 1, 1, 1, 2, 2],
    )
    np.testing.assert_array_equal(
        packing.aligned_segment_ids(np.array([EOS, PAD, 5, 6]), EOS, PAD), [0, 0, 1, 1]
    )


def test_aligned_pack_iter_dataset_matches_windows_and_resumes():
    rng = np.random.default_rng(5)
    docs = _docs(rng, 40)
    expected = packing.windows(packing.pack_documents(docs, EOS, 4, PAD), 8)
    ds = packing.PackWindowsIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), 8, EOS, 4, PAD)
    got = np.stack(list(ds))
    np.testing.assert_array_equal(got, expected)
    for k in (0, 3, len(expected) - 1):
        it = iter(ds)
        for _ in range(k):
            next(it)
        state = it.get_state()
        rest = list(it)
        it2 = iter(ds)
        it2.set_state(state)
        np.testing.assert_array_equal(np.stack(list(it2)), np.stack(rest))
    eval_windows = list(packing.iter_eval_windows(docs, 8, EOS, 4, PAD))
    np.testing.assert_array_equal(np.stack([w for w, _ in eval_windows[: len(expected)]]), expected)


@pytest.mark.parametrize("alignment,match", [(-1, "integer >= 0"), (3, "must divide data.seq_len=8")])
def test_bad_alignment(alignment, match):
    with pytest.raises(ValueError, match=match):
        packing.PackWindowsIterDataset(grain.MapDataset.range(3).to_iter_dataset(), 8, EOS, alignment, PAD)


def test_alignment_off_is_the_plain_layout():
    rng = np.random.default_rng(6)
    docs = _docs(rng)
    for off in (0, 1):
        plain = packing.pack_documents(docs, EOS)
        np.testing.assert_array_equal(packing.pack_documents(docs, EOS, off, PAD), plain)
