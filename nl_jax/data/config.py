"""The `data` config section and the adapter from it to iterators.

The trainer includes `default_data_config()` in its base config and calls `from_config(cfg.data)`;
everything else about data stays behind that call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grain
import ml_collections

from nl_jax.data import corpus
from nl_jax.data import packing
from nl_jax.data import pipeline
from nl_jax.data.mixture import Mixture, not_mixable
from nl_jax.data import shards
from nl_jax.data import sources as sources_lib
from nl_jax.data import tokenizers

SOURCES = ("embedded", "text", "jsonl", "array_record", "tfds")
# What a `data.mixture` entry may set besides its weight; the fields it leaves out are the data
# section's own.
MIXTURE_FIELDS = (
    "source",
    "path",
    "eval_path",
    "eval_fraction",
    "decode_errors",
    "embedded_max_bytes",
    "tfds_name",
    "tfds_data_dir",
    "text_key",
)


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults train `hope_tiny` on the embedded stdlib corpus with the byte tokenizer."""
    return ml_collections.ConfigDict(
        dict(
            source="embedded",  # embedded | text | jsonl | array_record | tfds
            path="",  # text/jsonl: file, dir or glob; array_record: prepare_data dir
            eval_path="",  # text/jsonl: separate validation files (else a hash split)
            eval_fraction=0.05,  # text/jsonl: share of documents (by content hash) for validation
            decode_errors="strict",  # text/jsonl: strict (non-UTF-8 text is an error) | replace (as U+FFFD)
            embedded_max_bytes=corpus.DEFAULT_MAX_BYTES,
            tfds_name="",  # e.g. "c4/en:3.1.0", prepared as array_record in tfds_data_dir
            tfds_data_dir="",
            text_key="text",  # jsonl key / TFDS feature holding the text
            train_split="train",
            eval_split="validation",
            tokenizer="byte",  # "byte" or a path to a SentencePiece .model
            vocab_size=0,  # the model's vocab; > 0 checks the tokenizer fits (0: no check)
            seq_len=256,
            global_batch_size=8,
            seed=0,
            shuffle=True,  # global index shuffle (no buffer), reshuffled every epoch
            num_workers=0,  # grain worker processes (0: threads in the trainer process)
            prefetch=8,  # batches prefetched per iterator
            eval_max_batches=0,  # 0: the whole validation split
            # Documents packed into one row: ignore (attention and recurrent states run across them,
            # GPT-style) | mask (attention within a document) | reset (mask, and every recurrent /
            # fast-weight state restarts at a document's first token); which models support which:
            # README, Data section.
            document_boundaries="ignore",
            # N > 1: every document starts at a multiple of N tokens of its row, the gap padded with
            # PAD (loss weight 0), e.g. the memory chunk of titans / ttt / hope for "reset"; must
            # divide seq_len. 0: documents follow each other directly (nl_jax/data/packing.py).
            document_alignment=0,
            # Weighted sources: entries like dict(source="array_record", path=DIR, weight=0.7), each a
            # weight and source fields (the others are this section's); (): the single source above.
            mixture=(),
        )
    )


def _component_config(cfg: ml_collections.ConfigDict, entry, index: int):
    """(source config, weight) of one `data.mixture` entry: the data section with its fields."""
    entry = entry.to_dict() if isinstance(entry, ml_collections.ConfigDict) else entry
    where = f"data.mixture[{index}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a dict of source fields and a weight, got {entry!r}")
    unknown = sorted(set(entry) - set(MIXTURE_FIELDS) - {"weight"})
    if unknown:
        raise ValueError(f"{where} has unknown fields {unknown}; it takes weight and {list(MIXTURE_FIELDS)}")
    if "weight" not in entry:
        raise ValueError(f"{where} has no weight")
    component = ml_collections.ConfigDict({k: cfg.get(k) for k in MIXTURE_FIELDS if k in cfg})
    component.update({k: v for k, v in entry.items() if k != "weight"})
    return component, float(entry["weight"])


def build_source(cfg: ml_collections.ConfigDict):
    """The source object named by `cfg.source`, or the Mixture of `cfg.mixture` when it has entries."""
    entries = cfg.get("mixture") or ()
    if entries:
        components = [_component_config(cfg, e, i) for i, e in enumerate(entries)]
        for c, _ in components:
            if c.source == "tfds":
                raise not_mixable(f"source='tfds' (tfds_name={c.tfds_name!r})")
        return Mixture(tuple(build_source(c) for c, _ in components), tuple(w for _, w in components))
    kind = cfg.source
    if kind == "embedded":
        return corpus.EmbeddedCorpus(max_bytes=cfg.get("embedded_max_bytes", corpus.DEFAULT_MAX_BYTES))
    decode_errors = cfg.get("decode_errors", "strict")
    if kind == "text":
        return sources_lib.TextFiles(
            cfg.path, cfg.get("eval_path", ""), cfg.get("eval_fraction", 0.05), decode_errors
        )
    if kind == "jsonl":
        return sources_lib.JsonlFiles(
            cfg.path,
            cfg.get("text_key", "text"),
            cfg.get("eval_path", ""),
            cfg.get("eval_fraction", 0.05),
            decode_errors,
        )
    if kind == "array_record":
        if not cfg.path:
            raise ValueError("data.path is empty: source='array_record' needs a prepare_data output dir")
        return shards.ArrayRecordShards(cfg.path)
    if kind == "tfds":
        return sources_lib.TfdsText(cfg.tfds_name, cfg.get("tfds_data_dir", ""), cfg.get("text_key", "text"))
    raise ValueError(f"Unknown data.source {kind!r}; expected one of {SOURCES}")


@dataclasses.dataclass
class Data:
    """Everything the trainer needs from data: the tokenizer and iterator factories."""

    source: object
    tokenizer: tokenizers.Tokenizer
    cfg: ml_collections.ConfigDict
    process_index: int
    process_count: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def train_iterator(self) -> grain.DatasetIterator:
        """A fresh checkpointable train iterator (restore its state with set_state / orbax)."""
        c = self.cfg
        return pipeline.make_train_iterator(
            self.source,
            self.tokenizer,
            seq_len=c.seq_len,
            global_batch_size=c.global_batch_size,
            seed=c.seed,
            process_index=self.process_index,
            process_count=self.process_count,
            split=c.train_split,
            shuffle=c.shuffle,
            num_workers=c.num_workers,
            prefetch=c.prefetch,
            vocab_size=c.vocab_size,
            document_alignment=c.get("document_alignment", 0),
        )

    def eval_iterator(self, max_batches: int | None = None) -> Iterator[dict]:
        """A fresh finite eval iterator over `eval_split` (same batches on every call)."""
        c = self.cfg
        if max_batches is None and c.get("eval_max_batches", 0) > 0:
            max_batches = c.eval_max_batches
        return pipeline.make_eval_iterator(
            self.source,
            self.tokenizer,
            seq_len=c.seq_len,
            global_batch_size=c.global_batch_size,
            process_index=self.process_index,
            process_count=self.process_count,
            split=c.eval_split,
            max_batches=max_batches,
            vocab_size=c.vocab_size,
            document_alignment=c.get("document_alignment", 0),
        )


def from_config(
    cfg: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    vocab_size: int | None = None,
) -> Data:
    """Builds source and tokenizer and checks them (vocab fit, shard/tokenizer match) up front, so a
    bad config fails before any compilation. Process index/count default to jax's; `vocab_size` (the
    model's) overrides `cfg.vocab_size` for the check."""
    if vocab_size is not None:
        cfg = ml_collections.ConfigDict(cfg.to_dict())  # the caller's config stays untouched
        cfg.vocab_size = vocab_size
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    tokenizer = tokenizers.load_tokenizer(cfg.tokenizer)
    tokenizers.check_vocab(tokenizer, cfg.vocab_size)
    source = build_source(cfg)
    alignment = cfg.get("document_alignment", 0)
    for s in source.sources if isinstance(source, Mixture) else (source,):
        pipeline.check_alignable(s, alignment)
        if isinstance(s, shards.ArrayRecordShards):
            s.check_tokenizer(tokenizer)
    pipeline.check_args(cfg.seq_len, cfg.global_batch_size, cfg.seed, process_index, process_count)
    packing.check_alignment(alignment, cfg.seq_len)
    pipeline.layout_pad(tokenizer, alignment)
    return Data(source, tokenizer, cfg, process_index, process_count)
