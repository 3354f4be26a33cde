"""Tokenizers: byte-level (no files needed) and SentencePiece (a model file, or trained offline here).

Both expose the same small surface the pipeline needs: `vocab_size`, `pad_id`/`bos_id`/`eos_id`,
`encode(text) -> int32 array`, `encode_batch`, `decode`, and a stable `repr` (it is part of cache keys
and of the metadata that `prepare_data` writes, so a shard set can be checked against a tokenizer).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes. Ids: 0 = PAD, 1 = BOS, 2 = EOS, 3 + b = byte b (0..255); vocab_size = 259.

    PAD is 0 so zero-filled padding is already PAD. The byte offset costs one numpy add, so
    tokenizing a few MB is milliseconds.
    """

    pad_id = 0
    has_pad = True  # PAD is no byte: never a token of a document
    bos_id = 1
    eos_id = 2
    byte_offset = 3
    vocab_size = 256 + 3

    def encode(self, text: str) -> np.ndarray:
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return raw.astype(np.int32) + self.byte_offset

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        ids = ids[ids >= self.byte_offset] - self.byte_offset  # specials carry no text
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"

    def __eq__(self, other) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(repr(self))


def _sha1_of_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:12]


class SentencePieceTokenizer:
    """A SentencePiece model file. The repr carries a content hash, so a retrained model at the same
    path is not mistaken for the old one by caches or shard metadata."""

    def __init__(self, model_path: str):
        import sentencepiece as spm  # imported lazily: the byte path needs nothing

        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"SentencePiece model file not found: {model_path!r} (a tokenizer is 'byte' or the path of a "
                ".model file, e.g. from experiments.train_tokenizer)"
            )
        self.model_path = os.path.abspath(model_path)
        self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        self._sha = _sha1_of_file(self.model_path)
        self.vocab_size = int(self._sp.get_piece_size())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else 0  # padded targets are masked out, so any id works
        self.has_pad = pad >= 0  # else pad_id is a real piece (unk), not one documents never hold
        if self.eos_id < 0:
            raise ValueError(
                f"SentencePiece model {model_path!r} has no EOS id (eos_id=-1); documents are "
                "separated by EOS when packed, so retrain it with eos_id set (train_tokenizer does)."
            )

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        out = self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)
        return [np.asarray(x, dtype=np.int32) for x in out]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        return self._sp.decode([i for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id)])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(sha1={self._sha}, vocab_size={self.vocab_size})"

    def __eq__(self, other) -> bool:
        return isinstance(other, SentencePieceTokenizer) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))

    def __getstate__(self):  # the C++ processor does not pickle; grain workers reload from the file
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])


Tokenizer = ByteTokenizer | SentencePieceTokenizer


def load_tokenizer(spec: str) -> Tokenizer:
    """ "byte" -> ByteTokenizer; anything else is a path to a SentencePiece .model file."""
    if spec in ("byte", "bytes", ""):
        return ByteTokenizer()
    return SentencePieceTokenizer(spec)


def check_vocab(tokenizer: Tokenizer, vocab_size: int | None) -> None:
    """A model vocabulary smaller than the tokenizer's would index out of range (silently on TPU)."""
    if vocab_size is None or vocab_size <= 0:
        return
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"Tokenizer/vocab size mismatch: {tokenizer!r} produces ids up to "
            f"{tokenizer.vocab_size - 1} (vocab_size={tokenizer.vocab_size}) but the configured model "
            f"vocab_size is {vocab_size}. Set vocab_size >= {tokenizer.vocab_size} or use a smaller "
            "tokenizer."
        )


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    byte_fallback: bool = True,
    max_sentences: int = 2_000_000,
    num_threads: int | None = None,
) -> str:
    """Trains a SentencePiece model offline on `texts` (one training sentence per line) and returns
    the path of the .model file.

    Normalization is off and whitespace is kept, so `decode(encode(x)) == x` for any text (code
    included); byte fallback covers characters outside the learned pieces. Ids: 0 unk, 1 bos, 2 eos,
    3 pad, matching ByteTokenizer's choice of having a PAD id.
    """
    import sentencepiece as spm

    if vocab_size < 8:
        raise ValueError(f"vocab_size must be at least 8 for SentencePiece, got {vocab_size}")

    def sentences():
        count = 0
        for text in texts:
            for line in text.split("\n"):
                if line.strip():
                    yield line
                    count += 1
                    if count >= max_sentences:
                        return

    first = iter(sentences())
    try:
        head = next(first)
    except StopIteration:
        raise ValueError(f"No text to train the SentencePiece model {model_prefix!r} on") from None

    def chained():
        yield head
        yield from first

    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=chained(),
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_by_whitespace=True,
            hard_vocab_limit=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:  # SentencePiece's C++ checks, e.g. fewer pieces allowed than characters seen
        raise ValueError(
            f"SentencePiece cannot train {model_prefix!r} with vocab_size={vocab_size}: "
            f"{str(e).split('] ', 1)[-1]}"
        ) from e
    return model_prefix + ".model"
