r"""Tokenizes local text/jsonl into ArrayRecord shards for `data.source='array_record'`.

  python -m experiments.prepare_data --input='corpus/*.jsonl' --format=jsonl \
      --output_dir=/data/my_corpus --tokenizer=byte --num_shards=8

Writes `{train,validation}-XXXXX-of-NNNNN.array_record` and `metadata.json` (tokenizer, vocab_size,
token counts). The train/validation split is the same content-hash rule as the text/jsonl sources
(`--eval_fraction`, or `--eval_input` for separate validation files), so training on the shards
sees exactly the tokens that `source=text|jsonl` would. Documents are streamed, so inputs larger
than memory work.
"""

import json

from absl import flags

from experiments import cli
from nl_jax.data import shards
from nl_jax.data import sources
from nl_jax.data import tokenizers

_INPUT = flags.DEFINE_string("input", None, "Input file, directory or glob.", required=True)
_EVAL_INPUT = flags.DEFINE_string("eval_input", "", "Optional separate validation input.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the shards go.", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", "byte", "'byte' or a SentencePiece .model path.")
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "jsonl"], "Input format.")
_TEXT_KEY = flags.DEFINE_string("text_key", "text", "jsonl key holding the text.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Shards per split.", lower_bound=1)
_EVAL_FRACTION = flags.DEFINE_float(
    "eval_fraction", sources.DEFAULT_EVAL_FRACTION, "Share of documents (by content hash) for validation."
)
_DECODE_ERRORS = flags.DEFINE_enum(
    "decode_errors",
    "strict",
    list(sources.DECODE_ERRORS),
    "strict: an input that is not UTF-8 text is an error; replace: read it, bad bytes as U+FFFD.",
)
_BLOCK_LEN = flags.DEFINE_integer("block_len", shards.DEFAULT_BLOCK_LEN, "Tokens per record.", lower_bound=1)


def prepare(
    input_path,
    output_dir,
    tokenizer_spec="byte",
    fmt="text",
    text_key="text",
    num_shards=1,
    eval_fraction=sources.DEFAULT_EVAL_FRACTION,
    eval_input="",
    block_len=shards.DEFAULT_BLOCK_LEN,
    decode_errors="strict",
) -> dict:
    """Library form of the command (used by tests); returns the written metadata."""
    tokenizer = tokenizers.load_tokenizer(tokenizer_spec)
    if fmt == "text":
        source = sources.TextFiles(input_path, eval_input, eval_fraction, decode_errors)
    elif fmt == "jsonl":
        source = sources.JsonlFiles(input_path, text_key, eval_input, eval_fraction, decode_errors)
    else:
        raise ValueError(f"Unknown --format {fmt!r}; expected text or jsonl")
    splits = {"train": source.iter_documents("train"), "validation": source.iter_documents("validation")}
    meta = shards.write_shards(output_dir, splits, tokenizer, num_shards, block_len)
    if meta["splits"]["train"]["num_tokens"] == 0:
        raise ValueError(f"Empty corpus: no training documents in {input_path!r}")
    return meta


def main(argv):
    if len(argv) > 1:
        raise cli.CommandError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.writable_dir(_OUTPUT_DIR.value, "--output_dir")
    meta = prepare(
        _INPUT.value,
        _OUTPUT_DIR.value,
        _TOKENIZER.value,
        _FORMAT.value,
        _TEXT_KEY.value,
        _NUM_SHARDS.value,
        _EVAL_FRACTION.value,
        _EVAL_INPUT.value,
        _BLOCK_LEN.value,
        _DECODE_ERRORS.value,
    )
    print(json.dumps({k: v for k, v in meta.items() if k != "splits"}))
    for split, info in meta["splits"].items():
        print(
            f"{split}: {info['num_documents']} documents, {info['num_tokens']} tokens, "
            f"{len(info['files'])} shards"
        )


if __name__ == "__main__":
    cli.run(main)
