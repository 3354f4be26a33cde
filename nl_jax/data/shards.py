"""Tokenized ArrayRecord shards: the on-disk format written by `experiments.prepare_data`.

Why blocks of a token stream (not one record per document): a window of seq_len + 1 tokens at any
offset can then be read with one or two random-access record reads, so the on-disk path gets the
same exact global shuffle, sharding and tiny iterator state as the in-memory path, for any seq_len,
without holding the corpus in memory.

Layout of `output_dir`:
  metadata.json                              tokenizer repr, vocab_size, eos_id, dtype, block_len,
                                             and per split: num_tokens, num_blocks, shard files
  {split}-{i:05d}-of-{n:05d}.array_record    record j of the split's stream (block_len tokens, the
                                             last block shorter) lives in shard j % n at row j // n
The stream is `doc0 EOS doc1 EOS ...` as in `packing.pack_documents`.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable

import numpy as np

METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1
DEFAULT_BLOCK_LEN = 8192


def _dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "int32"  # halves disk and I/O for 32k vocabularies


class ShardWriter:
    """Streams documents of one split into block records across `num_shards` files."""

    def __init__(
        self,
        output_dir: str,
        split: str,
        num_shards: int,
        vocab_size: int,
        eos_id: int,
        block_len: int = DEFAULT_BLOCK_LEN,
    ):
        from array_record.python.array_record_module import ArrayRecordWriter

        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        if block_len < 1:
            raise ValueError(f"block_len must be >= 1, got {block_len}")
        os.makedirs(output_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(output_dir, f"{split}-*-of-*.array_record")):
            os.remove(stale)  # a rerun with another --num_shards must not leave old shards behind
        self.split = split
        self.dtype = _dtype_for(vocab_size)
        self.block_len = block_len
        self.eos_id = eos_id
        self.files = [f"{split}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
        self._writers = [ArrayRecordWriter(os.path.join(output_dir, f), "group_size:1") for f in self.files]
        self._buf: list[np.ndarray] = []
        self._buffered = 0
        self.num_tokens = 0
        self.num_blocks = 0
        self.num_documents = 0

    def _write_block(self, block: np.ndarray) -> None:
        self._writers[self.num_blocks % len(self._writers)].write(block.astype(self.dtype).tobytes())
        self.num_blocks += 1

    def add(self, tokens: np.ndarray) -> None:
        """Appends one document (EOS is added here)."""
        if len(tokens) == 0:
            return
        self._buf += [np.asarray(tokens, np.int32), np.asarray([self.eos_id], np.int32)]
        self._buffered += len(tokens) + 1
        self.num_tokens += len(tokens) + 1
        self.num_documents += 1
        if self._buffered >= self.block_len:
            stream = np.concatenate(self._buf)
            n_full = len(stream) // self.block_len
            for b in range(n_full):
                self._write_block(stream[b * self.block_len : (b + 1) * self.block_len])
            rest = stream[n_full * self.block_len :]
            self._buf, self._buffered = [rest], len(rest)

    def close(self) -> dict:
        if self._buffered:
            self._write_block(np.concatenate(self._buf))
        for w in self._writers:
            w.close()
        return {
            "num_tokens": self.num_tokens,
            "num_blocks": self.num_blocks,
            "num_documents": self.num_documents,
            "files": self.files,
        }


def write_metadata(output_dir: str, tokenizer, block_len: int, splits: dict) -> str:
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": repr(tokenizer),
        "vocab_size": int(tokenizer.vocab_size),
        "eos_id": int(tokenizer.eos_id),
        "dtype": _dtype_for(tokenizer.vocab_size),
        "block_len": int(block_len),
        "splits": splits,
    }
    path = os.path.join(output_dir, METADATA_FILE)
    with open(path, "w") as f:
        json.dump(meta, f, indent=2)
    return path


def write_shards(
    output_dir: str,
    split_docs: dict[str, Iterable[str]],
    tokenizer,
    num_shards: int = 1,
    block_len: int = DEFAULT_BLOCK_LEN,
    batch_docs: int = 256,
) -> dict:
    """Tokenizes each split's documents into shards and writes metadata.json; returns the metadata."""
    splits = {}
    for split, docs in split_docs.items():
        writer = ShardWriter(output_dir, split, num_shards, tokenizer.vocab_size, tokenizer.eos_id, block_len)
        batch: list[str] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) >= batch_docs:
                for toks in tokenizer.encode_batch(batch):
                    writer.add(toks)
                batch = []
        for toks in tokenizer.encode_batch(batch):
            writer.add(toks)
        splits[split] = writer.close()
    write_metadata(output_dir, tokenizer, block_len, splits)
    with open(os.path.join(output_dir, METADATA_FILE)) as f:
        return json.load(f)


def read_metadata(path: str) -> dict:
    meta_path = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"{meta_path!r} not found: data.path for source='array_record' must be a directory "
            "written by `python -m experiments.prepare_data`"
        )
    with open(meta_path) as f:
        return json.load(f)


class ArrayRecordTokens:
    """Random-access token stream of one split of a shard directory: `len()` tokens, `read(a, b)`.

    Picklable (the reader reopens lazily in each grain worker); repr is stable.
    """

    def __init__(self, path: str, split: str):
        self.path = os.path.abspath(path)
        self.split = split
        self.meta = read_metadata(self.path)
        if split not in self.meta["splits"]:
            raise ValueError(
                f"Split {split!r} not in {self.path!r}; available: {sorted(self.meta['splits'])}"
            )
        info = self.meta["splits"][split]
        if info["num_tokens"] == 0:
            raise ValueError(f"Empty corpus: split {split!r} of {self.path!r} has no tokens")
        self.block_len = int(self.meta["block_len"])
        self.num_tokens = int(info["num_tokens"])
        self.dtype = np.dtype(self.meta["dtype"])
        self.files = [os.path.join(self.path, f) for f in info["files"]]
        n, nb = len(self.files), int(info["num_blocks"])
        counts = [len(range(s, nb, n)) for s in range(n)]
        self._shard_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self._n = n
        self._source = None

    def __len__(self) -> int:
        return self.num_tokens

    def _block(self, j: int) -> np.ndarray:
        if self._source is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._source = ArrayRecordDataSource(self.files)
        rec = self._source[int(self._shard_start[j % self._n] + j // self._n)]
        return np.frombuffer(rec, dtype=self.dtype)

    def read(self, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"read({start}, {stop}) outside [0, {self.num_tokens}]")
        first, last = start // self.block_len, (stop - 1) // self.block_len
        parts = [self._block(j) for j in range(first, last + 1)] if stop > start else []
        out = np.concatenate(parts).astype(np.int32) if parts else np.zeros((0,), np.int32)
        off = first * self.block_len
        return out[start - off : stop - off]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_source"] = None
        return state

    def __repr__(self) -> str:
        return f"ArrayRecordTokens(path={self.path!r}, split={self.split!r})"


class ArrayRecordShards:
    """The `array_record` source: a prepare_data output directory."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.meta = read_metadata(self.path)

    def check_tokenizer(self, tokenizer) -> None:
        """Shards hold ids of one tokenizer; reading them with another would be silent garbage."""
        if self.meta["tokenizer"] != repr(tokenizer) or self.meta["vocab_size"] != tokenizer.vocab_size:
            raise ValueError(
                f"Tokenizer mismatch: shards in {self.path!r} were written with "
                f"{self.meta['tokenizer']} (vocab_size={self.meta['vocab_size']}) but the configured "
                f"tokenizer is {tokenizer!r} (vocab_size={tokenizer.vocab_size})"
            )

    def tokens(self, split: str) -> ArrayRecordTokens:
        return ArrayRecordTokens(self.path, split)

    def __repr__(self) -> str:
        return f"ArrayRecordShards(path={self.path!r})"
