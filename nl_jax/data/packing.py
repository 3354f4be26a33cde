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
The train and eval steps hand the model the segment ids of the inputs, `segment_ids[:, :-1]`. HOPE
takes only "ignore": its fast state restarts per training sequence (docs/design.md, Decision 8).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence

import grain
import numpy as np


def check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")


def pack_documents(docs: Sequence[np.ndarray], eos_id: int) -> np.ndarray:
    """One int32 stream: every non-empty document followed by EOS."""
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


def iter_eval_windows(
    docs: Iterable[np.ndarray], seq_len: int, eos_id: int
) -> Iterator[tuple[np.ndarray, int]]:
    """Streams (window, n_valid) over documents, the last window partial (n_valid < seq_len + 1).

    Used where the stream is not held in memory (TFDS): the same windows `windows()` would give.
    """
    check_seq_len(seq_len)
    buf = np.zeros((0,), np.int32)
    for doc in docs:
        if len(doc) == 0:
            continue
        buf = np.concatenate([buf, np.asarray(doc, np.int32), np.asarray([eos_id], np.int32)])
        while len(buf) >= seq_len + 1:
            yield buf[: seq_len + 1].copy(), seq_len + 1
            buf = buf[seq_len:]
    if len(buf) > 1:
        out = np.zeros((seq_len + 1,), np.int32)
        out[: len(buf)] = buf
        yield out, len(buf)


class _PackIterator(grain.DatasetIterator):
    """Cuts a stream of token documents into windows; see PackWindowsIterDataset."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, eos_id: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._eos = eos_id
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
                self._docs.append((state, np.concatenate([doc, np.asarray([self._eos], np.int32)])))
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
    document.
    """

    def __init__(self, parent: grain.IterDataset, seq_len: int, eos_id: int):
        check_seq_len(seq_len)
        super().__init__(parent)
        self._seq_len = int(seq_len)
        self._eos = int(eos_id)

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._eos)

    def __str__(self) -> str:
        return f"PackWindowsIterDataset(seq_len={self._seq_len})"
