"""Byte and SentencePiece tokenizers, offline training, vocab checks."""

import pickle

import numpy as np
import pytest

from nl_jax.data import tokenizers

TEXT = "def f(x):\n\treturn x  +  1  # héllo, 日本語 🙂\n\n  trailing  "


def test_byte_round_trip_and_ids():
    tok = tokenizers.ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int32 and len(ids) == len(TEXT.encode("utf-8"))
    assert ids.min() >= tok.byte_offset and ids.max() < tok.vocab_size == 259
    assert tok.decode(ids) == TEXT
    with_specials = np.concatenate([[tok.bos_id], ids, [tok.eos_id, tok.pad_id, tok.pad_id]])
    assert tok.decode(with_specials) == TEXT
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3 and tok.pad_id == 0


def test_byte_all_bytes():
    tok = tokenizers.ByteTokenizer()
    raw = bytes(range(256))
    ids = tok.encode(raw.decode("latin-1"))
    assert tok.decode(ids) == raw.decode("latin-1")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    text = open(tokenizers.__file__, encoding="utf-8").read()
    prefix = str(tmp_path_factory.mktemp("spm") / "tiny")
    return tokenizers.train_sentencepiece([text, TEXT], prefix, vocab_size=400)


def test_sentencepiece_trains_offline_and_round_trips(spm_model):
    tok = tokenizers.SentencePieceTokenizer(spm_model)
    assert 300 <= tok.vocab_size <= 400
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int32 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == TEXT
    source = open(tokenizers.__file__, encoding="utf-8").read()
    encoded = tok.encode(source)
    assert len(encoded) < 0.8 * len(source.encode())  # it learned merges, not just bytes
    assert tok.decode(encoded) == source
    assert [list(x) for x in tok.encode_batch([TEXT, "a"])] == [list(ids), list(tok.encode("a"))]


def test_sentencepiece_pickles_and_repr_is_stable(spm_model):
    tok = tokenizers.load_tokenizer(spm_model)
    again = pickle.loads(pickle.dumps(tok))
    assert repr(again) == repr(tok) and again == tok
    assert list(again.encode(TEXT)) == list(tok.encode(TEXT))


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        tokenizers.load_tokenizer(str(tmp_path / "nope.model"))


def test_train_on_no_text(tmp_path):
    with pytest.raises(ValueError, match="No text"):
        tokenizers.train_sentencepiece(["", "  \n"], str(tmp_path / "x"), vocab_size=300)


def test_vocab_check():
    tok = tokenizers.ByteTokenizer()
    tokenizers.check_vocab(tok, 259)
    tokenizers.check_vocab(tok, 512)
    tokenizers.check_vocab(tok, 0)  # 0 / None: not configured
    with pytest.raises(ValueError, match=r"vocab size mismatch.*259.*256"):
        tokenizers.check_vocab(tok, 256)
