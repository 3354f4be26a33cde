"""Run by test_workers.py in a subprocess: grain worker processes need absl flags parsed
(`app.run`) and a `__main__` guard, as in the trainer. Prints a JSON verdict."""

import json
import sys

from absl import app
import numpy as np

from nl_jax import data


def main(argv):
    src, tok = data.TextFiles(argv[1]), data.ByteTokenizer()
    kw = dict(seq_len=32, global_batch_size=4, seed=3)
    it = data.make_train_iterator(src, tok, num_workers=2, **kw)
    head = [next(it)["tokens"] for _ in range(5)]
    state = it.get_state()
    tail = [next(it)["tokens"] for _ in range(5)]
    ref = data.make_train_iterator(src, tok, **kw)
    threads = [next(ref)["tokens"] for _ in range(10)]
    resumed = data.make_train_iterator(src, tok, num_workers=2, **kw)
    resumed.set_state(state)
    again = [next(resumed)["tokens"] for _ in range(5)]
    print(
        json.dumps(
            {
                "same_as_threads": all(np.array_equal(x, y) for x, y in zip(head + tail, threads)),
                "resumed": all(np.array_equal(x, y) for x, y in zip(tail, again)),
            }
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
