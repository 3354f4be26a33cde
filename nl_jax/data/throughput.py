r"""Measures the data pipeline, so README numbers come from a command anyone can run.

  python -m nl_jax.data.throughput [--tokenizer=path/to.model] [--seq_len=256 --batch=8]

Reports the one-time tokenization of the embedded corpus, then batches/s and tokens/s of the train
iterator on the in-memory path and on ArrayRecord shards written to a temporary directory.
"""

import json
import tempfile
import time

from absl import app
from absl import flags

from nl_jax.data import corpus
from nl_jax.data import pipeline
from nl_jax.data import shards
from nl_jax.data import tokenizers

_TOKENIZER = flags.DEFINE_string("tokenizer", "byte", "'byte' or a SentencePiece .model path.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Context length.")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 500, "Batches to time.")


def _time_iterator(it, steps: int, tokens_per_batch: int) -> dict:
    next(it)  # start-up (thread pool, first read) is not steady-state throughput
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    secs = time.perf_counter() - start
    return {"batches_per_s": round(steps / secs, 1), "tokens_per_s": round(steps * tokens_per_batch / secs)}


def measure(tokenizer_spec="byte", seq_len=256, batch=8, steps=500) -> dict:
    tok = tokenizers.load_tokenizer(tokenizer_spec)
    src = corpus.EmbeddedCorpus()
    docs = src.documents("train")
    pipeline.clear_cache()
    start = time.perf_counter()
    stream = pipeline.tokenize_documents(src, tok, "train")
    tokenize_s = time.perf_counter() - start
    out = {
        "tokenizer": repr(tok),
        "corpus_bytes": sum(len(d.encode()) for d in docs),
        "corpus_tokens": int(len(stream)),
        "tokenize_s": round(tokenize_s, 3),
        "seq_len": seq_len,
        "global_batch_size": batch,
    }
    kw = dict(seq_len=seq_len, global_batch_size=batch, seed=0)
    out["in_memory"] = _time_iterator(pipeline.make_train_iterator(src, tok, **kw), steps, batch * seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        shards.write_shards(tmp, {"train": docs}, tok, num_shards=4)
        out["array_record"] = _time_iterator(
            pipeline.make_train_iterator(shards.ArrayRecordShards(tmp), tok, **kw), steps, batch * seq_len
        )
    return out


def main(argv):
    del argv
    print(json.dumps(measure(_TOKENIZER.value, _SEQ_LEN.value, _BATCH.value, _STEPS.value), indent=2))


if __name__ == "__main__":
    app.run(main)
