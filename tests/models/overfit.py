"""Shared by the overfit tests: full-batch AdamW on one fixed batch, the whole run in one jit."""

import jax
import optax
from flax import nnx


def overfit_losses(model: nnx.Module, tokens: jax.Array, lr: float, steps: int) -> jax.Array:
    """Next-token loss at each of `steps` AdamW steps (no weight decay) on `tokens` [B, T + 1]."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(lr, weight_decay=0.0)

    def loss_fn(p):
        logits = nnx.merge(graphdef, p, copy=True)(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def train(params):
        def step(carry, _):
            p, o = carry
            loss, g = jax.value_and_grad(loss_fn)(p)
            updates, o = tx.update(g, o, p)
            return (optax.apply_updates(p, updates), o), loss

        return jax.lax.scan(step, (params, tx.init(params)), None, length=steps)[1]

    return train(params)
