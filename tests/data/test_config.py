"""The config adapter the trainer uses, and the train_tokenizer command."""

import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from nl_jax import data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cfg(**overrides):
    cfg = data.default_data_config()
    cfg.update({"seq_len": 32, "global_batch_size": 4, **overrides})
    return cfg


def test_defaults_train_on_embedded_with_no_flags():
    cfg = data.default_data_config()
    assert isinstance(cfg, ml_collections.ConfigDict)
    assert cfg.source == "embedded" and cfg.tokenizer == "byte"
    d = data.from_config(cfg)
    assert (d.process_index, d.process_count) == (0, 1)  # from jax
    assert d.vocab_size == 259
    batch = next(d.train_iterator())
    assert batch["tokens"].shape == (cfg.global_batch_size, cfg.seq_len + 1)
    ev = list(d.eval_iterator(max_batches=3))
    assert len(ev) == 3 and ev[0]["weights"].shape == (cfg.global_batch_size, cfg.seq_len)


def test_process_split_from_config():
    single = next(data.from_config(_cfg()).train_iterator())["tokens"]
    parts = [
        next(data.from_config(_cfg(), process_index=p, process_count=2).train_iterator())["tokens"]
        for p in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate(parts), single)


def test_text_source_from_config(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"para {i} " * 20 for i in range(100)))
    d = data.from_config(_cfg(source="text", path=str(tmp_path / "*.txt"), eval_max_batches=2))
    assert isinstance(d.source, data.TextFiles)
    assert next(d.train_iterator())["tokens"].shape == (4, 33)
    assert len(list(d.eval_iterator())) <= 2


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(source="parquet"), ValueError, "Unknown data.source 'parquet'"),
        (dict(vocab_size=128), ValueError, "vocab size mismatch"),
        (dict(source="text", path=""), ValueError, "data path is empty"),
        (dict(source="array_record", path=""), ValueError, "array_record"),
        (dict(source="tfds", tfds_name=""), ValueError, "tfds_name"),
        (dict(seq_len=0), ValueError, "seq_len"),
        (dict(global_batch_size=3), ValueError, "divisible"),
        (dict(tokenizer="/nonexistent/spm.model"), FileNotFoundError, "spm.model"),
    ],
)
def test_bad_config(overrides, error, match):
    with pytest.raises(error, match=match):
        d = data.from_config(_cfg(**overrides), process_index=0, process_count=2)
        next(d.train_iterator())


@pytest.mark.e2e
def test_train_tokenizer_command_and_use(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"The quick brown fox {i} jumps over the lazy dog." for i in range(400)))
    prefix = tmp_path / "spm"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.train_tokenizer",
            f"--input={text}",
            f"--model_prefix={prefix}",
            "--vocab_size=320",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    model = str(prefix) + ".model"
    d = data.from_config(_cfg(source="text", path=str(text), tokenizer=model, vocab_size=512))
    assert d.vocab_size <= 320
    batch = next(d.train_iterator())["tokens"]
    assert batch.max() < d.vocab_size
    assert "quick brown fox" in d.tokenizer.decode(batch[0])
    with pytest.raises(ValueError, match="vocab size mismatch"):
        data.from_config(_cfg(source="text", path=str(text), tokenizer=model, vocab_size=256))
    with pytest.raises(ValueError, match="vocab size mismatch"):
        data.from_config(_cfg(tokenizer=model), vocab_size=128)
