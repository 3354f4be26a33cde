"""Train/eval iterators: batches, shuffling, per-process sharding, checkpointed state."""

import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from nl_jax import data
from nl_jax.data import packing, pipeline

TOK = data.ByteTokenizer()


@pytest.fixture(scope="module")
def text_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("txt") / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    paras = [" ".join(rng.choice(words, size=int(rng.integers(3, 60)))) for _ in range(300)]
    path.write_text("\n\n".join(paras) + "\n")
    return data.TextFiles(str(path))


def _take(it, n):
    return [next(it)["tokens"] for _ in range(n)]


def test_batches_shape_dtype_and_content(text_source):
    it = data.make_train_iterator(text_source, TOK, seq_len=16, global_batch_size=4, seed=3)
    b = next(it)
    assert (
        set(b) == {"tokens", "segment_ids"} and b["tokens"].shape == (4, 17) and b["tokens"].dtype == np.int32
    )
    all_windows = {
        w.tobytes() for w in packing.windows(data.tokenize_documents(text_source, TOK, "train"), 16)
    }
    assert all(row.tobytes() in all_windows for row in b["tokens"])
    assert b["segment_ids"].dtype == np.int32
    np.testing.assert_array_equal(b["segment_ids"], packing.segment_ids(b["tokens"], TOK.eos_id))


def test_epoch_is_a_permutation_and_reshuffled(text_source):
    stream = data.tokenize_documents(text_source, TOK, "train")
    n = packing.num_windows(len(stream), 32)
    it = data.make_train_iterator(text_source, TOK, seq_len=32, global_batch_size=1, seed=0)
    epoch1 = np.concatenate(_take(it, n))
    epoch2 = np.concatenate(_take(it, n))
    expected = sorted(w.tobytes() for w in packing.windows(stream, 32))
    assert sorted(w.tobytes() for w in epoch1) == expected == sorted(w.tobytes() for w in epoch2)
    assert not np.array_equal(epoch1, epoch2)  # each epoch has its own order
    ordered = data.make_train_iterator(text_source, TOK, seq_len=32, global_batch_size=1, shuffle=False)
    np.testing.assert_array_equal(np.concatenate(_take(ordered, n)), packing.windows(stream, 32))


def test_seed_changes_order_deterministically(text_source):
    kw = dict(seq_len=16, global_batch_size=4)
    a = _take(data.make_train_iterator(text_source, TOK, seed=1, **kw), 3)
    b = _take(data.make_train_iterator(text_source, TOK, seed=1, **kw), 3)
    c = _take(data.make_train_iterator(text_source, TOK, seed=2, **kw), 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_stack_to_single_process_stream(text_source, process_count):
    kw = dict(seq_len=16, global_batch_size=8, seed=5)
    single = _take(data.make_train_iterator(text_source, TOK, **kw), 6)
    per_process = [
        _take(
            data.make_train_iterator(text_source, TOK, process_index=p, process_count=process_count, **kw), 6
        )
        for p in range(process_count)
    ]
    for step in range(6):
        parts = [per_process[p][step] for p in range(process_count)]
        assert all(x.shape == (8 // process_count, 17) for x in parts)
        np.testing.assert_array_equal(np.concatenate(parts), single[step])


def test_state_round_trip_continues_identically(text_source):
    kw = dict(seq_len=16, global_batch_size=4, seed=7)
    it = data.make_train_iterator(text_source, TOK, **kw)
    _take(it, 5)
    state = it.get_state()
    assert state == {"next_index": 5}
    json.dumps(state)  # plain JSON: it goes into checkpoints as is
    expected = _take(it, 10)
    fresh = data.make_train_iterator(text_source, TOK, **kw)
    fresh.set_state(state)
    assert all(np.array_equal(x, y) for x, y in zip(_take(fresh, 10), expected))


def test_orbax_checkpoint_manager_round_trip(text_source, tmp_path):
    kw = dict(seq_len=16, global_batch_size=4, seed=11)
    it = data.make_train_iterator(text_source, TOK, **kw)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _take(it, 8)
    fresh = data.make_train_iterator(text_source, TOK, **kw)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        assert mngr.latest_step() == 3
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert all(np.array_equal(x, y) for x, y in zip(_take(fresh, 8), expected))


def test_eval_iterator_finite_deterministic_and_exact(text_source):
    val = data.tokenize_documents(text_source, TOK, "validation")
    kw = dict(seq_len=16, global_batch_size=4)
    batches = list(data.make_eval_iterator(text_source, TOK, **kw))
    again = list(data.make_eval_iterator(text_source, TOK, **kw))
    assert len(batches) == len(again) > 1
    assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(batches, again))
    weights = np.concatenate([b["weights"] for b in batches])
    tokens = np.concatenate([b["tokens"] for b in batches])
    assert weights.shape == (tokens.shape[0], 16) and weights.sum() == len(val) - 1
    targets = tokens[:, 1:][weights > 0]
    np.testing.assert_array_equal(targets, val[1:])  # every target once, in order
    for b in batches:
        np.testing.assert_array_equal(b["segment_ids"], packing.segment_ids(b["tokens"], TOK.eos_id))
    assert len(list(data.make_eval_iterator(text_source, TOK, max_batches=2, **kw))) == 2


def test_eval_sharded_same_batch_count(text_source):
    kw = dict(seq_len=16, global_batch_size=4)
    single = list(data.make_eval_iterator(text_source, TOK, **kw))
    halves = [
        list(data.make_eval_iterator(text_source, TOK, process_index=p, process_count=2, **kw))
        for p in range(2)
    ]
    assert len(halves[0]) == len(halves[1]) == len(single)
    for s, a, b in zip(single, *halves):
        np.testing.assert_array_equal(np.concatenate([a["tokens"], b["tokens"]]), s["tokens"])
        np.testing.assert_array_equal(np.concatenate([a["weights"], b["weights"]]), s["weights"])


def test_embedded_default_trains_and_evaluates():
    src = data.EmbeddedCorpus()
    it = data.make_train_iterator(src, TOK, seq_len=64, global_batch_size=8)
    b = next(it)["tokens"]
    assert b.shape == (8, 65) and b.max() < TOK.vocab_size
    ev = next(data.make_eval_iterator(src, TOK, seq_len=64, global_batch_size=8))
    assert ev["tokens"].shape == (8, 65) and ev["weights"].all()


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(seq_len=0, global_batch_size=4), "seq_len"),
        (dict(seq_len=8, global_batch_size=0), "global_batch_size"),
        (dict(seq_len=8, global_batch_size=6, process_count=4), "divisible"),
        (dict(seq_len=8, global_batch_size=4, process_index=2, process_count=2), "process_index"),
        (dict(seq_len=8, global_batch_size=4, vocab_size=256), "vocab size mismatch"),
        (dict(seq_len=100_000, global_batch_size=4), "Corpus too small"),
    ],
)
def test_bad_arguments(text_source, kw, match):
    with pytest.raises(ValueError, match=match):
        data.make_train_iterator(text_source, TOK, **kw)


def test_text_and_jsonl_sources(tmp_path):
    docs = [f"document {i} " + "x" * i for i in range(200)]
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n"
    )
    (tmp_path / "a.txt").write_text("\n\n\n".join(docs))
    jsonl = data.JsonlFiles(str(tmp_path / "a.jsonl"))
    text = data.TextFiles(str(tmp_path))  # a directory: its *.txt files
    for split in ("train", "validation"):
        assert jsonl.documents(split) == text.documents(split)
    train, val = set(jsonl.documents("train")), set(jsonl.documents("validation"))
    assert train | val == set(docs) and not train & val and 0 < len(val) < 40
    separate = data.TextFiles(str(tmp_path / "a.txt"), eval_path=str(tmp_path / "a.txt"))
    assert separate.documents("validation") == separate.documents("train") == docs


def test_empty_inputs_name_the_path(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(ValueError, match="empty.txt"):
        data.make_train_iterator(data.TextFiles(str(empty)), TOK, seq_len=8, global_batch_size=2)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n")
    with pytest.raises(ValueError, match="blank.jsonl"):
        data.JsonlFiles(str(blank)).documents("train")
    only_empty_text = tmp_path / "e.jsonl"
    only_empty_text.write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="Empty corpus.*e.jsonl"):
        data.JsonlFiles(str(only_empty_text)).documents("train")
    with pytest.raises(ValueError, match="No input files"):
        data.TextFiles(str(tmp_path / "*.md")).documents("train")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        data.TextFiles(str(tmp_path / "missing.txt")).documents("train")


def test_bad_jsonl_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2.*'text'"):
        data.JsonlFiles(str(path)).documents("train")


def test_files_that_are_not_utf8_text_are_refused_naming_them(tmp_path):
    program = tmp_path / "program.txt"
    program.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    for source, match in (
        (data.TextFiles(str(program)), r"program.txt is not text \(a NUL byte at offset 7"),
        (data.TextFiles(str(tmp_path)), r"program.txt is not text"),  # a directory's *.txt
        (data.JsonlFiles(str(latin1)), r"latin1.jsonl is not UTF-8 text"),
    ):
        with pytest.raises(ValueError, match=match + ".*decode_errors=replace"):
            source.documents("train")
    # Allowed, the bad bytes read as U+FFFD; only then is the setting part of the source's repr.
    replaced = data.JsonlFiles(str(latin1), eval_fraction=0.0, decode_errors="replace")
    assert replaced.documents("train") == ["caf\ufffd"]
    assert "decode_errors='replace'" in repr(replaced) and "decode_errors" not in repr(data.JsonlFiles("x"))
    assert data.TextFiles(str(program), eval_fraction=0.0, decode_errors="replace").documents("train")
    with pytest.raises(ValueError, match="decode_errors must be one of"):
        data.TextFiles(str(program), decode_errors="ignore")


def test_tokenization_is_cached(text_source):
    pipeline.clear_cache()
    a = data.tokenize_documents(text_source, TOK, "train")
    assert data.tokenize_documents(text_source, TOK, "train") is a


def test_aligned_batches_carry_weights_and_resume(text_source):
    """data.document_alignment: rows of the aligned stream, pads weighing 0 in training and eval,
    the iterator state as small and exact as without it."""
    kw = dict(seq_len=16, global_batch_size=4, seed=5, document_alignment=8)
    it = data.make_train_iterator(text_source, TOK, **kw)
    b = next(it)
    assert set(b) == {"tokens", "segment_ids", "weights"} and b["weights"].shape == (4, 16)
    aligned = data.tokenize_documents(text_source, TOK, "train", 8)
    assert len(aligned) > len(data.tokenize_documents(text_source, TOK, "train"))  # pads were added
    windows = {w.tobytes() for w in packing.windows(aligned, 16)}
    assert all(row.tobytes() in windows for row in b["tokens"])
    np.testing.assert_array_equal(b["weights"] == 0, b["tokens"][:, 1:] == TOK.pad_id)
    expected = packing.aligned_segment_ids(b["tokens"], TOK.eos_id, TOK.pad_id)
    np.testing.assert_array_equal(b["segment_ids"], expected)
    seg = packing.aligned_segment_ids(packing.windows(aligned, 16), TOK.eos_id, TOK.pad_id)[:, :-1]
    rows, cols = np.nonzero(seg[:, 1:] != seg[:, :-1])
    assert len(cols) and ((cols + 1) % 8 == 0).all()  # documents start on the grid of 8
    _take(it, 3)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    fresh = data.make_train_iterator(text_source, TOK, **kw)
    fresh.set_state(state)
    for x, y in zip([next(fresh) for _ in range(4)], expected):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    evals = data.make_eval_iterator(text_source, TOK, seq_len=16, global_batch_size=4, document_alignment=8)
    ev = next(evals)
    np.testing.assert_array_equal(ev["weights"] == 0, ev["tokens"][:, 1:] == TOK.pad_id)


def test_alignment_is_refused_where_it_cannot_apply(text_source):
    with pytest.raises(ValueError, match="data.document_alignment=6 must divide data.seq_len=16"):
        data.make_train_iterator(text_source, TOK, seq_len=16, global_batch_size=4, document_alignment=6)
