"""Scan-over-layers: stacked layout, scan == python loop (outputs, grads, carried state), remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nl_jax.layers import Linear
from nl_jax.models import REMAT_POLICIES, Stack, build_model
from nl_jax.models.stack import Layers, from_layers, to_layers


def _loss_and_grads(model, tokens):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (l, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, g


class _RecurrentBlock(nnx.Module):
    """Toy recurrent block: a running sum s_t = s_{t-1} + W x_t, y_t = x_t + tanh(s_t)."""

    def __init__(self, rngs):
        self.w = Linear((4,), (4,), ("embed",), ("mlp",), init_std=0.5, rngs=rngs)
        self.calls = nnx.Variable(jnp.zeros((), jnp.int32))  # non-Param state the scan must return

    def init_state(self, batch_size):
        return jnp.zeros((batch_size, 4))

    def __call__(self, x, state):
        self.calls[...] += 1
        s0 = jnp.zeros_like(x[:, 0]) if state is None else state
        s = s0[:, None] + jnp.cumsum(self.w(x), axis=1)
        return x + jnp.tanh(s), (None if state is None else s[:, -1])


def test_stacked_params_have_layer_axis(tiny_cfg):
    model = build_model(tiny_cfg(), nnx.Rngs(0))
    q = model.blocks.layers.attn.q.kernel
    assert q.shape == (3, 32, 4, 8)
    assert q.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
    # split_rngs gives every layer its own initialisation.
    assert not np.allclose(q[...][0], q[...][1])


@pytest.mark.parametrize("remat", ["none", "dots_saveable"])
def test_scan_equals_loop_outputs_and_grads(tiny_cfg, remat):
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 64)
    outs = []
    for scan in (True, False):
        model = build_model(tiny_cfg(scan_layers=scan, remat_policy=remat), nnx.Rngs(0))
        outs.append(_loss_and_grads(model, tokens))
    (l_scan, g_scan), (l_loop, g_loop) = outs
    np.testing.assert_allclose(l_scan, l_loop, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_scan, g_loop)


def test_every_remat_policy_gives_the_same_grads():
    x = jax.random.normal(jax.random.key(1), (2, 5, 4))

    def grads(policy):
        stack = Stack(_RecurrentBlock, 2, remat_policy=policy, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(stack, nnx.Param, ...)
        # copy=True: the blocks write non-Param state, which Variables reused from the undifferentiated
        # input `r` (outer trace) may not take inside the gradient trace.
        loss = lambda p, r: jnp.sum(nnx.merge(graphdef, p, r, copy=True)(x)[0] ** 2)
        return jax.jit(jax.grad(loss))(params, rest)

    ref = grads("none")
    for policy in REMAT_POLICIES[1:]:
        # atol against gradients of size ~10: recomputation may reorder float32 sums.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads(policy), ref)


def test_unknown_remat_policy_is_rejected(tiny_cfg):
    with pytest.raises(ValueError, match="dots_saveable"):
        build_model(tiny_cfg(remat_policy="dots"), nnx.Rngs(0))


@pytest.mark.parametrize("scan", [True, False])
def test_recurrent_state_threads_through_layers(scan):
    stack = Stack(_RecurrentBlock, 3, scan_layers=scan, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 6, 4))
    full, none_state = stack(x)
    assert none_state is None
    states = stack.init_state(2)
    assert states.shape == (3, 2, 4)
    y1, states = stack(x[:, :4], states)  # streaming in two chunks with carried state
    y2, states = stack(x[:, 4:], states)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), full, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stack.layers.calls[...], [3, 3, 3])  # non-Param state written back


def test_unrolled_stack_takes_and_returns_states_per_layer():
    """States given as Layers (one array per layer) give the stacked states' outputs and new states,
    back as Layers, and their gradients; a scanned stack refuses them."""
    stack = Stack(_RecurrentBlock, 3, scan_layers=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 4))
    states = stack.init_state(2) + jax.random.normal(jax.random.key(2), (3, 2, 4))
    y, new = stack(x, states)
    y_layers, new_layers = stack(x, to_layers(states, 3))
    assert isinstance(new_layers, Layers) and len(new_layers) == 3
    np.testing.assert_array_equal(y_layers, y)
    np.testing.assert_array_equal(from_layers(new_layers), new)
    assert float(jnp.abs(new - states).max()) > 0.1  # the states did move
    graphdef, params, rest = nnx.split(stack, nnx.Param, ...)

    def loss(s, layout):
        return jnp.sum(nnx.merge(graphdef, params, rest, copy=True)(x, layout(s))[0] ** 2)

    g = jax.grad(loss)(states, lambda s: s)
    g_layers = jax.grad(loss)(states, lambda s: to_layers(s, 3))
    np.testing.assert_allclose(g_layers, g, rtol=1e-6, atol=1e-7)
    scanned = Stack(_RecurrentBlock, 3, scan_layers=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unrolled stack"):
        scanned(x, to_layers(states, 3))


class _LearnedStartBlock(_RecurrentBlock):
    """The recurrent block with a state that starts from its own parameters."""

    def init_state(self, batch_size):
        return jnp.broadcast_to(self.w.kernel[...][0], (batch_size, 4))


def test_each_layer_builds_its_own_initial_state():
    stack = Stack(_LearnedStartBlock, 3, rngs=nnx.Rngs(0))
    states = stack.init_state(2)
    kernels = stack.layers.w.kernel[...]
    for i in range(3):
        np.testing.assert_array_equal(states[i], jnp.broadcast_to(kernels[i][0], (2, 4)))
