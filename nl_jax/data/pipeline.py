"""Grain pipelines: tokenize, pack, shuffle, repeat, batch, shard per process; checkpointable.

Two paths, one batch format (`{"tokens": int32 [global_batch_size // process_count, seq_len + 1],
"segment_ids": int32, same shape}`, inputs = tokens[:, :-1], targets = tokens[:, 1:]; segment ids
number the documents inside each row, see packing.py):

* Random access (embedded corpus, text, jsonl, array_record, and mixtures of them, mixture.py). The
  split is one token stream: held in memory (tokenized once per process and cached) or read from
  ArrayRecord blocks. Windows (packing.py) are shuffled globally by grain's index shuffle,
  reshuffled each epoch, repeated forever. Process p of P takes rows [p*B/P, (p+1)*B/P) of every
  global batch, so the processes' batches stacked in process order are exactly the single-process
  batch stream (what `jax.make_array_from_process_local_data` expects). Iterator state:
  `{"next_index": k}` = batches consumed (a few bytes, independent of corpus size).
* Streaming (TFDS). Documents are sharded by process (`ds[p::P]`), shuffled and repeated as a
  grain MapDataset, tokenized on the fly and packed by `PackWindowsIterDataset`. Process shards are
  disjoint by document and together cover the dataset, but are not a row split of the
  single-process stream. State: the parent's next_index plus an offset into one document.

Eval iterators are plain finite generators (not checkpointed: eval always restarts): all windows of
the split in order, the last one partial, the last batch padded with PAD rows; `weights` [B, L]
(float32) marks the real targets, so every validation token but the first is scored exactly once.
A mixture's validation windows are its components' interleaved by weight (mixture.py).

`document_alignment` N > 1 packs the aligned layout (packing.py: every document starts at a multiple
of N tokens, padded with PAD): the stream of an in-memory source is built aligned, TFDS documents
are aligned as they are packed, and batches carry `weights` float32 [B/P, L] in training too (0 on
pad targets). ArrayRecord shards hold the stream prepare_data wrote, unaligned: they take no
alignment.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import numpy as np

from nl_jax.data import packing
from nl_jax.data import shards
from nl_jax.data.mixture import Mixture, interleave, not_mixable
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


def tokenize_documents(source, tokenizer, split: str, alignment: int = 0) -> np.ndarray:
    """The split's packed stream (`doc EOS doc EOS ...`, aligned with `alignment` > 1), tokenized
    once per process and cached."""
    key = (repr(source), repr(tokenizer), split) + ((alignment,) if alignment > 1 else ())
    if key not in _TOKEN_CACHE:
        docs = source.documents(split)
        stream = packing.pack_documents(
            tokenizer.encode_batch(docs), tokenizer.eos_id, alignment, tokenizer.pad_id
        )
        if len(stream) == 0:
            raise ValueError(f"Empty corpus: {source!r} split {split!r} tokenizes to nothing")
        _TOKEN_CACHE[key] = stream
    return _TOKEN_CACHE[key]


def check_alignable(source, alignment: int) -> None:
    """ValueError for data.document_alignment > 1 on ArrayRecord shards (their stream is fixed)."""
    if alignment > 1 and isinstance(source, shards.ArrayRecordShards):
        raise ValueError(
            f"data.document_alignment={alignment} needs documents packed on the fly, but {source!r} "
            "holds the stream prepare_data wrote unaligned; use data.document_alignment=0 or a "
            "text / jsonl / tfds source"
        )


def token_store(source, tokenizer, split: str, alignment: int = 0):
    """Random-access token stream of a split, or None for streaming sources (TFDS)."""
    if isinstance(source, shards.ArrayRecordShards):
        check_alignable(source, alignment)
        source.check_tokenizer(tokenizer)
        return source.tokens(split)
    if hasattr(source, "documents"):
        name = f"{source!r}, {tokenizer!r}, split={split!r}"
        name += f", alignment={alignment}" if alignment > 1 else ""
        return InMemoryTokens(tokenize_documents(source, tokenizer, split, alignment), name)
    if isinstance(source, sources_lib.TfdsText):
        return None
    raise TypeError(f"Unsupported data source {source!r}")


def as_batch(tokens: np.ndarray, eos_id: int, pad_id: int | None = None) -> dict:
    """The batch of some token rows: the rows and their segment ids; given `pad_id` (the aligned
    layout), segment ids that keep pads with the document before them and the targets' `weights`."""
    tokens = np.asarray(tokens, np.int32)
    if pad_id is None:
        return {"tokens": tokens, "segment_ids": packing.segment_ids(tokens, eos_id)}
    return {
        "tokens": tokens,
        "segment_ids": packing.aligned_segment_ids(tokens, eos_id, pad_id),
        "weights": packing.target_weights(tokens, pad_id),
    }


def layout_pad(tokenizer, alignment: int) -> int | None:
    """The pad id `as_batch` reads in the aligned layout, None in the plain one. Pads are found by
    value, so the tokenizer's pad id must be its own (never a token of a document)."""
    if alignment <= 1:
        return None
    if not getattr(tokenizer, "has_pad", True):
        raise ValueError(
            f"data.document_alignment={alignment} pads documents with PAD, but {tokenizer!r} has no pad "
            "id of its own; use a tokenizer trained with pad_id set (experiments.train_tokenizer does)"
        )
    return tokenizer.pad_id


class ReadWindow(grain.transforms.Map):
    """Window index -> its seq_len + 1 tokens (module-level class so grain workers can pickle it)."""

    def __init__(self, store, seq_len: int):
        self._store = store
        self._seq_len = seq_len

    def map(self, i):
        return self._store.read(i * self._seq_len, (i + 1) * self._seq_len + 1)


class ProcessBatchDataset(grain.MapDataset):
    """Element k: this process's rows of global batch k, i.e. windows `[k*B, (k+1)*B)` of `windows`."""

    def __init__(
        self,
        windows: grain.MapDataset,
        global_batch_size: int,
        process_index: int,
        process_count: int,
        eos_id: int,
        pad_id: int | None = None,
    ):
        super().__init__(windows)
        self._global = global_batch_size
        self._local = global_batch_size // process_count
        self._first_row = process_index * self._local
        self._eos, self._pad = eos_id, pad_id

    def __len__(self) -> int:
        return len(self._parent) // self._global

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        start = index * self._global + self._first_row
        rows = np.stack([self._parent[i] for i in range(start, start + self._local)])
        return as_batch(rows, self._eos, self._pad)

    def __str__(self) -> str:
        return f"ProcessBatchDataset(rows={self._first_row}:{self._first_row + self._local})"


class TokenizeRecord(grain.transforms.Map):
    """TFDS record -> int32 tokens (module-level class so grain workers can pickle it)."""

    def __init__(self, tokenizer, text_key: str):
        self._tokenizer = tokenizer
        self._text_key = text_key

    def map(self, record):
        return self._tokenizer.encode(sources_lib.record_text(record, self._text_key))


class AsBatch(grain.transforms.Map):
    """Rows of tokens -> a batch with segment ids (module-level class so grain workers can pickle it)."""

    def __init__(self, eos_id: int, pad_id: int | None = None):
        self._eos, self._pad = eos_id, pad_id

    def map(self, tokens):
        return as_batch(tokens, self._eos, self._pad)


def _random_access_stores(source, tokenizer, split: str, alignment: int = 0) -> list:
    """The token stores of a source's split (one per mixture component), or [] for a streaming
    source (TFDS)."""
    if not isinstance(source, Mixture):
        store = token_store(source, tokenizer, split, alignment)
        return [] if store is None else [store]
    stores = [token_store(s, tokenizer, split, alignment) for s in source.sources]
    for s, store in zip(source.sources, stores):
        if store is None:
            raise not_mixable(repr(s))
    return stores


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
    document_alignment: int = 0,
) -> grain.DatasetIterator:
    """Infinite, checkpointable iterator of this process's batches (see module docstring).

    `it.get_state()` / `it.set_state(state)`, or orbax with `grain.checkpoint.CheckpointSave(it)` /
    `CheckpointRestore(it)`, resume it exactly. `num_workers > 0` uses grain worker processes (the
    caller must be under `absl.app.run` and a `__main__` guard). `document_alignment` > 1: the
    aligned layout (module docstring).
    """
    check_args(seq_len, global_batch_size, seed, process_index, process_count)
    packing.check_alignment(document_alignment, seq_len)
    tokenizers.check_vocab(tokenizer, vocab_size)
    pad = layout_pad(tokenizer, document_alignment)
    local = global_batch_size // process_count
    read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(1, prefetch))
    stores = _random_access_stores(source, tokenizer, split, document_alignment)
    if stores:
        windows = []
        for i, store in enumerate(stores):
            n = packing.num_windows(len(store), seq_len)
            if n == 0:
                raise ValueError(
                    f"Corpus too small: {store!r} has {len(store)} tokens, fewer than one "
                    f"window of seq_len + 1 = {seq_len + 1}"
                )
            order = grain.MapDataset.range(n)
            if shuffle:  # each mixture component its own permutation
                order = order.shuffle(seed=(seed + i) % 2**32)
            windows.append(order.repeat().map(ReadWindow(store, seq_len)))
        if isinstance(source, Mixture):
            windows = [grain.MapDataset.mix(windows, source.weights)]
        ds = ProcessBatchDataset(
            windows[0], global_batch_size, process_index, process_count, tokenizer.eos_id, pad
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
        ds = packing.PackWindowsIterDataset(
            docs.to_iter_dataset(doc_options), seq_len, tokenizer.eos_id, document_alignment, tokenizer.pad_id
        )
        ds = ds.batch(local, drop_remainder=True).map(AsBatch(tokenizer.eos_id, pad))
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
    document_alignment: int = 0,
) -> Iterator[dict]:
    """Finite, deterministic batches over the whole split (or its first `max_batches`).

    Yields `{"tokens": int32 [B/P, L+1], "segment_ids": int32 [B/P, L+1], "weights": float32
    [B/P, L]}`; every process yields the same number of batches, so a multi-host eval loop never
    waits on a process that ran out. `document_alignment` > 1: the aligned layout, pad targets of
    weight 0.
    """
    check_args(seq_len, global_batch_size, 0, process_index, process_count)
    packing.check_alignment(document_alignment, seq_len)
    tokenizers.check_vocab(tokenizer, vocab_size)
    pad = layout_pad(tokenizer, document_alignment)
    stores = _random_access_stores(source, tokenizer, split, document_alignment)
    if isinstance(source, Mixture):
        windows = interleave([_store_eval_windows(s, seq_len) for s in stores], source.weights)
    elif stores:
        windows = _store_eval_windows(stores[0], seq_len)
    else:
        src = source.data_source(split)
        docs = (tokenizer.encode(sources_lib.record_text(src[i], source.text_key)) for i in range(len(src)))
        windows = packing.iter_eval_windows(
            docs, seq_len, tokenizer.eos_id, document_alignment, tokenizer.pad_id
        )
    return _eval_batches(
        windows,
        seq_len,
        global_batch_size,
        process_index,
        process_count,
        max_batches,
        tokenizer.pad_id,
        tokenizer.eos_id,
        pad,
    )


def _eval_batches(
    windows, seq_len, global_batch_size, process_index, process_count, max_batches, pad_id, eos_id, layout_pad
) -> Iterator[dict]:
    """`layout_pad`: the pad id of the aligned layout (its pad targets weigh 0), None in the plain one."""
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
        batch = as_batch(tokens[rows], eos_id, layout_pad)
        if layout_pad is not None:
            weights = weights * packing.target_weights(tokens, layout_pad)
        yield {**batch, "weights": weights[rows]}
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
    "as_batch",
    "clear_cache",
]
PackWindowsIterDataset = packing.PackWindowsIterDataset
