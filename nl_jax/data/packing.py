"""Packing documents into fixed training windows.

Layout: documents are concatenated into one token stream, each followed by EOS
(`doc0 EOS doc1 EOS ...`). Window i is `stream[i*L : i*L + L + 1]` (L = seq_len): windows have
seq_len + 1 tokens and overlap by exactly one, so with inputs = w[:-1] and targets = w[1:] every
token of the stream except the first is a target exactly once (nothing lost, nothing duplicated).
The tail that does not fill a window is dropped for training and padded for evaluation.

Each window carries its segment ids (`segment_ids`): the index of the document each token belongs
to, counted from 0 at the window's first token, an EOS belonging to the document it ends. What the
models do with them is `data.document_boundaries` (nl_jax/models/registry.py): "ignore" (the default)
lets attention and memories run across EOS inside a window, as in GPT-style packing; "mask" keeps
attention within a document; "reset" also restarts recurrent state at each document's first token.
The train and eval steps hand the model the segment ids of the inputs, `segment_ids[:, :-1]`. What
each model supports is listed in nl_jax/models/registry.py.

Aligned layout (`data.document_alignment` = N > 1): every document with its EOS is followed by PAD
tokens up to a multiple of N (`doc0 EOS PAD.. doc1 EOS PAD..`), so with N dividing seq_len every
document starts at a multiple of N inside its window: the chunk grid on which the chunked memories
restart ("reset"). Pads are targets of weight 0 (`target_weights`). A run of pads keeps the segment
id of the document it follows (`aligned_segment_ids`): pads come after that document's tokens, so
they change none of its logits, while an id of their own would start a segment off the grid.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence

import grain
import numpy as np


def check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")


def check_alignment(alignment: int, seq_len: int) -> None:
    """ValueError unless `alignment` (data.document_alignment) is off (0 or 1) or divides seq_len."""
    if not isinstance(alignment, (int, np.integer)) or alignment < 0:
        raise ValueError(f"data.document_alignment must be an integer >= 0 (0: off), got {alignment!r}")
    if alignment > 1 and seq_len % alignment:
        raise ValueError(
            f"data.document_alignment={alignment} must divide data.seq_len={seq_len} (windows start "
            "every seq_len tokens, so only then do documents start on its grid inside each window)"
        )


def aligned_document(doc: np.ndarray, eos_id: int, alignment: int, pad_id: int) -> np.ndarray:
    """doc, EOS, then PAD up to a multiple of `alignment` tokens (int32)."""
    n = len(doc) + 1
    out = np.full(-(-n // alignment) * alignment, pad_id, np.int32)
    out[: len(doc)] = doc
    out[len(doc)] = eos_id
    return out


def pack_documents(
    docs: Sequence[np.ndarray], eos_id: int, alignment: int = 0, pad_id: int = 0
) -> np.ndarray:
    """One int32 stream: every non-empty document followed by EOS (and, with `alignment` > 1, by PAD
    up to a multiple of `alignment` tokens)."""
    if alignment > 1:
        docs = [aligned_document(d, eos_id, alignment, pad_id) for d in docs if len(d)]
        return np.concatenate(docs) if docs else np.zeros((0,), np.int32)
    docs = [d for d in docs if len(d)]
    if not docs:
        return np.zeros((0,), np.int32)
    out = np.empty(sum(len(d) + 1 for d in docs), np.int32)
    pos = 0
    for d in docs:
        out[pos : pos + len(d)] = d
        out[pos + len(d)] = eos_id
        pos += len(d) + 1
    return out


def num_windows(num_tokens: int, seq_len: int) -> int:
    """Full windows of seq_len + 1 tokens at stride seq_len."""
    check_seq_len(seq_len)
    return max(0, (num_tokens - 1) // seq_len)


def windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """All full windows as a [n, seq_len + 1] array (a copy; for tests and small data)."""
    n = num_windows(len(stream), seq_len)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx]


def segment_ids(windows: np.ndarray, eos_id: int) -> np.ndarray:
    """int32 [..., L]: for each token, the number of EOS tokens before it in its window (row).

    Documents are never empty and the tokenizers never emit EOS inside one, so counting EOS is
    exactly counting document boundaries.
    """
    ends = np.asarray(windows) == eos_id
    before = np.cumsum(ends, axis=-1, dtype=np.int32) - ends  # EOS strictly before each position
    return before.astype(np.int32)


def aligned_segment_ids(windows: np.ndarray, eos_id: int, pad_id: int) -> np.ndarray:
    """int32 [..., L] of windows in the aligned layout: a document's tokens and EOS share an id, a
    run of pads takes the id before it, and the ids count from 0 at the window's first token (pads
    opening a window take 0, the document after them 1)."""
    w = np.asarray(windows)
    prev = np.concatenate([np.full_like(w[..., :1], pad_id), w[..., :-1]], axis=-1)
    starts = (w != pad_id) & ((prev == eos_id) | (prev == pad_id))
    starts[..., 0] = True  # the window's first token opens its first segment, pad or not
    return (np.cumsum(starts, axis=-1, dtype=np.int32) - 1).astype(np.int32)


def target_weights(windows: np.ndarray, pad_id: int) -> np.ndarray:
    """float32 [..., L - 1]: 0 where the target (the next token) is a pad, else 1."""
    return (np.asarray(windows)[..., 1:] != pad_id).astype(np.float32)


def iter_eval_windows(
    docs: Iterable[np.ndarray], seq_len: int, eos_id: int, alignment: int = 0, pad_id: int = 0
) -> Iterator[tuple[np.ndarray, int]]:
    """Streams (window, n_valid) over documents, the last window partial (n_valid < seq_len + 1).

    Used where the stream is not held in memory (TFDS): the same windows `windows()` would give
    (of the aligned stream with `alignment` > 1).
    """
    check_seq_len(seq_len)
    buf = np.zeros((0,), np.int32)
    for doc in docs:
        if len(doc) == 0:
            continue
        buf = np.concatenate([buf, _terminated(doc, eos_id, alignment, pad_id)])
        while len(buf) >= seq_len + 1:
            yield buf[: seq_len + 1].copy(), seq_len + 1
            buf = buf[seq_len:]
    if len(buf) > 1:
        out = np.zeros((seq_len + 1,), np.int32)
        out[: len(buf)] = buf
        yield out, len(buf)


def _terminated(doc, eos_id: int, alignment: int, pad_id: int) -> np.ndarray:
    """A document as it lies in the stream: with EOS (and pads to the grid when aligned)."""
    doc = np.asarray(doc, np.int32)
    if alignment > 1:
        return aligned_document(doc, eos_id, alignment, pad_id)
    return np.concatenate([doc, np.asarray([eos_id], np.int32)])


class _PackIterator(grain.DatasetIterator):
    """Cuts a stream of token documents into windows; see PackWindowsIterDataset."""

    def __init__(
        self, parent: grain.DatasetIterator, seq_len: int, eos_id: int, alignment: int = 0, pad_id: int = 0
    ):
        super().__init__(parent)
        self._seq_len = seq_len
        self._eos = eos_id
        self._alignment, self._pad = alignment, pad_id
        self._docs: deque = deque()  # (parent state before this doc, doc tokens incl. EOS)
        self._offset = 0  # tokens of the first buffered doc already behind the window start
        self._start_state = parent.get_state()

    def _buffered(self) -> int:
        return sum(len(d) for _, d in self._docs) - self._offset

    def __next__(self) -> np.ndarray:
        need = self._seq_len + 1
        while self._buffered() < need:
            state = self._parent.get_state()
            doc = np.asarray(next(self._parent), np.int32)  # StopIteration ends the stream
            if len(doc):
                self._docs.append((state, _terminated(doc, self._eos, self._alignment, self._pad)))
        parts, got, first = [], 0, True
        for _, d in self._docs:
            piece = d[self._offset :] if first else d
            first = False
            parts.append(piece[: need - got])
            got += len(parts[-1])
            if got == need:
                break
        window = np.concatenate(parts)
        # Advance by seq_len: the window's last token starts the next window.
        self._offset += self._seq_len
        while self._docs and self._offset >= len(self._docs[0][1]):
            self._offset -= len(self._docs[0][1])
            self._docs.popleft()
        return window

    def get_state(self) -> dict:
        # Small and exact: where the first buffered doc starts in the parent, and how far into it.
        state = self._docs[0][0] if self._docs else self._parent.get_state()
        return {"parent": state, "offset": int(self._offset)}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._docs.clear()
        self._offset = int(state["offset"])


class PackWindowsIterDataset(grain.IterDataset):
    """IterDataset of token documents -> IterDataset of [seq_len + 1] windows (stride seq_len).

    The checkpoint state is the parent's state at the first partly-consumed document plus an offset
    into it, so it stays a few integers no matter how long seq_len is; restoring re-reads that one
    document. `alignment` > 1 packs the aligned layout (module docstring).
    """

    def __init__(
        self, parent: grain.IterDataset, seq_len: int, eos_id: int, alignment: int = 0, pad_id: int = 0
    ):
        check_seq_len(seq_len)
        check_alignment(alignment, seq_len)
        super().__init__(parent)
        self._seq_len = int(seq_len)
        self._eos = int(eos_id)
        self._alignment, self._pad = int(alignment), int(pad_id)

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._eos, self._alignment, self._pad)

    def __str__(self) -> str:
        return f"PackWindowsIterDataset(seq_len={self._seq_len})"
