"""HOPE and HOPE-Attention: causality, decoding step by step and streaming in blocks (the evaluation
runner's forward_with_state) == the forward, the chunk-size-1 model against a token-by-token
reference, the ablation flags reaching the layers, FLOPs, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import configs
from experiments.configs import hope_base
from nl_jax.mixers import Attention
from nl_jax.mixers.self_modifying_reference import reference_forward
from nl_jax.models import build_model
from tests.memory.inputs import fresh_seed
from tests.models.test_hope_ntp import V, small_cfg

T = 16


def _tokens(seed, t=T):
    return jax.random.randint(jax.random.key(seed), (2, t), 0, V)


def _paths(tree):
    return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize(
    "name,signal,memory_chunk",
    [
        ("hope_attention", "ntp", None),
        ("hope_attention", "local", None),
        ("hope_attention", "none", None),
        ("hope", "ntp", None),
        ("hope", "ntp", 8),  # segments of 4 inside output-memory chunks of 8 (the sized configs' layout)
        ("hope", "local", None),
    ],
)
def test_causal_and_decoding_and_streaming_equal_the_forward(name, signal, memory_chunk):
    seed = fresh_seed()
    cfg = small_cfg(name, signal=signal)
    if memory_chunk:
        cfg.memory.memory_chunk_size = memory_chunk
    model = build_model(cfg, nnx.Rngs(seed))
    tokens = _tokens(seed)
    forward = nnx.jit(lambda m, t: m(t))
    logits = forward(model, tokens)
    assert logits.shape == (2, T, V) and logits.dtype == jnp.float32
    changed = forward(model, tokens.at[:, 9].set((tokens[:, 9] + 1) % V))
    np.testing.assert_array_equal(logits[:, :9], changed[:, :9])
    assert float(jnp.abs(logits[:, 9:] - changed[:, 9:]).max()) > 0

    # The evaluation runner's multi-token path, in two blocks. With the ntp signal it is a scan of
    # decode_step, so this also checks decoding; otherwise decode_step is a different path.
    stream = nnx.jit(lambda m, t, s: m.forward_with_state(t, s))
    first, state = stream(model, tokens[:, : T // 2], model.init_decode_state(2, T))
    second, state = stream(model, tokens[:, T // 2 :], state)
    close = dict(rtol=2e-4, atol=2e-4, err_msg=f"seed {seed}")
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), logits, **close)
    if signal == "ntp":
        return
    one, step = model.init_decode_state(2, T), nnx.jit(lambda m, t, s: m.decode_step(t, s))
    outs = []
    for i in range(T):
        out, one = step(model, tokens[:, i], one)
        outs.append(out)
    np.testing.assert_allclose(jnp.stack(outs, 1), logits, **close)
    # States hold sums of gradient terms (entries up to ~1e2); their float32 rounding scales with the
    # leaf, not with each entry.
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(state)):
        scale = max(1.0, float(jnp.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * scale, err_msg=f"seed {seed}")


@pytest.mark.parametrize("read,signal", [("boundary", "local"), ("per_token", "none")])
def test_hope_with_chunks_of_one_equals_the_token_by_token_reference(read, signal):
    """Model level: every self-modifying layer by its token-by-token reference (reference_forward),
    every CMS streamed one token at a time, against the chunked training forward."""
    seed = fresh_seed()
    cfg = small_cfg("hope", signal=signal)
    cfg.memory.update(chunk_size=1, memory_chunk_size=1, read=read)
    model = build_model(cfg, nnx.Rngs(seed))
    tokens = _tokens(seed, 8)

    @nnx.jit
    def reference(m, tokens):
        graphdef, params, rest = nnx.split(m.blocks.layers, nnx.Param, ...)
        h = m.embed(tokens)
        for layer in range(m.blocks.num_layers):
            blk = nnx.merge(graphdef, *jax.tree.map(lambda a: a[layer], (params, rest)))
            h = h + reference_forward(blk.mixer, blk.mixer_norm(h))[0]
            state, ys = blk.cms.init_state(h.shape[0]), []
            for t in range(h.shape[1]):
                y, state = blk.cms(h[:, t : t + 1], state)
                ys.append(y)
            h = jnp.concatenate(ys, axis=1)
        return m._logits(h)

    np.testing.assert_allclose(
        nnx.jit(lambda m, t: m(t))(model, tokens), reference(model, tokens), rtol=2e-4, atol=2e-4
    )


# flag -> (Param paths it removes (-) or adds (+), as substrings)
ABLATIONS = {
    "memory.dgd=False": (),
    "memory.momentum=False": ("-beta_proj",),
    "memory.weight_decay=False": ("-alpha_readout", "-alpha_bias", "-memory_alpha"),
    "memory.adaptive_k=False": ("-memory_k",),
    "memory.adaptive_v=False": ("-memory_v",),
    "memory.adaptive_q=True": ("+memory_q",),
}


def _flagged(flag):
    cfg = small_cfg("hope", signal="none")
    key, value = flag.split("=")
    section, field = key.split(".")
    cfg[section][field] = {"True": True, "False": False}.get(value, value)
    return cfg


@pytest.mark.parametrize("flag", sorted(ABLATIONS))
def test_every_ablation_flag_reaches_the_layers(flag):
    """The paper's ablation rows as config flags on hope_*: the parameter tree changes as documented
    in SelfModifyingTitans, and the output changes."""
    seed = fresh_seed()
    base_model = build_model(small_cfg("hope", signal="none"), nnx.Rngs(seed))
    model = build_model(_flagged(flag), nnx.Rngs(seed))
    before, after = _paths(nnx.state(base_model, nnx.Param)), _paths(nnx.state(model, nnx.Param))
    removed, added = before - after, after - before
    for change in ABLATIONS[flag]:
        gone = change[0] == "-"
        hits = [p for p in (removed if gone else added) if change[1:] in p]
        assert hits, (flag, change, sorted(removed), sorted(added))
    assert all(any(c[1:] in p for c in ABLATIONS[flag]) for p in removed | added), (flag, removed, added)
    if flag == "memory.dgd=False":  # same parameters: copy them, so only the flag differs
        nnx.update(model, nnx.state(base_model, nnx.Param))
    tokens = _tokens(seed)
    forward = nnx.jit(lambda m, t: m(t))
    assert float(jnp.abs(forward(model, tokens) - forward(base_model, tokens)).max()) > 1e-5, flag


def test_without_cms_flag_is_a_static_mlp_with_the_same_parameters():
    """--config.model.cms.signal=none (the w/o CMS row): same Params, no fast CMS state, other output."""
    seed = fresh_seed()
    ntp = build_model(small_cfg("hope_attention"), nnx.Rngs(seed))
    static = build_model(small_cfg("hope_attention", signal="none"), nnx.Rngs(seed))
    assert _paths(nnx.state(ntp, nnx.Param)) == _paths(nnx.state(static, nnx.Param))
    assert static.init_decode_state(2, T)[1] is None  # (mixer caches, no CMS state)
    assert "cms" in ntp.init_decode_state(2, T)
    tokens = _tokens(seed)
    forward = nnx.jit(lambda m, t: m(t))
    assert float(jnp.abs(forward(ntp, tokens) - forward(static, tokens)).max()) > 1e-4


def test_ablation_flags_exist_on_the_named_configs():
    for name in ("hope_tiny", "hope_340m", "hope_760m", "hope_1_3b"):
        model = configs.load(name).model
        assert model.cms.signal == "ntp", name  # the paper's signal, the laptop default included
        assert model.cms.variant == "sequential"
        for field in ("dgd", "momentum", "weight_decay", "adaptive_k", "adaptive_v", "adaptive_q"):
            assert isinstance(model.memory[field], bool), (name, field)


def test_forward_flops_count_the_inner_loops():
    cfg = small_cfg("hope_attention", signal="none")
    d, v, heads, hd = cfg.d_model, cfg.vocab_size, cfg.num_heads, cfg.d_model // cfg.num_heads
    mlp = sum(6 * d * h for h in cfg.cms.hidden)
    by_hand = 2 * (8 * d * heads * hd + 2 * heads * hd * (T + 1)) + 2 * mlp + 2 * d * v
    cls = type(build_model(cfg, nnx.Rngs(0)))
    assert cls.forward_flops_per_token(cfg, T) == by_hand
    flops = {}
    for name in ("hope_attention", "hope"):
        for signal in ("none", "local", "ntp"):
            c = small_cfg(name, signal=signal)
            parts = cls.flops_per_token(c, T)
            flops[name, signal] = cls.forward_flops_per_token(c, T)
            # the inner objective runs once: the outer backward differentiates the model's function only
            assert cls.train_flops_per_token(c, T) == 3 * parts["forward"] + parts["inner"]
            assert (parts["inner"] == 0) == (signal == "none")
        assert flops[name, "none"] < min(flops[name, "local"], flops[name, "ntp"])
    assert flops["hope", "none"] > 2 * 2 * d * v  # the memory layer's own count is included


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="unknown HOPE family member 'hop'"):
        hope_base.get_config("hop")
    model = build_model(small_cfg("hope_attention"), nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_len"):
        model.init_decode_state(2)
    with pytest.raises(ValueError, match="unknown CMS signal 'ntq'"):
        build_model(small_cfg("hope_attention", signal="ntq"), nnx.Rngs(0))


@pytest.mark.parametrize("window,cache", [(0, 13), (3, 13), (5, 13)])
def test_attention_segments_against_the_cache_equal_the_full_forward(window, cache):
    """Attention.extend (segments of several tokens against a KV cache, as the ntp scan runs them)
    equals the full forward and one-token decoding, also with a ring buffer shorter than a segment."""
    attn = Attention(16, 4, 2, 8, sliding_window=window, rngs=nnx.Rngs(fresh_seed()))
    x = jax.random.normal(jax.random.key(0), (2, 13, 16))
    state, ys = attn.init_cache(2, cache), []
    for lo, hi in [(0, 4), (4, 5), (5, 11), (11, 13)]:
        y, state = attn.extend(x[:, lo:hi], state)
        ys.append(y)
    np.testing.assert_allclose(jnp.concatenate(ys, 1), attn(x), rtol=1e-5, atol=1e-5)
    one = attn.init_cache(2, cache)
    for t in range(13):
        _, one = attn.decode(x[:, t : t + 1], one)
    np.testing.assert_allclose(state.k, one.k, rtol=1e-6, atol=1e-6)
    assert int(state.pos) == 13
