"""How a dense layer's product is laid out for XLA:CPU: a SwiGLU's forward and backward (every
weight's gradient) with each projection as one dot_general over the activations' last dim
(`trailing_dot_general`, what an accelerator runs) against the same product on flattened rows
(`trailing_as_rows`, what `nl_jax.layers.Linear` runs on CPU).

    python -m benchmarks.linear_layout
    python -m benchmarks.linear_layout --batch=8 --seq_len=256 --d_model=128 --hidden=1024

The defaults are the peers' Transformer++ shape of benchmarks/train_step.py (4 x 256 tokens,
d_model 128, SwiGLU 1,024). Repetitions alternate between the two forms, so machine noise hits
both alike; prints each form's best and median time and the ratio of the medians from this run.
"""

import functools
import os
import time

from absl import app, flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nl_jax.layers.linear import trailing_as_rows, trailing_dot_general  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 4, "sequences")
flags.DEFINE_integer("seq_len", 256, "tokens per sequence")
flags.DEFINE_integer("d_model", 128, "model width")
flags.DEFINE_integer("hidden", 1024, "SwiGLU hidden width")
flags.DEFINE_integer("reps", 30, "timed repetitions per form")


def swiglu_grad(contract):
    """jit(grad) of sum(SwiGLU(x)^2) with respect to the three weights, each product by `contract`."""
    mm = functools.partial(contract, n=1)

    def loss(weights, x):
        gate, up, down = weights
        return jnp.sum(mm(jax.nn.silu(mm(x, gate)) * mm(x, up), down) ** 2)

    return jax.jit(jax.grad(loss))


def main(argv):
    del argv
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    d, f = FLAGS.d_model, FLAGS.hidden
    x = jax.random.normal(keys[0], (FLAGS.batch, FLAGS.seq_len, d))
    weights = tuple(0.02 * jax.random.normal(k, s) for k, s in zip(keys[1:], [(d, f), (d, f), (f, d)]))
    forms = {"dot_general": swiglu_grad(trailing_dot_general), "rows": swiglu_grad(trailing_as_rows)}
    for fn in forms.values():  # compile, and check that both compute the same gradients
        jax.block_until_ready(fn(weights, x))
    ref, rows = forms["dot_general"](weights, x), forms["rows"](weights, x)
    err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in zip(ref, rows))
    times = {name: [] for name in forms}
    for _ in range(FLAGS.reps):
        for name, fn in forms.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(weights, x))
            times[name].append(time.perf_counter() - t0)
    print(
        f"SwiGLU forward+backward, {FLAGS.batch} x {FLAGS.seq_len} tokens, d_model {d}, hidden {f} "
        f"({jax.devices()[0].device_kind}, {FLAGS.reps} alternating repetitions; max relative gap of "
        f"the gradients {err:.1e})"
    )
    med = {name: float(np.median(t)) for name, t in times.items()}
    for name, t in times.items():
        print(f"  {name:<12} best {min(t) * 1e3:7.2f} ms   median {med[name] * 1e3:7.2f} ms")
    print(f"  rows / dot_general speed: {med['dot_general'] / med['rows']:.2f}x (medians)")


if __name__ == "__main__":
    app.run(main)
