"""Pure train / eval steps (jit-able, the train state donated).

Loss: next-token cross entropy in float32, `inputs = tokens[:, :-1]`, `targets = tokens[:, 1:]`,
averaged over every target of the global batch, or over their `weights` when the batch carries them
(data.document_alignment > 1: pad targets weigh 0). A batch with `segment_ids` (data.document_boundaries
other than "ignore") hands `segment_ids[:, :-1]`, those of the inputs, to the model. Gradient
accumulation splits the global batch into `accum_steps` microbatches inside the step (`lax.scan`),
so one call is one optimizer step and the step counter stays global (MaxText's choice over
optax.MultiSteps).

A step whose loss, gradient norm, new parameters or new optimizer state are not all finite does not
change the state (`finite` is False in its metrics); the loop then stops with an error, so a NaN
never reaches a checkpoint. Checking the state after the update, not only the loss and gradient,
catches what the update itself breaks (a NaN learning rate, an optimizer state that overflows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from nl_jax.parallel.rules import constrain


class NonFiniteLossError(FloatingPointError):
    """The loss, gradient norm or updated train state became NaN / inf; the run stopped without
    saving that state."""


def all_finite(tree) -> jax.Array:
    """A bool scalar: every floating-point leaf of `tree` is free of NaN and inf (integer leaves,
    such as step counters, cannot be)."""
    checks = [
        jnp.isfinite(x).all()
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.stack(checks).all() if checks else jnp.asarray(True)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log p(target) per position, float32 [B, T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def inputs_and_targets(batch: dict) -> tuple[dict, jax.Array]:
    """(the model's keyword inputs, the targets) of a batch or microbatch: the tokens but the last
    (and their segment ids when the batch carries them), and the tokens but the first."""
    tokens = constrain(batch["tokens"], ("batch", "length"))
    inputs = {"tokens": tokens[:, :-1]}
    if "segment_ids" in batch:
        inputs["segment_ids"] = constrain(batch["segment_ids"], ("batch", "length"))[:, :-1]
    return inputs, tokens[:, 1:]


def weight_total(batch: dict) -> jax.Array:
    """The loss's denominator of a weighted batch: its total weight (at least 1, so an all-pad batch
    gives a loss of 0, not NaN)."""
    return jnp.maximum(batch["weights"].sum(), 1.0)


def make_loss_fn(model):
    """loss_fn(params, batch, total=None): the mean nll of the targets, or with `weights` in the batch
    their weighted sum over `total` (default: the batch's own total weight)."""

    def loss_fn(params, batch, total=None):
        inputs, targets = inputs_and_targets(batch)
        nll = token_nll(model.apply(params, **inputs), targets)
        if "weights" not in batch:
            return nll.mean()
        return (nll * batch["weights"]).sum() / (weight_total(batch) if total is None else total)

    return loss_fn


def make_train_step(model, tx, schedule, accum_steps: int = 1):
    """train_step(state, batch) -> (state, metrics {loss, grad_norm, lr, finite}); `batch` holds
    "tokens" and optionally "segment_ids" and "weights"."""
    loss_fn = make_loss_fn(model)
    grad_fn = jax.value_and_grad(loss_fn)

    def compute_grads(params, batch):
        if accum_steps == 1:
            return grad_fn(params, batch)
        b = batch["tokens"].shape[0]
        # Row i * A + a goes to microbatch a: each device keeps its own rows of every microbatch,
        # so splitting the batch moves no data.
        micro = jax.tree.map(lambda x: x.reshape(b // accum_steps, accum_steps, -1).swapaxes(0, 1), batch)
        # Weighted: each microbatch divides by the global batch's weight (over accum_steps, as the
        # sum is averaged below), so the step's loss is the global batch's weighted mean exactly.
        total = weight_total(batch) / accum_steps if "weights" in batch else None

        def body(carry, mb):
            loss_sum, grad_sum = carry
            loss, grads = grad_fn(params, mb, total)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (loss_sum, grad_sum), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
        return loss_sum / accum_steps, jax.tree.map(lambda g: g / accum_steps, grad_sum)

    def train_step(state, batch):
        params = state["params"]
        loss, grads = compute_grads(params, batch)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
        }
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite((new["params"], new["opt_state"]))
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]), "finite": finite}
        return new, metrics

    return train_step


def make_eval_step(model):
    """eval_step(params, batch) -> {nll_sum, weight_sum} over the batch's weighted targets."""

    def eval_step(params, batch):
        inputs, targets = inputs_and_targets(batch)
        nll = token_nll(model.apply(params, **inputs), targets)
        w = batch["weights"]
        return {"nll_sum": (nll * w).sum(), "weight_sum": w.sum()}

    return eval_step
