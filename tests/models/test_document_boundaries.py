"""Document boundaries in packed rows (data.document_boundaries): a packed row of documents gives the
logits each document gives alone ("mask" for attention-only models, "reset" for the linear family),
"ignore" is the forward without segment ids, and unsupported combinations are rejected by name.

Parameters and tokens come from a fresh seed per run (NL_JAX_TEST_SEED replays one; it is in every
failure message).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import configs
from nl_jax.layers import Attention, attention_mask, dot_product_attention, segment_mask
from nl_jax.models import DOCUMENT_BOUNDARIES, build_model, check_document_boundaries, registered_models
from tests.memory.inputs import fresh_seed

T = 24
# Document lengths per row: the boundaries fall inside chunks (linear models run chunks of 8) and
# the second row holds three documents.
ROWS = ((9, 15), (5, 11, 8))


def _packed(seed, vocab):
    tokens = jax.random.randint(jax.random.key(seed), (len(ROWS), T), 0, vocab)
    segments = np.stack([np.repeat(np.arange(len(r)), r) for r in ROWS]).astype(np.int32)
    return tokens, jnp.asarray(segments)


def assert_packed_equals_apart(forward, seed, vocab):
    """forward(tokens, segment_ids or None) -> logits; each document of a packed row alone."""
    tokens, segments = _packed(seed, vocab)
    packed = np.asarray(forward(tokens, segments))
    for row, lengths in enumerate(ROWS):
        start = 0
        for n in lengths:
            alone = np.asarray(forward(tokens[row : row + 1, start : start + n], None))[0]
            np.testing.assert_allclose(
                packed[row, start : start + n], alone, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}"
            )
            start += n


def _jitted(model, **kwargs):
    return jax.jit(lambda t, s: model(t, segment_ids=s, **kwargs) if s is not None else model(t, **kwargs))


def _transformer_cfg(**overrides):
    cfg = configs.load("transformer_tiny").model
    cfg.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_hidden=64)
    cfg.update(overrides)
    return cfg


@pytest.mark.parametrize("window", [0, 4])  # 4: T > 2W takes the blocked local_attention path
def test_transformer_mask_packed_equals_apart(window):
    seed = fresh_seed()
    model = build_model(_transformer_cfg(sliding_window=window), nnx.Rngs(seed))
    assert_packed_equals_apart(_jitted(model), seed, 64)


def _linear_cfg(name):
    cfg = configs.load(f"{name}_tiny").model
    cfg.update(num_layers=2, chunk_size=8)
    return cfg


@pytest.mark.parametrize("name", ["retnet", "deltanet", "gated_deltanet"])
def test_linear_reset_packed_equals_apart(name):
    """The chunked form (boundaries inside chunks) restarts the memory and the short convs."""
    seed = fresh_seed()
    cfg = _linear_cfg(name)
    model = build_model(cfg, nnx.Rngs(seed))
    assert_packed_equals_apart(_jitted(model), seed, cfg.vocab_size)


@pytest.mark.parametrize("form", ["naive", "recurrent"])
def test_deltanet_reset_in_every_form(form):
    seed = fresh_seed()
    cfg = _linear_cfg("deltanet")
    model = build_model(cfg, nnx.Rngs(seed))
    assert_packed_equals_apart(_jitted(model, form=form), seed, cfg.vocab_size)


@pytest.mark.parametrize("name", ["transformer", "deltanet"])
def test_segment_ids_change_what_crosses_a_boundary(name):
    """The same packed row with and without segment ids: equal on the first document, different on
    the later ones (so the tests above compare something that the segment ids decide). One segment
    over the whole row is the forward without segment ids."""
    seed = fresh_seed()
    cfg = _transformer_cfg() if name == "transformer" else _linear_cfg(name)
    model = build_model(cfg, nnx.Rngs(seed))
    forward = _jitted(model)
    tokens, segments = _packed(seed, cfg.vocab_size)
    ignore = np.asarray(forward(tokens, None))
    split = np.asarray(forward(tokens, segments))
    first = ROWS[0][0]
    np.testing.assert_allclose(split[0, :first], ignore[0, :first], rtol=1e-5, atol=1e-5)
    assert np.abs(split[0, first:] - ignore[0, first:]).max(axis=-1).min() > 1e-4, f"seed {seed}"
    one = np.asarray(forward(tokens, jnp.zeros_like(segments)))
    np.testing.assert_allclose(one, ignore, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")


def test_samba_mask_keeps_attention_within_documents():
    """Samba: attention masked, the Mamba state carried. With the Mamba branch cut off (its output
    projection zero) the model is attention only, and a packed row equals its documents apart."""
    seed = fresh_seed()
    cfg = configs.load("samba_tiny").model
    cfg.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4, mlp_hidden=64, sliding_window=5)
    model = build_model(cfg, nnx.Rngs(seed))
    out = model.blocks.layers.mamba.out_proj.kernel
    out[...] = jnp.zeros_like(out[...])
    assert_packed_equals_apart(_jitted(model), seed, 64)


def test_attention_layer_local_path_equals_full_mask():
    """The blocked sliding-window path with segment ids equals the full masked path."""
    seed = fresh_seed()
    layer = Attention(16, 4, 2, 8, sliding_window=3, rngs=nnx.Rngs(seed))
    x = jax.random.normal(jax.random.key(seed), (2, 20, 16))
    segments = jnp.asarray(np.stack([np.repeat([0, 1, 2], [4, 9, 7]), np.repeat([0, 1], [13, 7])]))
    blocked = layer(x, segments)  # T = 20 > 2W: local_attention
    pos = jnp.arange(20)
    q, k, v = layer._qkv(x, pos)
    mask = attention_mask(pos, pos, 3) & segment_mask(segments, segments)
    full = layer.o(dot_product_attention(q, k, v, mask))
    np.testing.assert_allclose(blocked, full, rtol=1e-5, atol=1e-6, err_msg=f"seed {seed}")


SUPPORT = {
    "transformer": ("ignore", "mask", "reset"),
    "retnet": ("ignore", "reset"),
    "deltanet": ("ignore", "reset"),
    "gated_deltanet": ("ignore", "reset"),
    "samba": ("ignore", "mask"),
    "titans": ("ignore",),
    "ttt": ("ignore",),
    "hope": ("ignore",),
    "hope_attention": ("ignore",),
}


def test_every_model_states_its_modes_and_the_rest_are_rejected():
    # other tests may register models of their own, named test_*
    assert set(SUPPORT) == {m for m in registered_models() if not m.startswith("test_")}
    for name, supported in SUPPORT.items():
        for mode in DOCUMENT_BOUNDARIES:
            if mode in supported:
                check_document_boundaries(name, mode)
            else:
                message = f"document_boundaries='{mode}' is not supported by model '{name}'"
                with pytest.raises(ValueError, match=message):
                    check_document_boundaries(name, mode)
    with pytest.raises(ValueError, match="must be one of"):
        check_document_boundaries("transformer", "split")
