"""Fresh random inputs for memory-op tests.

Each test run draws a new seed (set NL_JAX_TEST_SEED to replay one); the seed is in every failure
message. Keys and queries are l2-normalised and rates lie in (0, 1), as the layers produce them.
"""

import os
import secrets

import jax
import jax.numpy as jnp

from nl_jax.memory import ops


def fresh_seed() -> int:
    return int(os.environ.get("NL_JAX_TEST_SEED", secrets.randbits(31)))


def unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def make_inputs(
    seed, spec, *, batch=2, length=16, heads=2, dim=8, hidden=6, momentum=True, retention=True, dgd=True
):
    ks = jax.random.split(jax.random.key(seed), 8)
    shape = (batch, length, heads, dim)
    q, k = unit(jax.random.normal(ks[0], shape)), unit(jax.random.normal(ks[1], shape))
    v = jax.random.normal(ks[2], shape)
    gate = lambda key: jax.nn.sigmoid(jax.random.normal(key, (batch, length, heads)))  # noqa: E731
    rates = ops.Rates(
        lr=0.5 * gate(ks[3]),
        retention=0.5 + 0.5 * gate(ks[4]) if retention else None,
        momentum=gate(ks[5]) if momentum else None,
        dgd=0.5 * gate(ks[6]) if dgd else None,
    )
    weights = ops.init_weights(spec, ks[7], (batch, heads), dim, hidden=hidden, scale=0.3)
    return ops.init_state(weights, momentum=momentum), q, k, v, rates


def rel_err(a, b):
    """Norm-wise relative error, robust to individual tiny entries."""
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.maximum(jnp.linalg.norm(b.ravel()), 1e-30))


def max_tree_rel_err(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb), (len(la), len(lb))
    return max(rel_err(x, y) for x, y in zip(la, lb))


def max_grad_err(a, b):
    """Leaf by leaf, the norm of the difference relative to the larger of the leaf's norm and the
    whole gradient's norm. A leaf whose gradient is tiny by cancellation (a gate's bias: 1e-4 of
    the whole) carries the float32 rounding of the terms that cancel, about 1e-7 of the whole
    gradient, which was up to 5e-5 of its own norm over 16 seeds; pair this with a looser check of
    each leaf on its own (max_tree_rel_err < 1e-3) so that a 1% error in a small leaf still fails."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb), (len(la), len(lb))
    total = float(jnp.sqrt(sum(jnp.sum(jnp.square(y)) for y in lb)))
    return max(
        float(jnp.linalg.norm((x - y).ravel())) / max(float(jnp.linalg.norm(y.ravel())), total, 1e-30)
        for x, y in zip(la, lb)
    )
