"""Per-step cost of every nl_jax.optim optimizer against optax.adamw on a ~100M-parameter pytree.

    python -m benchmarks.optim_overhead            # GPT-2-small-like pytree, 97M parameters
    python -m benchmarks.optim_overhead --small    # 4 layers x d256 x vocab 4000 (4.2M), a quick check

The pytree has LLM shapes: an embedding (vocab x d), 12 scanned layers stacked on a leading axis
(qkv, out, mlp up / down as 3-D ``(layers, d_in, d_out)`` arrays, two stacked norm scales) and a
final norm. Stacked norm scales are 2-D, so the matrix optimizers get ``dims`` marking them as
vectors (``None``); every 2-D / 3-D weight is a (batch of) matrices on its last two axes.

One step is ``tx.update`` + ``optax.apply_updates`` under ``jax.jit`` with params and state donated.
Rounds alternate over the optimizers (state re-initialised each round, the compiled step kept) so
that machine noise hits all alike; the table gives the median ms/step over rounds and its ratio to
optax.adamw measured in this same run. M3 is timed on steps inside a slow chunk: its slow NS runs
once per ``period`` (100) steps, adding about 1/100 of a Newton-Schulz pass per step on average.
"""

import os
import statistics
import time

from absl import app, flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from nl_jax import optim  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("small", False, "4 layers x d256 x vocab 4000 instead of 12 x d768 x 16000")
flags.DEFINE_integer("rounds", 3, "timed rounds (each runs every optimizer)")
flags.DEFINE_float("seconds", 1.0, "target timed seconds per optimizer per round (at least 1 step)")


def param_shapes(layers, d, vocab):
    return {
        "embed": (vocab, d),
        "layers": {
            "qkv": (layers, d, 3 * d),
            "out": (layers, d, d),
            "up": (layers, d, 4 * d),
            "down": (layers, 4 * d, d),
            "norm1": (layers, d),
            "norm2": (layers, d),
        },
        "final_norm": (d,),
    }


def matrix_dims(params):
    """Stacked norm scales are vectors per layer: no matrix; other rank>=2 leaves: last two axes."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: None if "norm" in jax.tree_util.keystr(path) or p.ndim < 2 else optim.MatrixDims(),
        params,
    )


def optimizers():
    lr = 1e-3
    return {
        "optax.adamw": optax.adamw(lr, weight_decay=0.1),
        "momentum_memory": optim.momentum_memory(lr),
        "preconditioned_momentum": optim.preconditioned_momentum(lr),
        "delta_momentum": optim.delta_momentum(lr, dims=matrix_dims),
        "deep_momentum (h=16)": optim.deep_momentum(lr, dims=matrix_dims),
        "muon": optim.muon(lr, dims=matrix_dims),
        "m3 (ema)": optim.m3(lr, dims=matrix_dims),
        "m3 (accumulate)": optim.m3(lr, form="accumulate", dims=matrix_dims),
        "adam_memory": optim.adam_memory(lr, weight_decay=0.1),
    }


def make_tree(shapes, seed, scale):
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    fn = jax.jit(lambda ks: [scale * jax.random.normal(k, s) for k, s in zip(ks, leaves)])
    return treedef.unflatten(fn(keys))


def main(_):
    layers, d, vocab = (4, 256, 4000) if FLAGS.small else (12, 768, 16000)
    shapes = param_shapes(layers, d, vocab)
    grads = make_tree(shapes, 1, 1e-3)
    params0 = make_tree(shapes, 0, 0.02)
    n_params = sum(x.size for x in jax.tree.leaves(grads))
    print(
        f"pytree: {n_params / 1e6:.1f}M parameters ({layers} stacked layers, d={d}, "
        f"vocab={vocab}); backend {jax.default_backend()}, {jax.device_count()} device(s)"
    )

    txs = optimizers()
    steps, per_step = {}, {name: [] for name in txs}
    for name, tx in txs.items():

        def step(params, state, grads, tx=tx):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        steps[name] = (jax.jit(tx.init), jax.jit(step, donate_argnums=(0, 1)))

    n_steps = {}
    for rnd in range(FLAGS.rounds + 1):  # round 0: compile and size the timed loop
        for name, (init, step) in steps.items():
            params = jax.tree.map(jnp.copy, params0)  # donated below
            state = init(params)
            if rnd == 0:  # compile
                params, state = step(params, state, grads)
            jax.block_until_ready((params, state))
            n = n_steps.get(name, 1)
            t0 = time.perf_counter()
            for _ in range(n):
                params, state = step(params, state, grads)
            jax.block_until_ready((params, state))
            dt = (time.perf_counter() - t0) / n
            if rnd == 0:
                n_steps[name] = max(1, int((FLAGS.seconds / 4 if FLAGS.small else FLAGS.seconds) / dt))
            else:
                per_step[name].append(dt)
            del params, state

    base = statistics.median(per_step["optax.adamw"])
    print(f"\n{'optimizer':<26}{'ms/step':>10}{'x adamw':>9}{'min..max ms':>18}   steps x rounds")
    for name, ts in per_step.items():
        med = statistics.median(ts)
        print(
            f"{name:<26}{1e3 * med:>10.1f}{med / base:>9.2f}"
            f"{f'{1e3 * min(ts):.0f}..{1e3 * max(ts):.0f}':>18}   {n_steps[name]} x {len(ts)}"
        )


if __name__ == "__main__":
    app.run(main)
