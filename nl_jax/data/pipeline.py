"""Grain pipelines: tokenize, pack, shuffle, repeat, batch, shard per process; checkpointable.

Two paths, one batch format (`{"tokens": int32 [global_batch_size // process_count, seq_len + 1]}`,
inputs = tokens[:, :-1], targets = tokens[:, 1:]):

* Random access (embedded corpus, text, jsonl, array_record). The split is one token stream: held
  in memory (tokenized once per process and cached) or read from ArrayRecord blocks. Windows
  (packing.py) are shuffled globally by grain's index shuffle, reshuffled each epoch, repeated
  forever. Process p of P takes rows [p*B/P, (p+1)*B/P) of every global batch, so the processes'
  batches stacked in process order are exactly the single-process batch stream (what
  `jax.make_array_from_process_local_data` expects). Iterator state: `{"next_index": k}` = batches
  consumed (a few bytes, independent of corpus size).
* Streaming (TFDS). Documents are sharded by process (`ds[p::P]`), shuffled and repeated as a
  grain MapDataset, tokenized on the fly and packed by `PackWindowsIterDataset`. Process shards are
  disjoint by document and together cover the dataset, but are not a row split of the
  single-process stream. State: the parent's next_index plus an offset into one document.

Eval iterators are plain finite generators (not checkpointed: eval always restarts): all windows of
the split in order, the last one partial, the last batch padded with PAD rows; `weights` [B, L]
(float32) marks the real targets, so every validation token but the first is scored exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import numpy as np

from nl_jax.data import packing
from nl_jax.data import shards
from nl_jax.data import sources as sources_lib
from nl_jax.data import tokenizers

_TOKEN_CACHE: dict[tuple[str, str, str], np.ndarray] = {}


class InMemoryTokens:
    """A token stream in memory, with the same `len`/`read`/`windows` surface as ArrayRecordTokens."""

    def __init__(self, stream: np.ndarray, name: str):
        self.stream = np.asarray(stream, np.int32)
        self.name = name

    def __len__(self) -> int:
        return len(self.stream)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.stream[start:stop]

    def __repr__(self) -> str:
        return f"InMemoryTokens({self.name})"


def tokenize_documents(source, tokenizer, split: str) -> np.ndarray:
    """The split's packed stream (`doc EOS doc EOS ...`), tokenized once per process and cached."""
    key = (repr(source), repr(tokenizer), split)
    if key not in _TOKEN_CACHE:
        docs = source.documents(split)
        stream = packing.pack_documents(tokenizer.encode_batch(docs), tokenizer.eos_id)
        if len(stream) == 0:
            raise ValueError(f"Empty corpus: {source!r} split {split!r} tokenizes to nothing")
        _TOKEN_CACHE[key] = stream
    return _TOKEN_CACHE[key]


def token_store(source, tokenizer, split: str):
    """Random-access token stream of a split, or None for streaming sources (TFDS)."""
    if isinstance(source, shards.ArrayRecordShards):
        source.check_tokenizer(tokenizer)
        return source.tokens(split)
    if hasattr(source, "documents"):
        return InMemoryTokens(
            tokenize_documents(source, tokenizer, split), f"{source!r}, {tokenizer!r}, split={split!r}"
        )
    if isinstance(source, sources_lib.TfdsText):
        return None
    raise TypeError(f"Unsupported data source {source!r}")


def _read_windows(store, ids: np.ndarray, seq_len: int) -> np.ndarray:
    if isinstance(store, InMemoryTokens):  # one fancy-indexing gather per batch
        return store.stream[ids[:, None] * seq_len + np.arange(seq_len + 1)[None, :]]
    return np.stack([store.read(i * seq_len, i * seq_len + seq_len + 1) for i in ids])


class ProcessBatchDataset(grain.MapDataset):
    """Element k: this process's rows of global batch k, reading windows `order[k*B : (k+1)*B]`."""

    def __init__(
        self,
        order: grain.MapDataset,
        store,
        seq_len: int,
        global_batch_size: int,
        process_index: int,
        process_count: int,
    ):
        super().__init__(order)
        self._store = store
        self._seq_len = seq_len
        self._global = global_batch_size
        self._local = global_batch_size // process_count
        self._first_row = process_index * self._local

    def __len__(self) -> int:
        return len(self._parent) // self._global

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        start = index * self._global + self._first_row
        ids = np.asarray([self._parent[i] for i in range(start, start + self._local)], np.int64)
        return {"tokens": _read_windows(self._store, ids, self._seq_len)}

    def __str__(self) -> str:
        return f"ProcessBatchDataset(rows={self._first_row}:{self._first_row + self._local})"


class TokenizeRecord(grain.transforms.Map):
    """TFDS record -> int32 tokens (module-level class so grain workers can pickle it)."""

    def __init__(self, tokenizer, text_key: str):
        self._tokenizer = tokenizer
        self._text_key = text_key

    def map(self, record):
        return self._tokenizer.encode(sources_lib.record_text(record, self._text_key))


def _as_batch(tokens: np.ndarray) -> dict:
    return {"tokens": np.asarray(tokens, np.int32)}


def check_args(seq_len, global_batch_size, seed, process_index, process_count) -> None:
    packing.check_seq_len(seq_len)
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}"
        )
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")


def make_train_iterator(
    source,
    tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    split: str = "train",
    shuffle: bool = True,
    num_workers: int = 0,
    prefetch: int = 8,
    vocab_size: int | None = None,
) -> grain.DatasetIterator:
    """Infinite, checkpointable iterator of this process's batches (see module docstring).

    `it.get_state()` / `it.set_state(state)`, or orbax with `grain.checkpoint.CheckpointSave(it)` /
    `CheckpointRestore(it)`, resume it exactly. `num_workers > 0` uses grain worker processes (the
    caller must be under `absl.app.run` and a `__main__` guard).
    """
    check_args(seq_len, global_batch_size, seed, process_index, process_count)
    tokenizers.check_vocab(tokenizer, vocab_size)
    local = global_batch_size // process_count
    read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(1, prefetch))
    store = token_store(source, tokenizer, split)
    if store is not None:
        n = packing.num_windows(len(store), seq_len)
        if n == 0:
            raise ValueError(
                f"Corpus too small: {store!r} has {len(store)} tokens, fewer than one "
                f"window of seq_len + 1 = {seq_len + 1}"
            )
        order = grain.MapDataset.range(n)
        if shuffle:
            order = order.shuffle(seed=seed)
        ds = ProcessBatchDataset(
            order.repeat(), store, seq_len, global_batch_size, process_index, process_count
        ).to_iter_dataset(read_options)
    else:
        src = source.data_source(split)
        if len(src) < process_count:
            raise ValueError(
                f"{source!r} split {split!r} has {len(src)} examples, fewer than "
                f"process_count={process_count}"
            )
        docs = grain.MapDataset.source(src)[process_index::process_count]
        if shuffle:
            docs = docs.shuffle(seed=seed)
        docs = docs.repeat().map(TokenizeRecord(tokenizer, source.text_key))
        # Elements here are documents, many per batch: read further ahead than for batches.
        doc_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(64, prefetch * local))
        ds = packing.PackWindowsIterDataset(docs.to_iter_dataset(doc_options), seq_len, tokenizer.eos_id)
        ds = ds.batch(local, drop_remainder=True).map(_as_batch)
    if num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(ds)


def _store_eval_windows(store, seq_len: int) -> Iterator[tuple[np.ndarray, int]]:
    n = packing.num_windows(len(store), seq_len)
    for i in range(n):
        yield store.read(i * seq_len, i * seq_len + seq_len + 1), seq_len + 1
    tail = store.read(n * seq_len, len(store))
    if len(tail) > 1:
        out = np.zeros((seq_len + 1,), np.int32)
        out[: len(tail)] = tail
        yield out, len(tail)


def make_eval_iterator(
    source,
    tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    split: str = "validation",
    max_batches: int | None = None,
    vocab_size: int | None = None,
) -> Iterator[dict]:
    """Finite, deterministic batches over the whole split (or its first `max_batches`).

    Yields `{"tokens": int32 [B/P, L+1], "weights": float32 [B/P, L]}`; every process yields the same
    number of batches, so a multi-host eval loop never waits on a process that ran out.
    """
    check_args(seq_len, global_batch_size, 0, process_index, process_count)
    tokenizers.check_vocab(tokenizer, vocab_size)
    store = token_store(source, tokenizer, split)
    if store is not None:
        windows = _store_eval_windows(store, seq_len)
    else:
        src = source.data_source(split)
        docs = (tokenizer.encode(sources_lib.record_text(src[i], source.text_key)) for i in range(len(src)))
        windows = packing.iter_eval_windows(docs, seq_len, tokenizer.eos_id)
    return _eval_batches(
        windows, seq_len, global_batch_size, process_index, process_count, max_batches, tokenizer.pad_id
    )


def _eval_batches(
    windows, seq_len, global_batch_size, process_index, process_count, max_batches, pad_id
) -> Iterator[dict]:
    local = global_batch_size // process_count
    rows = slice(process_index * local, (process_index + 1) * local)
    count = 0
    while max_batches is None or count < max_batches:
        tokens = np.full((global_batch_size, seq_len + 1), pad_id, np.int32)
        weights = np.zeros((global_batch_size, seq_len), np.float32)
        filled = 0
        for window, n_valid in windows:
            tokens[filled, :n_valid] = window[:n_valid]
            weights[filled, : n_valid - 1] = 1.0
            filled += 1
            if filled == global_batch_size:
                break
        if filled == 0:
            return
        yield {"tokens": tokens[rows], "weights": weights[rows]}
        count += 1
        if filled < global_batch_size:
            return


def clear_cache() -> None:
    _TOKEN_CACHE.clear()


__all__ = [
    "make_train_iterator",
    "make_eval_iterator",
    "tokenize_documents",
    "token_store",
    "InMemoryTokens",
    "ProcessBatchDataset",
    "PackWindowsIterDataset",
    "clear_cache",
]
PackWindowsIterDataset = packing.PackWindowsIterDataset
