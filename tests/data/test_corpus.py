"""The embedded stdlib corpus: real text, deterministic, split by file."""

import os

import pytest

from nl_jax.data import corpus


def test_nonempty_and_sized():
    info = corpus.describe()
    assert info["train"]["files"] > 50 and info["validation"]["files"] > 3
    assert 1_000_000 < info["train"]["bytes"] + info["validation"]["bytes"] <= corpus.DEFAULT_MAX_BYTES
    assert info["validation"]["bytes"] > 50_000


def test_deterministic_across_instances():
    corpus.list_files.cache_clear()
    a = corpus.EmbeddedCorpus().files("train")
    corpus.list_files.cache_clear()
    b = corpus.EmbeddedCorpus().files("train")
    assert a == b
    assert corpus.EmbeddedCorpus().documents("validation") == corpus.EmbeddedCorpus().documents("validation")


def test_splits_disjoint_by_file_and_exclude_tests():
    c = corpus.EmbeddedCorpus()
    train, val = set(c.files("train")), set(c.files("validation"))
    assert train and val and not train & val
    assert train | val == set(corpus.list_files(c.root, c.max_bytes))
    for rel in train | val:
        parts = rel.split("/")
        assert rel.endswith(".py") and "site-packages" not in parts
        assert not any(p.startswith("test") for p in parts)


def test_cap_respected():
    small = corpus.EmbeddedCorpus(max_bytes=100_000)
    files = small.files("train") + small.files("validation")
    sizes = [os.path.getsize(os.path.join(small.root, f)) for f in files]
    assert files and sum(sizes) <= 100_000
    assert set(files) < set(corpus.list_files(small.root))  # a prefix of the same order


def test_empty_root_names_the_path(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        corpus.EmbeddedCorpus(root=str(tmp_path)).documents("train")


def test_unknown_split():
    with pytest.raises(ValueError, match="Unknown split"):
        corpus.EmbeddedCorpus().files("dev2")
