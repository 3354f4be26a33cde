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
from nl_jax.mixers import Attention, attention_mask, dot_product_attention, segment_mask
from nl_jax.models import DOCUMENT_BOUNDARIES, build_model, check_document_boundaries, registered_models
from tests.memory.inputs import fresh_seed

T = 24
# Document lengths per row: the boundaries fall inside chunks (linear models run chunks of 8) and
# the second row holds three documents.
ROWS = ((9, 15), (5, 11, 8))


def _packed(seed, vocab, rows=ROWS):
    tokens = jax.random.randint(jax.random.key(seed), (len(rows), sum(rows[0])), 0, vocab)
    segments = np.stack([np.repeat(np.arange(len(r)), r) for r in rows]).astype(np.int32)
    return tokens, jnp.asarray(segments)


def assert_packed_equals_apart(forward, seed, vocab, rows=ROWS):
    """forward(tokens, segment_ids or None) -> logits; each document of a packed row alone."""
    tokens, segments = _packed(seed, vocab, rows)
    packed = np.asarray(forward(tokens, segments))
    for row, lengths in enumerate(rows):
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


@pytest.mark.parametrize("name", ["retnet", "deltanet", "gated_deltanet", "comba"])
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


def _samba_small():
    cfg = configs.load("samba_tiny").model
    cfg.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4, mlp_hidden=64, sliding_window=5)
    return cfg


def test_samba_mask_keeps_attention_within_documents():
    """Samba "mask": attention masked, the Mamba state carried. With the Mamba branch cut off (its
    output projection zero) the model is attention only, and a packed row equals its documents apart;
    with it live, "mask" and "reset" differ (the carried state reaches the next document)."""
    seed = fresh_seed()
    model = build_model(_samba_small(), nnx.Rngs(seed))
    tokens, segments = _packed(seed, 64)
    live = np.abs(model(tokens, segments, restart=False) - model(tokens, segments)).max()
    assert live > 1e-4, f"seed {seed}"
    out = model.blocks.layers.mamba.out_proj.kernel
    out[...] = jnp.zeros_like(out[...])
    assert_packed_equals_apart(_jitted(model, restart=False), seed, 64)


def test_samba_reset_packed_equals_apart():
    """Samba "reset": Mamba's conv and SSM state restart at each document (its decay 0 there), so
    with every branch live a packed row equals its documents apart."""
    seed = fresh_seed()
    model = build_model(_samba_small(), nnx.Rngs(seed))
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
    "comba": ("ignore", "reset"),
    "samba": ("ignore", "mask", "reset"),
    "titans": ("ignore", "mask", "reset"),
    "dla": ("ignore", "mask", "reset"),
    "memora": ("ignore", "mask", "reset"),
    "ttt": ("ignore", "reset"),
    "hope": ("ignore", "reset"),
    "hope_attention": ("ignore", "mask", "reset"),
    "rwkv7": ("ignore", "reset"),
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


def _samba_cfg():
    cfg = configs.load("samba_tiny").model
    cfg.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, sliding_window=6)
    return cfg


def _rwkv7_cfg():
    cfg = configs.load("rwkv7_tiny").model
    cfg.update(num_layers=2, chunk_size=8)
    return cfg


def _ttt_cfg():
    cfg = configs.load("ttt_tiny").model
    cfg.update(vocab_size=64, d_model=32, num_layers=2, num_heads=2, mlp_hidden=64, mini_batch_size=4)
    return cfg


LINEAR = ("retnet", "deltanet", "gated_deltanet", "comba")
# (config, row lengths): attention models take documents anywhere; ttt restarts on its mini-batch grid
DECODING_WITH_DOCUMENTS = {
    "transformer": (lambda: _transformer_cfg(), ROWS),
    "transformer_window": (lambda: _transformer_cfg(sliding_window=4), ROWS),  # a ring buffer < the row
    "samba": (_samba_cfg, ROWS),
    **{name: (lambda name=name: _linear_cfg(name), ROWS) for name in LINEAR},
    "rwkv7": (_rwkv7_cfg, ROWS),
    "ttt": (_ttt_cfg, ((8, 16), (4, 12, 8))),  # documents on the mini-batch grid, as "reset" needs
    "titans_lmm": (lambda: _titans_like_cfg("lmm"), ((8, 16), (4, 12, 8))),  # and on the memory's chunks
    "memora": (lambda: _memora_cfg(), ((8, 16), (4, 12, 8))),
}


def _memora_cfg():
    from tests.models.lmm_model_checks import bench_cfg

    return bench_cfg("memora")


@pytest.mark.parametrize("case", sorted(DECODING_WITH_DOCUMENTS))
def test_decoding_with_segment_ids_equals_the_training_forward(case):
    """A packed row decoded token by token with its segment ids (a KV cache keeping each slot's
    document, or recurrent states restarted where the document changes) gives the training forward's
    logits with them."""
    seed = fresh_seed()
    make_cfg, rows = DECODING_WITH_DOCUMENTS[case]
    cfg = make_cfg()
    model = build_model(cfg, nnx.Rngs(seed))
    tokens, segments = _packed(seed, cfg.vocab_size, rows)
    full = model(tokens, segment_ids=segments)
    step = jax.jit(lambda t, st, s: model.decode_step(t, st, segment_ids=s))
    state = model.init_decode_state(tokens.shape[0], T, documents=True)
    logits = []
    for i in range(T):
        out, state = step(tokens[:, i], state, segments[:, i])
        logits.append(out)
    # decoding sums a row's float32 updates token by token, training chunk by chunk: seed 1794104483
    # (retnet) reached 2e-5 on 12 of 12,480 logits; a wrong restart costs 1e-2 and more
    np.testing.assert_allclose(jnp.stack(logits, axis=1), full, rtol=1e-4, atol=5e-5, err_msg=f"seed {seed}")


def _titans_like_cfg(variant):
    cfg = configs.load("titans_tiny").model
    cfg.update(vocab_size=64, d_model=32, num_layers=2, num_heads=2, mlp_hidden=64)
    cfg.titans.update(variant=variant)
    cfg.titans.memory.update(chunk_size=4)
    return cfg


def test_decoding_with_segment_ids_is_refused_where_unsupported():
    seed = fresh_seed()
    model = build_model(_titans_like_cfg("mac"), nnx.Rngs(seed))
    with pytest.raises(ValueError, match="Titans decodes without segment ids"):
        model.init_decode_state(2, T, documents=True)
    for name in ("hope", "hope_attention"):
        cfg = configs.load(f"{name}_tiny").model
        hope = build_model(cfg, nnx.Rngs(seed))
        with pytest.raises(ValueError, match=f"{type(hope).__name__} decodes without segment ids"):
            hope.init_decode_state(2, T, documents=True)
        with pytest.raises(ValueError, match=f"{type(hope).__name__} decodes without segment ids"):
            zeros = jnp.zeros((2,), jnp.int32)
            hope.decode_step(zeros, hope.init_decode_state(2, T), segment_ids=zeros)
    deltanet = build_model(_linear_cfg("deltanet"), nnx.Rngs(seed))
    with pytest.raises(ValueError, match="needs a state that keeps the last document"):
        zeros = jnp.zeros((2,), jnp.int32)
        deltanet.decode_step(zeros, deltanet.init_decode_state(2), segment_ids=zeros)
    transformer = build_model(_transformer_cfg(), nnx.Rngs(seed))
    plain = transformer.init_decode_state(2, T)
    with pytest.raises(ValueError, match="needs a cache that keeps them"):
        transformer.decode_step(jnp.zeros((2,), jnp.int32), plain, segment_ids=jnp.zeros((2,), jnp.int32))
