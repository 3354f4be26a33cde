"""In-context associative recall with the memory core: write key-value pairs, then read them back.

    python -m experiments.memory_demo

A stream of random (key, value) pairs is written into one memory per update rule (the presets of
`nl_jax.memory.ops.presets`); afterwards every key is used as a query and the recall error
||M(k_i) - v_i|| / ||v_i|| is averaged over the pairs. The rules differ in how they use capacity:
Hebbian writes interfere, the delta rule and DGD erase before they write. The demo also checks the
chunked training form against the token-by-token reference on the same stream.
"""

import os
import time

from absl import app, flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from nl_jax.memory import ops  # noqa: E402
from nl_jax.memory.ops import presets  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_pairs", 24, "key-value pairs written into the memory")
flags.DEFINE_integer("dim", 32, "key / value dimension")
flags.DEFINE_integer("passes", 8, "times the pair stream is replayed")
flags.DEFINE_integer("chunk", 8, "chunk size of the chunked form")
flags.DEFINE_integer("seed", 0, "random seed")


def _stream():
    kk, kv = jax.random.split(jax.random.key(FLAGS.seed))
    keys = jax.random.normal(kk, (FLAGS.num_pairs, FLAGS.dim))
    keys = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True)
    values = jax.random.normal(kv, (FLAGS.num_pairs, FLAGS.dim))
    tile = lambda x: jnp.tile(x, (FLAGS.passes, 1))[None, :, None, :]  # noqa: E731  [1, T, 1, D]
    return keys, values, tile(keys), tile(values)


def _mechanisms(length):
    full = lambda x: jnp.full((1, length, 1), x)  # noqa: E731
    return {
        "linear attention (Hebbian)": presets.linear_attention(full(1.0)),
        "DeltaNet (delta rule)": presets.delta_rule(full(1.0)),
        "Gated DeltaNet": presets.gated_delta_rule(full(0.99), full(1.0)),
        "TTT-Linear (mini-batch GD)": presets.ttt(full(1.0)),
        "Titans LMM (MLP, momentum)": presets.titans(full(0.1), full(0.01), full(0.5)),
        "self-modifying (MLP, DGD+momentum)": presets.self_modifying(full(0.1), full(0.99), full(0.5)),
    }


def main(_):
    print(f"jax {jax.__version__}, devices: {jax.devices()}")
    keys, values, k, v = _stream()
    length = k.shape[1]
    print(
        f"{FLAGS.num_pairs} pairs of dim {FLAGS.dim}, replayed {FLAGS.passes}x ({length} tokens), "
        f"chunk size {FLAGS.chunk}\n"
    )
    print(f"{'rule':<36} {'recall error':>12} {'chunked vs naive':>17} {'naive ms':>9} {'chunked ms':>11}")
    for name, m in _mechanisms(length).items():
        # Matrix memories start empty; an MLP memory needs non-zero weights or no gradient reaches it.
        mlp = m.spec.structure == "mlp"
        w0 = ops.init_weights(
            m.spec,
            jax.random.key(1),
            (1, 1),
            FLAGS.dim,
            hidden=2 * FLAGS.dim if mlp else None,
            scale=0.2 if mlp else 0.0,
        )
        state = ops.init_state(w0, momentum=m.rates.momentum is not None)
        runs = {}
        for form, fn in (("naive", ops.memory_naive), ("chunked", ops.memory_chunked)):
            call = lambda: fn(m.spec, state, k, k, v, m.rates, chunk_size=FLAGS.chunk, read=m.read)  # noqa: E731
            y, final = jax.block_until_ready(call())  # compile
            times = []
            for _ in range(5):
                t = time.perf_counter()
                jax.block_until_ready(call())
                times.append(1e3 * (time.perf_counter() - t))
            runs[form] = (y, final, min(times))
        final = runs["chunked"][1]
        recalled = ops.apply(m.spec, jax.tree.map(lambda w: w[0, 0], final.weights), keys)
        err = float(jnp.mean(jnp.linalg.norm(recalled - values, axis=-1) / jnp.linalg.norm(values, axis=-1)))
        y_n, y_c = runs["naive"][0], runs["chunked"][0]
        agree = float(jnp.linalg.norm(y_c - y_n) / jnp.linalg.norm(y_n))
        print(f"{name:<36} {err:>12.3f} {agree:>17.1e} {runs['naive'][2]:>9.1f} {runs['chunked'][2]:>11.1f}")
    print("\nThe trainer's command, once it lands: python -m experiments.pretrain --config=hope_tiny")


if __name__ == "__main__":
    app.run(main)
