"""Full causal attention as one masked einsum (`dot_product_attention`) against the blocked form the
attention layer runs (`causal_attention`): the gradient of both (forward and backward), jitted.

    python -m benchmarks.attention                                   # 4 x 256, 8 x 256, 1 x 2048
    python -m benchmarks.attention --shapes=2x4096 --heads=8 --head_dim=64

Both compute the same function (tests/mixers/test_attention.py). Timings are medians over
repetitions that alternate between the two, so machine noise hits both alike; the ratio (einsum
time / blocked time, > 1: the blocked form is faster) is measured in this one run.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from nl_jax.mixers.attention import attention_mask, causal_attention, dot_product_attention

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["4x256", "8x256", "1x2048"], "batch x sequence length")
flags.DEFINE_integer("heads", 4, "query heads (as many kv heads)")
flags.DEFINE_integer("head_dim", 32, "width per head")
flags.DEFINE_integer("reps", 7, "timed repetitions per form and shape")


def _einsum(q, k, v):
    pos = jnp.arange(q.shape[1])
    return dot_product_attention(q, k, v, attention_mask(pos, pos))


def _grad(form):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(form(q, k, v) ** 2), argnums=(0, 1, 2)))


def main(argv):
    del argv
    forms = {"einsum": _grad(_einsum), "blocked": _grad(causal_attention)}
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {FLAGS.heads} heads of {FLAGS.head_dim}")
    print(f"{'B x T':>10} {'einsum ms':>10} {'blocked ms':>11} {'ratio':>6}")
    for shape in FLAGS.shapes:
        b, t = map(int, shape.split("x"))
        keys = jax.random.split(jax.random.key(0), 3)
        qkv = [jax.random.normal(key, (b, t, FLAGS.heads, FLAGS.head_dim)) for key in keys]
        times = {name: [] for name in forms}
        for f in forms.values():
            jax.block_until_ready(f(*qkv))  # compile
        for _ in range(FLAGS.reps):
            for name, f in forms.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(*qkv))
                times[name].append(time.perf_counter() - t0)
        e, bl = (1e3 * float(np.median(times[n])) for n in forms)
        print(f"{shape:>10} {e:>10.1f} {bl:>11.1f} {e / bl:>5.2f}x", flush=True)


if __name__ == "__main__":
    app.run(main)
