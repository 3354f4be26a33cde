"""Adam derived as an optimal element-wise associative memory (Appendix B of the paper, Eq. 101-105)."""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax


class AdamMemoryState(NamedTuple):
    """State of :func:`scale_by_adam_memory`: value memory ``mu`` (M~) and key memory ``nu`` (H)."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam_memory(
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    ridge=0.0,
    mu_dtype=None,
    *,
    value: Literal["sqrt", "identity"] = "sqrt",
) -> optax.GradientTransformation:
    """Element-wise associative memory whose optimum is Adam (Eq. 101-105).

    The memory ``m`` minimises ``sum_i ||m * g_i - P||^2 + lambda ||m||^2`` over the gradients seen so
    far, element-wise. Its closed form is ``m* = M~ * P / (H + lambda)`` with the two sufficient
    statistics kept in the state as (debiased) exponential moving averages, i.e. memories with
    retention ``b1`` / ``b2``: the value memory ``M~ <- b1 M~ + (1-b1) g`` and the key memory
    ``H <- b2 H + (1-b2) g^2``. The choice of ``P`` (``value``) picks the optimizer:

    * ``value='sqrt'`` (``P = sqrt(H)``, the paper's Adam choice): ``m* = M~ sqrt(H) / (H + lambda)``.
      With the data-dependent ridge ``lambda = eps sqrt(H)`` this is exactly
      ``M~ / (sqrt(H) + eps)``, which is what is computed (``eps_root`` inside the root as in optax).
      Reduces to ``optax.scale_by_adam(b1, b2, eps, eps_root)`` / the alias to ``optax.adam`` exactly.
    * ``value='identity'`` (``P = H``): ``m* = M~ H / (H + ridge)``; with ``ridge = 0`` this is the
      debiased momentum ``M~`` (``optax.ema(b1, debias=True)``), i.e. momentum SGD (paper: lambda -> 0).
    """
    if value not in ("sqrt", "identity"):
        raise ValueError(f"value must be 'sqrt' or 'identity', got {value!r}")
    if value == "sqrt" and isinstance(ridge, (int, float)) and ridge != 0:
        raise ValueError("ridge applies to value='identity'; with value='sqrt' the ridge is eps * sqrt(H)")

    def init_fn(params):
        return AdamMemoryState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=optax.tree.zeros_like(params),
        )

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)  # value memory M~
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)  # key memory H
        count = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        if value == "sqrt":
            read = lambda m, h: m / (jnp.sqrt(h + eps_root) + eps)
        else:

            def read(m, h):
                shrunk = m * (h / (h + ridge))
                return jnp.where(ridge == 0, m, jnp.where(h + ridge > 0, shrunk, 0))

        out = jax.tree.map(lambda m, h, g: read(m, h).astype(g.dtype), mu_hat, nu_hat, updates)
        return out, AdamMemoryState(
            count=count, mu=optax.tree.cast(mu, mu_dtype), nu=optax.tree.cast_like(nu, state.nu)
        )

    return optax.GradientTransformation(init_fn, update_fn)


def adam_memory(
    learning_rate: optax.ScalarOrSchedule,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    ridge=0.0,
    weight_decay: Optional[float] = None,
    mu_dtype=None,
    *,
    value: Literal["sqrt", "identity"] = "sqrt",
) -> optax.GradientTransformation:
    """Adam as an associative memory (Eq. 101-105): ``W <- W - lr (m* + wd W)``.

    Reduces to ``optax.adam(learning_rate, b1, b2, eps, eps_root)`` exactly with ``value='sqrt'``
    and ``weight_decay=None`` (and to ``optax.adamw`` with ``weight_decay=wd``).
    """
    parts = [scale_by_adam_memory(b1, b2, eps, eps_root, ridge, mu_dtype, value=value)]
    if weight_decay is not None:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
