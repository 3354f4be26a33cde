r"""Trains a SentencePiece tokenizer offline on local text (or on the embedded stdlib corpus).

  python -m experiments.train_tokenizer --model_prefix=/tmp/spm8k --vocab_size=8192
  python -m experiments.train_tokenizer --input='corpus/*.txt' --model_prefix=spm32k \
      --vocab_size=32000

Then use it with `--config.data.tokenizer=/tmp/spm8k.model` (and a model vocab_size >= its size).
"""

import os
import sys

from absl import flags

from experiments import cli
from nl_jax.data import corpus
from nl_jax.data import sources
from nl_jax.data import tokenizers

_INPUT = flags.DEFINE_string("input", "", "Text file/dir/glob; empty: the embedded corpus (train).")
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "jsonl"], "Input format.")
_TEXT_KEY = flags.DEFINE_string("text_key", "text", "jsonl key holding the text.")
_MODEL_PREFIX = flags.DEFINE_string("model_prefix", None, "Writes PREFIX.model/.vocab.", required=True)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8192, "Vocabulary size (>= ~300 with bytes).")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece model.")
_DECODE_ERRORS = flags.DEFINE_enum(
    "decode_errors",
    "strict",
    list(sources.DECODE_ERRORS),
    "strict: an input that is not UTF-8 text is an error; replace: read it, bad bytes as U+FFFD.",
)
_MAX_SENTENCES = flags.DEFINE_integer("max_sentences", 2_000_000, "Lines used for training.", lower_bound=1)


def documents(input_path: str, fmt: str = "text", text_key: str = "text", decode_errors: str = "strict"):
    """Training-split documents of the input (validation stays unseen by the tokenizer too)."""
    if not input_path:
        return corpus.EmbeddedCorpus().documents("train")
    if fmt == "jsonl":
        return sources.JsonlFiles(input_path, text_key, decode_errors=decode_errors).documents("train")
    return sources.TextFiles(input_path, decode_errors=decode_errors).documents("train")


def main(argv):
    if len(argv) > 1:
        raise cli.CommandError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.writable_dir(os.path.dirname(os.path.abspath(_MODEL_PREFIX.value)), "--model_prefix's directory")
    path = tokenizers.train_sentencepiece(
        documents(_INPUT.value, _FORMAT.value, _TEXT_KEY.value, _DECODE_ERRORS.value),
        _MODEL_PREFIX.value,
        _VOCAB_SIZE.value,
        model_type=_MODEL_TYPE.value,
        max_sentences=_MAX_SENTENCES.value,
    )
    tok = tokenizers.SentencePieceTokenizer(path)
    print(f"wrote {path}: {tok!r}")
    if tok.vocab_size < _VOCAB_SIZE.value:
        print(
            f"warning: {path} has {tok.vocab_size} pieces, fewer than --vocab_size={_VOCAB_SIZE.value}: "
            f"the input has too little text for more. A model vocab_size >= {tok.vocab_size} fits it; "
            "train on more text for a larger vocabulary",
            file=sys.stderr,
        )


if __name__ == "__main__":
    cli.run(main)
