"""Streamed scoring (the evaluation runner's `stream`, state carried) of a model with
`forward_with_state` against the generic path, a `lax.scan` of `decode_step` over the tokens.

    python -m benchmarks.eval_stream                          # hope_tiny, 4 x 512 tokens
    python -m benchmarks.eval_stream --config=ttt_tiny --length=1024

Both score the same tokens from the same state (the log-likelihoods printed agree); timings are
medians over repetitions that alternate between the two paths, so machine noise hits both alike.
"""

import os
import time

from absl import app, flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments import configs  # noqa: E402
from nl_jax.eval.runner import ModelRunner  # noqa: E402
from nl_jax.models import build_model  # noqa: E402
from nl_jax.models.interface import StatefulModel  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "hope_tiny", "a config name whose model has forward_with_state")
flags.DEFINE_integer("batch", 4, "rows")
flags.DEFINE_integer("length", 512, "tokens per row")
flags.DEFINE_integer("reps", 3, "timed repetitions per path")


def main(argv):
    del argv
    cfg = configs.load(FLAGS.config).model
    model = build_model(cfg, nnx.Rngs(0))
    if not isinstance(model, StatefulModel):
        raise app.UsageError(f"{cfg.name} has no forward_with_state: nothing to compare")
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (FLAGS.batch, FLAGS.length), np.int32)
    runners = {}
    for name, fast in (("scan of decode_step", False), ("forward_with_state", True)):
        runner = ModelRunner(model, batch_size=FLAGS.batch)
        runner.has_stateful_forward = fast  # the generic path when False
        state = runner.init_state(FLAGS.batch, FLAGS.length)
        logp, _, _ = runner.stream(tokens, tokens, state)  # compile
        runners[name] = (runner, state, float(logp.sum()))
    times = {name: [] for name in runners}
    for _ in range(FLAGS.reps):
        for name, (runner, state, _) in runners.items():
            start = time.perf_counter()
            runner.stream(tokens, tokens, state)
            times[name].append(time.perf_counter() - start)
    print(f"{FLAGS.config}: {FLAGS.batch} x {FLAGS.length} tokens, median of {FLAGS.reps}")
    for name, (_, _, total) in runners.items():
        print(f"  {name:22s} {np.median(times[name]):8.3f} s   sum log p {total:.4f}")
    ratio = np.median(times["scan of decode_step"]) / np.median(times["forward_with_state"])
    print(f"  speed-up {ratio:.1f}x")


if __name__ == "__main__":
    app.run(main)
