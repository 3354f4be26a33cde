"""Data for nl_jax: sources, tokenizers, packing and checkpointable grain pipelines.

Trainer entry points:
  data = from_config(cfg.data)            # checks tokenizer/vocab/shards up front
  it = data.train_iterator()              # infinite; get_state()/set_state(), orbax via grain
  for batch in data.eval_iterator(): ...  # finite, deterministic, padded with `weights`
or directly `make_train_iterator(source, tokenizer, seq_len=..., global_batch_size=..., ...)`.
Batches: {"tokens": int32 [global_batch_size // process_count, seq_len + 1], "segment_ids": same}.
"""

import importlib

# Exports resolve lazily (PEP 562): the offline commands (prepare_data, train_tokenizer) import
# only the light modules and skip grain/jax, which cost ~2-3 s of start-up.
_EXPORTS = {
    "Data": "config",
    "build_source": "config",
    "default_data_config": "config",
    "from_config": "config",
    "EmbeddedCorpus": "corpus",
    "Mixture": "mixture",
    "PackWindowsIterDataset": "packing",
    "pack_documents": "packing",
    "segment_ids": "packing",
    "windows": "packing",
    "InMemoryTokens": "pipeline",
    "make_eval_iterator": "pipeline",
    "make_train_iterator": "pipeline",
    "tokenize_documents": "pipeline",
    "ArrayRecordShards": "shards",
    "ArrayRecordTokens": "shards",
    "write_shards": "shards",
    "JsonlFiles": "sources",
    "TextFiles": "sources",
    "TfdsText": "sources",
    "ByteTokenizer": "tokenizers",
    "SentencePieceTokenizer": "tokenizers",
    "check_vocab": "tokenizers",
    "load_tokenizer": "tokenizers",
    "train_sentencepiece": "tokenizers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"nl_jax.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'nl_jax.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
