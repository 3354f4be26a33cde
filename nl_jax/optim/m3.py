"""M3, Multi-scale Momentum Muon (Section 7.2 of the paper, Algorithm 1)."""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from nl_jax.optim import matrix
from nl_jax.optim.newton_schulz import Coeffs, newton_schulz


class M3State(NamedTuple):
    """State of :func:`scale_by_m3` (all but ``count`` are param-shaped)."""

    count: jax.Array  # steps taken, int32
    mu: optax.Updates  # M1, fast momentum
    mu_slow: optax.Updates  # M2, slow momentum (updated every `period` steps)
    nu: optax.Updates  # V, second moment
    grad_sum: optax.Updates  # sum of the gradients of the current slow chunk
    slow_out: optax.Updates  # O2 = sigma(M2), cached between chunk boundaries


def scale_by_m3(
    b1=0.9,
    b2=0.999,
    b3=0.9,
    alpha=1.0,
    eps=1e-3,
    period=100,
    ns_steps=5,
    ns_coeffs: Coeffs = "quintic",
    mu_dtype=None,
    *,
    form: Literal["ema", "accumulate"] = "ema",
    dims: matrix.DimsSpec = None,
) -> optax.GradientTransformation:
    """Multi-scale momentum Muon (Algorithm 1): two momentum memories, NS outputs.

    ``form='accumulate'`` is Algorithm 1 literally (no decay)::

        M1 <- M1 + b1 g ;  V <- V + b2 g^2 ;  O1 = NS_T(M1)
        u = (O1 + alpha O2) / (sqrt(V) + eps)
        every `period` steps (after the step that ends a chunk of `period` gradients):
            M2 <- M2 + b3 * (sum of that chunk's gradients) ;  O2 = NS_T(M2)     (O2 = 0 before)

    ``form='ema'`` (default) is the decayed variant (the literal sums grow without bound and the
    division by ``sqrt(V)`` then vanishes): ``M1 <- b1 M1 + (1-b1) g``, ``V <- b2 V + (1-b2) g^2``,
    ``M2 <- b3 M2 + (1-b3) mean(chunk)``, each bias-corrected (by ``1-b^t``, ``M2`` by ``1-b3^k`` after
    ``k`` chunks) before use. The update is ``W <- W - lr u`` (alias :func:`m3`).

    ``eps`` floors ``sqrt(V)``. NS outputs are not proportional to the gradient entry they are divided
    by (unlike Adam's ``M/sqrt(V)``), so the per-element step is bounded only by ``|O|/eps``: with
    Adam's 1e-8 it explodes wherever ``V`` is tiny. The default 1e-3 is for gradients of order 1e-3
    and up; scale it with the gradients.

    NS (``sigma``) acts on the matrices given by ``dims`` (:mod:`nl_jax.optim.matrix`); vectors and
    scalars use ``sigma = identity``, so M3 on them is a two-timescale Adam. ``O2`` is cached in the
    state, so NS runs on ``M2`` only at chunk boundaries (``lax.cond``).

    Reduces to the python loop of Algorithm 1 (tests/optim/test_m3.py) in both forms; with
    ``alpha=0`` and ``form='ema'`` it is Adam-normalised Muon, ``NS(M1_hat)/(sqrt(V_hat)+eps)``.
    """
    if form not in ("ema", "accumulate"):
        raise ValueError(f"form must be 'ema' or 'accumulate', got {form!r}")

    def sigma(tree):
        dims_list = matrix.leaf_dims(dims, tree)

        def one(d, x):
            if d is None:
                return x
            view = matrix.matrix_view(x.shape, d)
            return view.from_matrix(newton_schulz(view.to_matrix(x), ns_steps, ns_coeffs))

        return matrix.map_leaves(one, dims_list, tree)

    def init_fn(params):
        # mu_dtype is for the two momenta only, as in optax; the second moment and sums stay in the
        # parameters' dtype.
        moment = lambda: optax.tree.zeros_like(params, dtype=mu_dtype)  # noqa: E731
        plain = lambda: optax.tree.zeros_like(params)  # noqa: E731
        return M3State(
            count=jnp.zeros([], jnp.int32),
            mu=moment(),
            mu_slow=moment(),
            nu=plain(),
            grad_sum=plain(),
            slow_out=plain(),
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        if form == "ema":
            mu = optax.tree.update_moment(updates, state.mu, b1, 1)
            nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
            mu_hat = jax.tree.map(lambda m: m / (1 - b1**t).astype(m.dtype), mu)
            nu_hat = jax.tree.map(lambda v: v / (1 - b2**t).astype(v.dtype), nu)
        else:
            mu = jax.tree.map(lambda m, g: m + b1 * g, state.mu, updates)
            nu = jax.tree.map(lambda v, g: v + b2 * jnp.square(g), state.nu, updates)
            mu_hat, nu_hat = mu, nu
        fast_out = sigma(mu_hat)
        out = jax.tree.map(
            lambda o1, o2, v, g: ((o1 + alpha * o2) / (jnp.sqrt(v) + eps)).astype(g.dtype),
            fast_out,
            state.slow_out,
            nu_hat,
            updates,
        )

        grad_sum = jax.tree.map(lambda s, g: s + g, state.grad_sum, updates)

        def refresh(carry):  # end of a slow chunk: fold its gradients into M2, recompute O2
            mu_slow, grad_sum, _ = carry
            if form == "ema":
                k = (count // period).astype(jnp.float32)
                mu_slow = jax.tree.map(lambda m, s: b3 * m + (1 - b3) * s / period, mu_slow, grad_sum)
                slow_hat = jax.tree.map(lambda m: m / (1 - b3**k).astype(m.dtype), mu_slow)
            else:
                mu_slow = jax.tree.map(lambda m, s: m + b3 * s, mu_slow, grad_sum)
                slow_hat = mu_slow
            return optax.tree.cast_like(
                (mu_slow, jax.tree.map(jnp.zeros_like, grad_sum), sigma(slow_hat)), carry
            )

        carry = optax.tree.cast_like(
            (state.mu_slow, grad_sum, state.slow_out), (state.mu_slow, state.grad_sum, state.slow_out)
        )
        mu_slow, grad_sum, slow_out = jax.lax.cond(count % period == 0, refresh, lambda c: c, carry)
        return out, M3State(
            count=count,
            mu=optax.tree.cast_like(mu, state.mu),
            mu_slow=mu_slow,
            nu=optax.tree.cast_like(nu, state.nu),
            grad_sum=grad_sum,
            slow_out=slow_out,
        )

    return optax.GradientTransformation(init_fn, update_fn)


def m3(
    learning_rate: optax.ScalarOrSchedule,
    b1=0.9,
    b2=0.999,
    b3=0.9,
    alpha=1.0,
    eps=1e-3,
    period=100,
    ns_steps=5,
    ns_coeffs: Coeffs = "quintic",
    weight_decay: Optional[float] = None,
    mu_dtype=None,
    *,
    form: Literal["ema", "accumulate"] = "ema",
    dims: matrix.DimsSpec = None,
) -> optax.GradientTransformation:
    """M3 optimizer (Section 7.2): ``W <- W - lr ((O1 + alpha O2)/(sqrt(V) + eps) + wd W)``.

    See :func:`scale_by_m3` for both forms. ``weight_decay=None`` leaves decay (and params) out.
    """
    parts = [scale_by_m3(b1, b2, b3, alpha, eps, period, ns_steps, ns_coeffs, mu_dtype, form=form, dims=dims)]
    if weight_decay is not None:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
