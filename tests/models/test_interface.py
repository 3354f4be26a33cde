"""Every registered model is built on the shared language-model shell and meets the model interface
(nl_jax/models/interface.py): decode steps reproduce the forward, and so does the multi-token
stateful forward where a model offers one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import configs
from nl_jax.models import build_model, registered_models
from nl_jax.models.interface import CausalModel, StatefulModel
from nl_jax.models.lm import CausalLM

T = 32  # a multiple of every tiny config's chunk, mini-batch and (shortened) segment


def _cfg(name):
    cfg = configs.load(f"{name}_tiny").model
    cfg.num_layers = 2
    if name == "titans":
        cfg.titans.segment_size = 16
    return cfg


def _decode(graphdef, params, tokens, state):
    """Logits of decode_step scanned over the tokens, the model merged per step (as the runner does)."""

    def step(s, tok):
        logits, s = nnx.merge(graphdef, params).decode_step(tok, s)
        return s, logits

    _, logits = jax.lax.scan(step, state, tokens.T)
    return jnp.moveaxis(logits, 0, 1)


@pytest.mark.parametrize("name", registered_models())
def test_model_is_the_shared_shell_and_meets_the_interface(name):
    cfg = _cfg(name)
    model = build_model(cfg, nnx.Rngs(0))
    assert isinstance(model, CausalLM) and isinstance(model, CausalModel)
    standard = {"embed", "blocks", "final_norm"} | (set() if model.unembed is None else {"unembed"})
    assert set(nnx.state(model, nnx.Param)) == standard

    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, cfg.vocab_size)
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    assert full.shape == (2, T, cfg.vocab_size) and full.dtype == jnp.float32
    graphdef, params = nnx.split(model)
    state = model.init_decode_state(2, T)
    close = dict(rtol=2e-4, atol=2e-4, err_msg=name)
    decoded = jax.jit(lambda p, t, s: _decode(graphdef, p, t, s))(params, tokens, state)
    np.testing.assert_allclose(decoded, full, **close)

    if isinstance(model, StatefulModel):
        stream = nnx.jit(lambda m, t, s: m.forward_with_state(t, s))
        first, state = stream(model, tokens[:, : T // 2], state)
        second, _ = stream(model, tokens[:, T // 2 :], state)
        np.testing.assert_allclose(jnp.concatenate([first, second], 1), full, **close)
