"""The CMS `ntp` signal against a brute-force reference built apart from the segment scan.

The reference runs ONE full-sequence forward (the mixers' whole-sequence training paths, a python
loop over layers) in which the tokens of segment p read their own copy W_p of every layer's CMS fast
weights. Period by period it takes jax.grad wrt W_p of the next-token loss of the tokens seen so far
(those of segments <= p; only segment p's depend on W_p), sums the gradients per level and applies
them at the level's boundaries. The model must give the same logits, the same final fast weights, and
(first order: the updates enter as constants) the same outer gradient wrt every parameter.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import configs
from nl_jax.mixers.cms import ContinuumMemory
from nl_jax.models import build_model
from tests.memory.inputs import fresh_seed

V, T = 32, 16


def small_cfg(name, num_layers=2, scan_layers=None, **cms):
    """A tiny hope / hope_attention with the ntp signal; `cms` overrides model.cms fields (e.g.
    checkpoint_segments, which model.cms may not hold yet). Layers scanned when more than one,
    unless `scan_layers` says."""
    cfg = configs.load(f"{name}_tiny").model
    scan = num_layers > 1 if scan_layers is None else scan_layers
    cfg.update(vocab_size=V, d_model=32, num_layers=num_layers, scan_layers=scan)
    if name == "hope":
        cfg.memory.update(num_heads=2, head_dim=8, chunk_size=2, memory_chunk_size=4)
    else:
        cfg.update(num_heads=4)
    for key, value in dict(
        dict(periods=(4, 8), hidden=(16, 24), inner_lr=(0.5, 0.3), signal="ntp"), **cms
    ).items():
        cfg.cms[key] = value
    return cfg


def _per_token_mlp(w, u):
    mm = lambda a, b, s: jnp.einsum(s, a, b)  # noqa: E731
    return mm(
        jax.nn.silu(mm(u, w["gate"], "btd,btdh->bth")) * mm(u, w["up"], "btd,btdh->bth"),
        w["down"],
        "bth,bthd->btd",
    )


def reference_logits(model, tokens, seg_weights):
    """seg_weights: per level {name: [n_segments, L, B, ...]}; token t reads segment t // S's copy."""
    seg_of = jnp.arange(tokens.shape[1]) // model.segment
    graphdef, params, rest = nnx.split(model.blocks.layers, nnx.Param, ...)
    h = model.embed(tokens)
    for layer in range(model.blocks.num_layers):
        blk = nnx.merge(graphdef, *jax.tree.map(lambda a: a[layer], (params, rest)))
        u = blk.mixer_norm(h)
        z = h + (blk.mixer(u) if blk.attention else blk.mixer(u)[0])  # whole-sequence training paths
        for i, lw in enumerate(seg_weights):  # the sequential chain, weights gathered per token
            w = {n: jnp.moveaxis(a[seg_of, layer], 0, 1) for n, a in lw.items()}  # [B, T, ...]
            z = z + _per_token_mlp(w, blk.cms.levels[i].norm(z))
        h = z
    return model._logits(h)


def _ce(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])


def brute_force(model, tokens):
    """Segment weights W_p and final weights from explicit gradients of the next-token loss."""
    s, n = model.segment, T // model.segment
    w = ContinuumMemory.fast_weights(model.blocks.init_state(tokens.shape[0], T)[1])  # per level, [L, B, ...]

    @jax.jit
    def grad_p(stacked, p):
        def loss(sw):  # next-token loss of the tokens seen by the end of segment p
            seen = (jnp.arange(T - 1) < (p + 1) * s).astype(jnp.float32)
            return jnp.sum(_ce(reference_logits(model, tokens, sw), tokens) * seen)

        return jax.tree.map(lambda g: g[p], jax.grad(loss)(stacked))

    sched = model.schedule
    acc = [jax.tree.map(jnp.zeros_like, lw) for lw in w]
    segs = []
    for p in range(n):
        segs.append(w)
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *(segs + [w] * (n - p - 1)))
        g = grad_p(stacked, p)
        acc = [jax.tree.map(jnp.add, a, gi) for a, gi in zip(acc, g)]
        w = list(w)
        for i, period in enumerate(sched.periods):
            if ((p + 1) * s) % period == 0:
                w[i] = jax.tree.map(lambda a, b: a - sched.inner_lr[i] * b, w[i], acc[i])
                acc[i] = jax.tree.map(jnp.zeros_like, acc[i])
        w = tuple(w)
    return jax.tree.map(lambda *a: jnp.stack(a), *segs), w


def _close(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


# hope_attention: two layers, so the inner gradient of layer 1 crosses tokens through layer 2's
# attention; three levels and checkpointed chunks of 2 segments (8 tokens): level 0 changes inside
# a chunk, level 1 (period 8) only at chunk ends, level 2 (period 16) keeps its accumulator across
# chunks. hope: two layers too, so the inner gradient of layer 1 crosses layer 2's self-modifying
# memory (whose updates reach later segments only), chunks of 2 too.
# hope, output chunk 8: segments of 4 inside the output memory's chunks, the sized configs' layout
# (16 in 64), run aligned: the output memory streams each segment in one pass from its carried state.
# hope, unrolled layers: hope_tiny's layout (a python loop over the layers, the plain segment scan).
# (The plain segment scan, k = 1, is also what decoding is compared with in test_hope.py.)
CASES = {  # id: (model, layers, cms, memory, scan_layers)
    "hope_attention": (
        "hope_attention",
        2,
        dict(periods=(4, 8, 16), hidden=(16, 24, 8), inner_lr=(0.5, 0.3, 0.2), checkpoint_segments=2),
        {},
        True,
    ),
    "hope": ("hope", 2, dict(checkpoint_segments=2), {}, True),
    "hope, output chunk 8": ("hope", 2, dict(checkpoint_segments=2), dict(memory_chunk_size=8), True),
    "hope, unrolled layers": ("hope", 2, dict(checkpoint_segments=1), {}, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ntp_signal_equals_the_brute_force_reference(case):
    seed = fresh_seed()
    name, layers, cms, memory, scan_layers = CASES[case]
    cfg = small_cfg(name, layers, scan_layers, **cms)
    if memory:
        cfg.memory.update(memory)
    model = build_model(cfg, nnx.Rngs(seed))
    assert model.segments_per_checkpoint(T // model.segment) == cms["checkpoint_segments"]
    assert model.segments_aligned
    tokens = jax.random.randint(jax.random.key(seed), (2, T), 0, V)
    seg_w, final_w = brute_force(model, tokens)

    logits, states = nnx.jit(lambda m, t: m.forward_ntp(t))(model, tokens)
    ref = jax.jit(lambda sw: reference_logits(model, tokens, sw))(seg_w)
    _close(logits, ref, 2e-4)
    _close(ContinuumMemory.fast_weights(states[1]), final_w, 2e-4)
    # the updates matter: reading the initial weights everywhere gives other logits
    static = jax.jit(lambda sw: reference_logits(model, tokens, sw))(
        jax.tree.map(lambda a: a[:1].repeat(a.shape[0], 0), seg_w)
    )
    assert float(jnp.abs(static - ref).max()) > 1e-3, seed

    # outer gradient, first order: W_p = W_0(params) + constant update
    graphdef, params = nnx.split(model, nnx.Param)
    deltas = jax.tree.map(lambda a: a - a[:1], seg_w)

    def loss_model(p):
        return _ce(nnx.merge(graphdef, p, copy=True)(tokens), tokens).mean()

    def loss_ref(p):
        m = nnx.merge(graphdef, p, copy=True)
        w0 = ContinuumMemory.fast_weights(m.blocks.init_state(tokens.shape[0], T)[1])
        sw = jax.tree.map(lambda a, d: a[None] + d, w0, deltas)
        return _ce(reference_logits(m, tokens, sw), tokens).mean()

    g_model = jax.jit(jax.grad(loss_model))(params)
    g_ref = jax.jit(jax.grad(loss_ref))(params)
    _close(g_model, g_ref, 2e-4)
    cms_init = g_model["blocks"]["layers"]["cms"]["levels"][0]["mlp"]["gate"]["kernel"][...]
    assert float(jnp.abs(cms_init).max()) > 0  # the meta-learned init gets an outer gradient


def _unrolled_training_hlo():
    """(config, batch size, compiled HLO) of the ntp training gradient in hope_tiny's layout: a
    small HOPE with unrolled layers and the plain segment scan."""
    cfg = small_cfg("hope", 2, scan_layers=False, checkpoint_segments=1)
    model = build_model(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jax.random.randint(jax.random.key(0), (2, T), 0, V)

    def loss(p):
        return _ce(nnx.merge(graphdef, p, copy=True)(tokens), tokens).mean()

    return cfg, tokens.shape[0], jax.jit(jax.grad(loss)).lower(params).compile().as_text()


def test_the_backward_keeps_no_boundary_mask_of_the_fast_weights_size():
    """Every layer is at the same token position, so each CMS boundary's select keeps one scalar
    predicate for the backward, not a mask of a layer's fast weights per segment; and the fastest
    level (period = the segment) updates at every segment without a select."""
    cfg, _, hlo = _unrolled_training_hlo()
    loops = [line.split(" while(")[0] for line in hlo.splitlines() if " while(" in line]
    assert loops  # the segment scan's forward and backward
    d = cfg.d_model
    weights = {dims for h in cfg.cms.hidden for dims in (f"{d},{h}", f"{h},{d}")}  # gate / up, down
    carried = {m for line in loops for m in re.findall(r"pred\[([\d,]+)\]", line)}  # what a loop keeps
    assert not {m for m in carried if ",".join(m.split(",")[-2:]) in weights}, carried


def test_the_segment_loop_copies_no_carried_fast_weights():
    """The boundary steps run at the start of the next segment, so the weights a segment saves for
    the backward are the ones the scan carries out, and XLA updates the carried CMS weights in place:
    no copy of a layer's fast weights in the training step's loops (hope_tiny's layout: unrolled
    layers, each layer's states carried apart)."""
    cfg, batch, hlo = _unrolled_training_hlo()
    bodies = {name.lstrip("%") for name in re.findall(r"body=(%?[\w.\-]+)", hlo)}
    assert bodies  # the segment scan's forward and backward
    d, b, n = cfg.d_model, batch, cfg.num_layers
    weights = {f"{b},{a},{c}" for h in cfg.cms.hidden for a, c in ((d, h), (h, d))}
    weights |= {f"{n},{w}" for w in weights}  # one layer's, or the layers' stacked
    computations = re.split(r"\n(?=%?[\w.\-]+ \(|ENTRY )", hlo)
    copied = [
        dims
        for c in computations
        if c.split(" ", 1)[0].lstrip("%") in bodies
        for dims in re.findall(r"= f32\[([\d,]+)\]\S* copy\(", c)
    ]
    assert not [m for m in copied if m in weights], copied
