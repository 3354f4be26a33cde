"""prepare_data -> ArrayRecord shards -> the array_record source reads the same tokens back."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import prepare_data
from nl_jax import data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def jsonl_input(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "docs.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(400):
            text = f"doc {i}: " + "".join(rng.choice(list("abcdefgh é\n"), size=int(rng.integers(1, 90))))
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)


@pytest.mark.parametrize("num_shards,block_len", [(1, 8192), (3, 50), (4, 7)])
def test_shards_read_back_exactly(jsonl_input, tmp_path, num_shards, block_len):
    out = str(tmp_path / "shards")
    meta = prepare_data.prepare(jsonl_input, out, "byte", "jsonl", num_shards=num_shards, block_len=block_len)
    assert meta["vocab_size"] == 259 and meta["tokenizer"] == "ByteTokenizer()"
    assert meta["dtype"] == "uint16"
    files = sorted(f for f in os.listdir(out) if f.endswith(".array_record"))
    assert len(files) == 2 * num_shards
    src = data.ArrayRecordShards(out)
    reference = data.JsonlFiles(jsonl_input)
    for split in ("train", "validation"):
        expected = data.tokenize_documents(reference, data.ByteTokenizer(), split)
        store = src.tokens(split)
        assert len(store) == len(expected) == meta["splits"][split]["num_tokens"]
        np.testing.assert_array_equal(store.read(0, len(store)), expected)
        rng = np.random.default_rng(num_shards)
        for _ in range(20):  # random windows crossing block and shard boundaries
            a = int(rng.integers(0, len(store)))
            b = int(rng.integers(a, min(len(store), a + 3 * block_len) + 1))
            np.testing.assert_array_equal(store.read(a, b), expected[a:b])


def test_array_record_batches_equal_in_memory_batches(jsonl_input, tmp_path):
    out = str(tmp_path / "shards")
    prepare_data.prepare(jsonl_input, out, "byte", "jsonl", num_shards=2, block_len=100)
    kw = dict(seq_len=32, global_batch_size=4, seed=3)
    on_disk = data.make_train_iterator(data.ArrayRecordShards(out), data.ByteTokenizer(), **kw)
    in_mem = data.make_train_iterator(data.JsonlFiles(jsonl_input), data.ByteTokenizer(), **kw)
    for _ in range(5):
        np.testing.assert_array_equal(next(on_disk)["tokens"], next(in_mem)["tokens"])
    state = on_disk.get_state()
    rest = [next(on_disk)["tokens"] for _ in range(3)]
    fresh = data.make_train_iterator(data.ArrayRecordShards(out), data.ByteTokenizer(), **kw)
    fresh.set_state(state)
    for r in rest:
        np.testing.assert_array_equal(next(fresh)["tokens"], r)


def test_tokenizer_mismatch_is_rejected(jsonl_input, tmp_path, monkeypatch):
    out = str(tmp_path / "shards")
    prepare_data.prepare(jsonl_input, out, "byte", "jsonl")
    meta_path = os.path.join(out, "metadata.json")
    meta = json.load(open(meta_path))
    meta["tokenizer"], meta["vocab_size"] = "SentencePieceTokenizer(sha1=0, vocab_size=512)", 512
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ValueError, match="Tokenizer mismatch"):
        data.make_train_iterator(
            data.ArrayRecordShards(out), data.ByteTokenizer(), seq_len=8, global_batch_size=2
        )


def test_not_a_shard_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        data.ArrayRecordShards(str(tmp_path))


def test_empty_input_names_path(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        prepare_data.prepare(str(empty), str(tmp_path / "out"))


@pytest.mark.e2e
def test_command_line(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text("\n\n".join(f"Paragraph {i}. " * (1 + i % 5) for i in range(300)))
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.prepare_data",
            f"--input={src}",
            f"--output_dir={out}",
            "--num_shards=2",
            "--format=text",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "train:" in proc.stdout
    store = data.ArrayRecordShards(str(out)).tokens("train")
    expected = data.tokenize_documents(data.TextFiles(str(src)), data.ByteTokenizer(), "train")
    np.testing.assert_array_equal(store.read(0, len(store)), expected)


def test_alignment_on_shards_is_refused_naming_the_fix(jsonl_input, tmp_path):
    """ArrayRecord shards hold prepare_data's unaligned stream: data.document_alignment is refused."""
    out = str(tmp_path / "shards")
    prepare_data.prepare(jsonl_input, out, "byte", "jsonl", num_shards=1, block_len=100)
    match = "data.document_alignment=8 needs documents packed on the fly"
    with pytest.raises(ValueError, match=match):
        kw = dict(seq_len=32, global_batch_size=4, document_alignment=8)
        data.make_train_iterator(data.ArrayRecordShards(out), data.ByteTokenizer(), **kw)
    cfg = data.default_data_config()
    cfg.update(source="array_record", path=out, seq_len=32, document_alignment=8)
    with pytest.raises(ValueError, match=match):
        data.from_config(cfg, process_index=0, process_count=1)
