"""Train a small flax.nnx classifier with every nl_jax.optim optimizer in a plain optax loop.

    python -m examples.optim_classifier          (about a minute on 2 CPU cores)

The model is split once into a graph definition and a pytree of parameters; the training step is a
pure function of (params, opt_state, batch), so any optax.GradientTransformation drops in. Prints
the final training loss and accuracy per optimizer next to optax.adamw.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nl_jax import optim

STEPS = 400
BATCH = 256


class MLP(nnx.Module):
    """Two hidden layers with GELU; its weights are 2-D, its biases 1-D (the vector fallbacks)."""

    def __init__(self, d_in: int, hidden: int, classes: int, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(d_in, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.gelu(self.l1(x))
        x = jax.nn.gelu(self.l2(x))
        return self.out(x)


def make_data(n=4096, d=32, classes=10, seed=0):
    """Labels from a fixed random teacher network (learnable but not linearly separable)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w1 = rng.standard_normal((d, 64)) / np.sqrt(d)
    w2 = rng.standard_normal((64, classes)) / 8.0
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=-1)
    return jnp.asarray(x), jnp.asarray(y)


def optimizers(total_steps: int) -> dict[str, optax.GradientTransformation]:
    """Each optimizer with the best learning rate of a short sweep (x3 steps) on this problem."""
    cosine = lambda lr: optax.cosine_decay_schedule(lr, total_steps)
    return {
        "optax.adamw": optax.adamw(cosine(3e-2), weight_decay=1e-4),
        "momentum_memory": optim.momentum_memory(cosine(0.2), decay=0.9),
        "preconditioned_momentum": optim.preconditioned_momentum(cosine(3e-3), decay=0.9),
        "delta_momentum": optim.delta_momentum(cosine(0.4), decay=0.9, beta=0.5),
        "deep_momentum": optim.deep_momentum(cosine(0.2), decay=0.9),
        "muon": optim.muon(cosine(0.05), beta=0.95),
        "m3 (ema)": optim.m3(cosine(1e-4), period=10),
        "m3 (accumulate)": optim.m3(cosine(1e-3), period=10, eps=1e-2, form="accumulate"),
        "adam_memory": optim.adam_memory(cosine(3e-2)),
        "delta_momentum (literal)": optim.delta_momentum(cosine(0.2), decay=0.9, beta=1.0, form="literal"),
        "deep_momentum (grad key)": optim.deep_momentum(cosine(0.2), decay=0.9, key="gradient"),
        "muon (anchored NS)": optim.muon(cosine(0.05), beta=0.95, ns_coeffs="anchored"),
        "delta_gd": optim.delta_gd(cosine(0.5), decay=0.1),
        "feature_momentum": optim.feature_momentum(cosine(0.2), decay=0.9),
        "generalized_gd": optim.generalized_gd(cosine(0.5), weights=(0.75, 0.25)),
        "generalized_momentum": optim.generalized_gd(cosine(0.2), weights=(0.75, 0.25), form="momentum"),
        "adagrad_memory": optim.adagrad_memory(cosine(3e-2)),
    }


def train(tx: optax.GradientTransformation, x, y, steps: int, seed: int = 0):
    model = MLP(x.shape[1], 128, 10, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params, xb, yb):
        logits = nnx.merge(graphdef, params)(xb)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == yb)

    @jax.jit
    def step(params, opt_state, xb, yb):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, x.shape[0], BATCH)
        params, opt_state, loss = step(params, opt_state, x[idx], y[idx])
    full_loss, acc = jax.jit(loss_fn)(params, x, y)
    return float(full_loss), float(acc)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    x, y = make_data()
    print(f"{'optimizer':<26}{'final train loss':>18}{'accuracy':>10}{'time (s)':>10}")
    for name, tx in optimizers(args.steps).items():
        t0 = time.perf_counter()
        loss, acc = train(tx, x, y, args.steps)
        print(f"{name:<26}{loss:>18.4f}{acc:>10.3f}{time.perf_counter() - t0:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
