"""Perplexity and bits per byte of held-out documents, for contexts of any length.

What is measured. Each document is scored on its own, preceded by one EOS token (documents follow
an EOS in the training streams, `doc EOS doc EOS ...`), so every token of the document is a target
exactly once and the EOS itself is never scored. With N target tokens, B UTF-8 bytes and W words
(whitespace-separated, as lm-evaluation-harness counts them) of text over all documents and
total negative log-likelihood NLL (nats):

    loss = NLL / N          ppl = exp(loss)           (per token of this tokenizer)
    bits_per_byte = NLL / (B ln 2)                    (tokenizer independent)
    word_perplexity = exp(NLL / W)                    (lm-evaluation-harness `wikitext`)

Documents longer than the context `context_len` (normally the training length):
* mode="sliding" works for every model: windows of `context_len` tokens start every `stride`
  tokens (default: `context_len`, i.e. disjoint windows); the first window scores all its tokens,
  each later window only the targets no earlier window scored, so every target is scored once with
  at least `context_len - stride` tokens of context; the last window is aligned to the document end
  to use a full context. A document that fits is one window: exactly the full forward.
* mode="stream" carries the model's decode state across segments of `context_len` tokens
  (docs/design.md, Decision 8): recurrent memories keep what they learned; attention models keep a KV cache of
  `context_len` tokens, i.e. they stream as a sliding-window attention of the training length.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from nl_jax.data import sources as sources_lib
from nl_jax.eval.runner import ModelRunner

MODES = ("sliding", "stream")


@dataclasses.dataclass
class Document:
    """A tokenized document with the size of its text (for bits per byte and word perplexity)."""

    tokens: np.ndarray  # int32 [N], no BOS/EOS
    num_bytes: int
    num_words: int


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def documents_from_texts(texts, tokenizer) -> list[Document]:
    texts = [t for t in texts if t]
    toks = tokenizer.encode_batch(texts)
    return [
        Document(np.asarray(k, np.int32), len(t.encode("utf-8")), count_words(t))
        for t, k in zip(texts, toks)
        if len(k)
    ]


def documents_from_source(source, tokenizer, split: str, max_documents: int = 0) -> list[Document]:
    """Documents of a split of any nl_jax.data source: local text/jsonl files and the embedded
    corpus (their documents), TFDS (records' text), ArrayRecord shards (the token stream cut at EOS;
    bytes and words from the decoded text)."""
    from nl_jax.data import shards

    limit = max_documents if max_documents > 0 else None
    if isinstance(source, shards.ArrayRecordShards):
        source.check_tokenizer(tokenizer)
        store = source.tokens(split)
        stream = store.read(0, len(store))
        ends = np.flatnonzero(stream == tokenizer.eos_id)
        starts = np.concatenate([[0], ends + 1])
        ends = np.concatenate([ends, [len(stream)]])
        docs = []
        for a, b in zip(starts, ends):
            if b > a:
                text = tokenizer.decode(stream[a:b])
                docs.append(Document(stream[a:b].astype(np.int32), len(text.encode()), count_words(text)))
            if limit and len(docs) >= limit:
                break
        return docs
    if isinstance(source, sources_lib.TfdsText):
        src = source.data_source(split)
        n = len(src) if limit is None else min(limit, len(src))
        return documents_from_texts(
            [sources_lib.record_text(src[i], source.text_key) for i in range(n)], tokenizer
        )
    return documents_from_texts(source.documents(split)[:limit], tokenizer)


def sliding_windows(num_targets: int, context_len: int, stride: int):
    """(begin, end, first_scored) per window over targets 0..num_targets-1 of a sequence whose
    input position i predicts target i. A window feeds inputs [begin, end) and scores targets
    [first_scored, end)."""
    if context_len < 1:
        raise ValueError(f"context_len must be >= 1, got {context_len}")
    if not 1 <= stride <= context_len:
        raise ValueError(f"stride must be in [1, context_len={context_len}], got {stride}")
    out, scored, begin = [], 0, 0
    while scored < num_targets:
        end = min(begin + context_len, num_targets)
        begin = max(0, end - context_len)  # the last window ends at the document end, full context
        out.append((begin, end, scored))
        scored = end
        begin += stride
    return out


def _inputs_targets(doc: Document, prefix_id: int):
    seq = np.concatenate([[prefix_id], doc.tokens]).astype(np.int32)
    return seq[:-1], seq[1:]


def document_logprobs_sliding(
    runner: ModelRunner, docs: list[Document], context_len: int, stride: int, prefix_id: int
) -> list[np.ndarray]:
    """log p of every token of every document (float64 [N_d]) by sliding windows."""
    rows, where = [], []
    for d, doc in enumerate(docs):
        x, y = _inputs_targets(doc, prefix_id)
        for begin, end, first in sliding_windows(len(y), context_len, stride):
            rows.append((x[begin:end], y[begin:end], first - begin))
            where.append((d, first, end))
    out = [np.zeros(len(doc.tokens)) for doc in docs]
    chunk = max(runner.batch_size * 16, 1)
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        width = max(len(r[0]) for r in part)
        xs = np.zeros((len(part), width), np.int32)
        ys = np.zeros((len(part), width), np.int32)
        for i, (x, y, _) in enumerate(part):
            xs[i, : len(x)], ys[i, : len(y)] = x, y
        lp, _ = runner.score(xs, ys)
        for i, (x, _, skip) in enumerate(part):
            d, first, end = where[start + i]
            out[d][first:end] = lp[i, skip : len(x)]
    return out


def document_logprobs_stream(
    runner: ModelRunner, docs: list[Document], context_len: int, prefix_id: int
) -> list[np.ndarray]:
    """log p of every token of every document with the decode state carried through the whole
    document (attention caches hold `context_len` tokens). Documents are batched by length; rows
    past a document's end are padding whose (ignored) tokens come after everything scored."""
    order = sorted(range(len(docs)), key=lambda i: len(docs[i].tokens))
    out = [np.zeros(len(doc.tokens)) for doc in docs]
    b = runner.batch_size
    for start in range(0, len(order), b):
        ids = order[start : start + b]
        length = max(len(docs[i].tokens) for i in ids)
        xs = np.zeros((b, length), np.int32)
        ys = np.zeros((b, length), np.int32)
        for r, i in enumerate(ids):
            x, y = _inputs_targets(docs[i], prefix_id)
            xs[r, : len(x)], ys[r, : len(y)] = x, y
        state = runner.init_state(b, context_len)
        lp, _, _ = runner.stream_chunked(xs, ys, state)
        for r, i in enumerate(ids):
            out[i][:] = lp[r, : len(docs[i].tokens)]
    return out


def summarize(docs: list[Document], logprobs: list[np.ndarray]) -> dict:
    """The metrics of the module docstring from per-token log-probabilities."""
    nll = -float(sum(lp.sum() for lp in logprobs))
    tokens = sum(len(lp) for lp in logprobs)
    nbytes = sum(d.num_bytes for d in docs)
    words = sum(d.num_words for d in docs)
    if tokens == 0:
        raise ValueError("nothing to score: every document is empty")
    return {
        "num_documents": len(docs),
        "num_tokens": tokens,
        "num_bytes": nbytes,
        "num_words": words,
        "nll": nll,
        "loss": nll / tokens,
        "perplexity": math.exp(nll / tokens),
        "bits_per_byte": nll / (nbytes * math.log(2)) if nbytes else float("nan"),
        "word_perplexity": math.exp(nll / words) if words else float("nan"),
    }


def perplexity(
    runner: ModelRunner,
    docs: list[Document],
    *,
    context_len: int,
    prefix_id: int,
    mode: str = "sliding",
    stride: int = 0,
) -> dict:
    """Metrics of `docs` (see the module docstring); `stride` 0 means `context_len` (disjoint)."""
    if mode not in MODES:
        raise ValueError(f"unknown perplexity mode {mode!r}; choose one of {MODES}")
    if not docs:
        raise ValueError("no documents to evaluate")
    if mode == "sliding":
        stride = stride or context_len
        lps = document_logprobs_sliding(runner, docs, context_len, stride, prefix_id)
    else:
        lps = document_logprobs_stream(runner, docs, context_len, prefix_id)
    out = summarize(docs, lps)
    out.update(mode=mode, context_len=context_len, stride=stride if mode == "sliding" else context_len)
    return out
