"""The tfds source: a tiny builder prepared offline as ArrayRecord, read via tfds.data_source."""

import numpy as np
import pytest

from nl_jax import data
from tests.data import tiny_tfds_builder

TOK = data.ByteTokenizer()
LINES = [f"document {i}: " + "abc " * (i % 13) for i in range(240)]


@pytest.fixture(scope="module")
def tfds_source(tmp_path_factory):
    manual = tmp_path_factory.mktemp("manual")
    (manual / "tiny.txt").write_text("\n".join(LINES) + "\n")
    data_dir = tmp_path_factory.mktemp("tfds")
    tiny_tfds_builder.build(str(data_dir), str(manual))
    return data.TfdsText("tiny_text", str(data_dir))


def test_data_source_reads_prepared_split(tfds_source):
    train, val = tfds_source.data_source("train"), tfds_source.data_source("validation")
    assert len(train) == 180 and len(val) == 60
    texts = {data.sources.record_text(train[i], "text") for i in range(len(train))}
    assert texts == {line for i, line in enumerate(LINES) if i % 4 != 3}


def test_train_windows_and_resume(tfds_source):
    kw = dict(seq_len=32, global_batch_size=4, seed=1)
    it = data.make_train_iterator(tfds_source, TOK, **kw)
    batch = next(it)
    np.testing.assert_array_equal(batch["segment_ids"], data.segment_ids(batch["tokens"], TOK.eos_id))
    first = [batch["tokens"]] + [next(it)["tokens"] for _ in range(3)]
    assert all(b.shape == (4, 33) and b.dtype == np.int32 for b in first)
    state = it.get_state()
    rest = [next(it)["tokens"] for _ in range(6)]
    fresh = data.make_train_iterator(tfds_source, TOK, **kw)
    fresh.set_state(state)
    for r in rest:
        np.testing.assert_array_equal(next(fresh)["tokens"], r)


def test_one_epoch_packs_every_document(tfds_source):
    it = data.make_train_iterator(tfds_source, TOK, seq_len=64, global_batch_size=1, shuffle=False)
    src = tfds_source.data_source("train")
    stream = data.pack_documents(
        [TOK.encode(data.sources.record_text(src[i], "text")) for i in range(len(src))], TOK.eos_id
    )
    expected = data.windows(stream, 64)
    got = np.concatenate([next(it)["tokens"] for _ in range(len(expected))])
    np.testing.assert_array_equal(got, expected)


def test_process_shards_disjoint_and_cover_documents(tfds_source):
    """Streaming sharding is by document: process p packs documents p, p + P, ... of the split."""
    src = tfds_source.data_source("train")
    all_docs = [data.sources.record_text(src[i], "text") for i in range(len(src))]
    per_process = []
    for p in range(2):
        it = data.make_train_iterator(
            tfds_source, TOK, seq_len=16, global_batch_size=2, process_index=p, process_count=2, shuffle=False
        )
        w = np.concatenate([next(it)["tokens"] for _ in range(400)])  # > one epoch of the shard
        stream = np.concatenate([w[0, :1], w[:, 1:].reshape(-1)])
        pieces = np.split(stream, np.flatnonzero(stream == TOK.eos_id) + 1)[:-1]
        per_process.append([TOK.decode(x) for x in pieces][: len(all_docs) // 2])
    assert per_process[0] == all_docs[0::2]
    assert per_process[1] == all_docs[1::2]
    assert not set(per_process[0]) & set(per_process[1])


def test_eval_covers_validation_once(tfds_source):
    batches = list(data.make_eval_iterator(tfds_source, TOK, seq_len=32, global_batch_size=4))
    tokens = np.concatenate([b["tokens"] for b in batches])
    weights = np.concatenate([b["weights"] for b in batches])
    val = tfds_source.data_source("validation")
    stream = data.pack_documents(
        [TOK.encode(data.sources.record_text(val[i], "text")) for i in range(len(val))], TOK.eos_id
    )
    np.testing.assert_array_equal(tokens[:, 1:][weights > 0], stream[1:])


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Cannot open TFDS 'tiny_text'"):
        data.TfdsText("tiny_text", str(tmp_path)).data_source("train")
