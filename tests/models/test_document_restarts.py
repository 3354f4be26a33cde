"""Document restarts of the chunked fast-weight memories (data.document_boundaries="reset" for
titans, ttt and hope): a packed row whose documents start on the memories' chunk grid gives the
logits, and the gradients, that its documents give apart; documents starting off the grid are
rejected with one error line, eagerly and under jit.

Parameters and tokens come from a fresh seed per run (NL_JAX_TEST_SEED replays one; it is in every
failure message).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import configs
from nl_jax.memory import ops
from nl_jax.models import build_model
from tests.memory.inputs import fresh_seed, make_inputs
from tests.models.test_document_boundaries import _jitted, _packed, assert_packed_equals_apart

# Document lengths per row (24 tokens): every document starts on a grid of 4 tokens, and the
# first row's second document spans several chunks.
ROWS4 = ((8, 16), (4, 12, 8))
ROWS8 = ((8, 16), (8, 8, 8))  # on a grid of 8 (MAC segments)


@pytest.mark.parametrize("structure", ["mlp", "linear"])
def test_chunked_restart_equals_pieces_run_apart(structure):
    """The op itself: memory_chunked with restarts (row 0 at 8, row 1 at 4 and 12; chunks of 4)
    gives the outputs and the gradient wrt the initial state of each piece run alone from it."""
    seed = fresh_seed()
    spec = ops.MemorySpec(structure, "l2", "silu")
    state, q, k, v, rates = make_inputs(seed, spec, length=16)
    starts = {0: (0, 8), 1: (0, 4, 12)}
    restart = np.zeros((2, 16), bool)
    for row, s in starts.items():
        restart[row, list(s[1:])] = True
    kw = dict(chunk_size=4, read="per_token")
    cot = jax.random.normal(jax.random.key(seed + 1), q.shape)

    def packed(w):
        init = ops.init_state(w, momentum=True)
        restarts = dict(restart=jnp.asarray(restart), initial=init)
        y, _ = ops.memory_chunked(spec, init, q, k, v, rates, **restarts, **kw)
        return jnp.sum(y * cot), y

    (_, y), g = jax.value_and_grad(packed, has_aux=True)(state.weights)
    total = jax.tree.map(jnp.zeros_like, g)
    for row, s in starts.items():
        for a, b in zip(s, (*s[1:], 16)):
            piece = lambda x, a=a, b=b, row=row: x[row : row + 1, a:b]  # noqa: E731
            one = jax.tree.map(lambda w, row=row: w[row : row + 1], state.weights)

            def alone(w, piece=piece):
                init = ops.init_state(w, momentum=True)
                inputs = (*map(piece, (q, k, v)), jax.tree.map(piece, rates))
                ya, _ = ops.memory_chunked(spec, init, *inputs, **kw)
                return jnp.sum(ya * piece(cot)), ya

            (_, ya), ga = jax.value_and_grad(alone, has_aux=True)(one)
            np.testing.assert_allclose(piece(y), ya, rtol=1e-5, atol=1e-6, err_msg=f"seed {seed}")
            total = jax.tree.map(lambda t, x, row=row: t.at[row].add(x[0]), total, ga)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(total)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=f"seed {seed}")


def _titans_cfg(variant):
    cfg = configs.load("titans_tiny").model
    cfg.update(vocab_size=64, d_model=32, num_layers=2, num_heads=2, mlp_hidden=64, sliding_window=3)
    cfg.titans.update(variant=variant, segment_size=8, persistent_tokens=2)
    cfg.titans.memory.update(chunk_size=4)
    return cfg


@pytest.mark.parametrize("variant", ["lmm", "mag", "mal", "mac"])
def test_titans_reset_packed_equals_apart(variant):
    seed = fresh_seed()
    model = build_model(_titans_cfg(variant), nnx.Rngs(seed))
    assert_packed_equals_apart(_jitted(model), seed, 64, ROWS8 if variant == "mac" else ROWS4)


def assert_gradients_packed_equal_apart(model, seed, vocab, rows, **kwargs):
    """d/dparams of <logits, G> over a packed row equals the sum over its documents run apart
    (the restarts hand the outer gradient to the initial memories at every document)."""
    tokens, segments = _packed(seed, vocab, rows)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    cot = jax.random.normal(jax.random.key(seed + 1), (*tokens.shape, vocab))

    @jax.jit
    def grad(p, tok, seg, ct):
        def f(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            logits = m(tok, segment_ids=seg, **kwargs) if seg is not None else m(tok, **kwargs)
            return jnp.sum(logits * ct)

        return jax.grad(f)(p)

    packed = grad(params, tokens, segments, cot)
    apart = jax.tree.map(jnp.zeros_like, packed)
    for row, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            sl = slice(start, start + n)
            g = grad(params, tokens[row : row + 1, sl], None, cot[row : row + 1, sl])
            apart = jax.tree.map(jnp.add, apart, g)
            start += n
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(packed), jax.tree.leaves(apart)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"seed {seed} {path}")


@pytest.mark.parametrize("variant", ["lmm", "mac"])
def test_titans_reset_gradients(variant):
    seed = fresh_seed()
    model = build_model(_titans_cfg(variant), nnx.Rngs(seed))
    assert_gradients_packed_equal_apart(model, seed, 64, ROWS8 if variant == "mac" else ROWS4)


def test_titans_documents_off_the_chunk_grid_are_rejected():
    seed = fresh_seed()
    model = build_model(_titans_cfg("lmm"), nnx.Rngs(seed))
    tokens, segments = _packed(seed, 64, ((6, 18), (4, 12, 8)))  # a document starts at 6
    message = "a document starts at position 6: pad documents to multiples of 4 tokens"
    with pytest.raises(ValueError, match=message):
        model(tokens, segment_ids=segments)
    with pytest.raises(Exception, match=message):  # traced: the host check stops the computation
        jax.block_until_ready(_jitted(model)(tokens, segments))
    mac = build_model(_titans_cfg("mac"), nnx.Rngs(seed))
    with pytest.raises(ValueError, match="multiples of 8 tokens"):
        mac(*_packed(seed, 64, ROWS4))


def _hope_cfg(name, signal, **cms):
    cfg = configs.load(f"{name}_tiny").model
    cfg.update(vocab_size=64, d_model=32, num_layers=2)
    if name == "hope":
        cfg.memory.update(num_heads=2, head_dim=16, chunk_size=4, memory_chunk_size=8)
    else:
        cfg.update(num_heads=4, num_kv_heads=2)
    # inner lr 0: the CMS levels (not restarted at documents, see nl_jax/models/hope.py) stay fixed,
    # so the comparison isolates the mixer; segments of 8 lie on both memory grids
    cfg.cms.update(periods=(8, 16), hidden=(48, 48), inner_lr=(0.0, 0.0), signal=signal)
    cfg.cms.update(cms)
    return cfg


# ntp segments of 8 (documents start at segments' starts) or 16 (also inside a segment), checkpointed
# chunks of segments, and the training path of the other signals
HOPE_CASES = [
    ("ntp", {}),
    ("ntp", {"periods": (16, 32)}),
    ("ntp", {"checkpoint_segments": 3}),
    ("none", {}),
    ("local", {}),
]


@pytest.mark.parametrize("signal,cms", HOPE_CASES)
def test_hope_reset_packed_equals_apart(signal, cms):
    seed = fresh_seed()
    model = build_model(_hope_cfg("hope", signal, **cms), nnx.Rngs(seed))
    assert_packed_equals_apart(_jitted(model), seed, 64, ROWS8)


@pytest.mark.parametrize("signal", ["ntp", "none"])
def test_hope_reset_gradients(signal):
    seed = fresh_seed()
    model = build_model(_hope_cfg("hope", signal), nnx.Rngs(seed))
    assert_gradients_packed_equal_apart(model, seed, 64, ROWS8)


def test_hope_documents_off_the_chunk_grids_are_rejected():
    seed = fresh_seed()
    model = build_model(_hope_cfg("hope", "ntp"), nnx.Rngs(seed))
    with pytest.raises(ValueError, match="a document starts at position 4: pad documents to multiples of 8"):
        model(*_packed(seed, 64, ROWS4)[:1], segment_ids=_packed(seed, 64, ROWS4)[1])


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("signal,cms", HOPE_CASES)
def test_hope_attention_mask_packed_equals_apart(signal, cms, window):
    """Documents anywhere (the default rows): attention masked on the training path and, for the
    ntp signal, on the segment scan's KV cache (window 5: a ring buffer shorter than the row)."""
    from tests.models.test_document_boundaries import ROWS

    seed = fresh_seed()
    cfg = _hope_cfg("hope_attention", signal, **cms)
    cfg.sliding_window = window
    model = build_model(cfg, nnx.Rngs(seed))
    assert_packed_equals_apart(_jitted(model), seed, 64, ROWS)


def _ttt_cfg(layer):
    cfg = configs.load("ttt_tiny").model
    cfg.update(vocab_size=64, d_model=32, num_layers=2, num_heads=2, mlp_hidden=64, ttt_layer=layer)
    cfg.update(mini_batch_size=4)
    return cfg


@pytest.mark.parametrize("layer", ["linear", "mlp"])
def test_ttt_reset_packed_equals_apart(layer):
    seed = fresh_seed()
    model = build_model(_ttt_cfg(layer), nnx.Rngs(seed))
    assert_packed_equals_apart(_jitted(model), seed, 64, ROWS4)


def test_ttt_reset_gradients():
    seed = fresh_seed()
    model = build_model(_ttt_cfg("mlp"), nnx.Rngs(seed))
    assert_gradients_packed_equal_apart(model, seed, 64, ROWS4)


def test_ttt_documents_off_the_mini_batches_are_rejected():
    seed = fresh_seed()
    model = build_model(_ttt_cfg("linear"), nnx.Rngs(seed))
    tokens, segments = _packed(seed, 64, ((9, 15), (4, 12, 8)))
    with pytest.raises(ValueError, match="a document starts at position 9: pad documents to multiples of 4"):
        model(tokens, segment_ids=segments)
    with pytest.raises(ValueError, match="need the chunked training forward"):
        model(*_packed(seed, 64, ROWS4)[:1], form="naive", segment_ids=_packed(seed, 64, ROWS4)[1])


@pytest.mark.parametrize("name", ["retnet", "deltanet", "gated_deltanet"])
def test_linear_forward_with_state_takes_segment_ids(name):
    """Streaming a packed row in two blocks (the second starting inside a document) with segment ids
    gives the training forward's logits with them; models without the support reject them."""
    from tests.models.test_document_boundaries import _linear_cfg

    seed = fresh_seed()
    cfg = _linear_cfg(name)
    model = build_model(cfg, nnx.Rngs(seed))
    tokens, segments = _packed(seed, cfg.vocab_size)  # documents start at 9, 5 and 16
    full = model(tokens, segment_ids=segments)
    step = jax.jit(lambda t, st, s: model.forward_with_state(t, st, segment_ids=s))
    state = model.init_decode_state(tokens.shape[0])
    first, state = step(tokens[:, :12], state, segments[:, :12])
    second, _ = step(tokens[:, 12:], state, segments[:, 12:])
    np.testing.assert_allclose(
        jnp.concatenate([first, second], axis=1), full, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}"
    )
    ttt = build_model(_ttt_cfg("linear"), nnx.Rngs(seed))
    with pytest.raises(ValueError, match="TTT.forward_with_state takes no segment ids"):
        ttt.forward_with_state(tokens, ttt.init_decode_state(2), segment_ids=segments)


class _Apply:
    """A built model behind the `apply(params, tokens, segment_ids)` surface the train step reads."""

    def __init__(self, model):
        self.model = model

    def apply(self, params, tokens, segment_ids=None):
        del params
        return self.model(tokens, segment_ids=segment_ids) if segment_ids is not None else self.model(tokens)


def _aligned_row(seed, vocab, grid):
    """One packed window (the trainer's batch of one row) of two documents in the aligned layout
    (data.document_alignment = grid) and the documents: random lengths off the grid, so pads lie
    between them, and a third document filling the window's last target."""
    from nl_jax.data import packing, pipeline

    rng = np.random.default_rng(seed)
    lengths = [int(rng.integers(grid + 1, 2 * grid - 1)), int(rng.integers(1, grid - 1)), 3 * grid]
    docs = [rng.integers(3, vocab, size=n).astype(np.int32) for n in lengths]  # 0 pad, 2 EOS
    stream = packing.pack_documents(docs, EOS, grid, PAD)
    seq_len = 3 * grid if lengths[0] + 1 <= 2 * grid else 4 * grid
    batch = pipeline.as_batch(stream[None, : seq_len + 1], EOS, PAD)
    return batch, docs[:2], seq_len


EOS, PAD = 2, 0  # the byte tokenizer's


def assert_aligned_row_equals_apart(model, seed, vocab, grid):
    """"reset" on an aligned row runs and gives each document's logits alone; pads weigh 0."""
    from nl_jax.data import packing
    from nl_jax.train.step import make_loss_fn, token_nll

    batch, docs, seq_len = _aligned_row(seed, vocab, grid)
    tokens, segments = jnp.asarray(batch["tokens"][:, :-1]), jnp.asarray(batch["segment_ids"][:, :-1])
    packed = np.asarray(_jitted(model)(tokens, segments))[0]
    start = 0
    for doc in docs:
        # alone with its own trailing pads (whole chunks): they follow its tokens, so change none
        padded = jnp.asarray(packing.aligned_document(doc, EOS, grid, PAD))[None]
        alone = np.asarray(model(padded))[0, : len(doc) + 1]
        np.testing.assert_allclose(
            packed[start : start + len(doc) + 1], alone, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}"
        )
        start = -(-(start + len(doc) + 1) // grid) * grid
    targets = jnp.asarray(batch["tokens"][:, 1:])
    real = np.asarray(targets) != PAD
    assert (~real).any() and batch["weights"].shape == (1, seq_len)
    loss = make_loss_fn(_Apply(model))(None, {k: jnp.asarray(v) for k, v in batch.items()})
    nll = np.asarray(token_nll(jnp.asarray(packed)[None], targets))
    np.testing.assert_allclose(loss, nll[real].mean(), rtol=1e-5, err_msg=f"seed {seed}")
    # the weights drop the pads' targets and nothing else: with all-one weights they count again
    np.testing.assert_array_equal(np.asarray(batch["weights"]) != 0, real)
    unweighted = {k: jnp.asarray(v) for k, v in batch.items()} | {"weights": jnp.ones((1, seq_len))}
    np.testing.assert_allclose(make_loss_fn(_Apply(model))(None, unweighted), nll.mean(), rtol=1e-5)


@pytest.mark.parametrize("variant", ["lmm", "mac"])
def test_titans_reset_on_aligned_rows(variant):
    seed = fresh_seed()
    model = build_model(_titans_cfg(variant), nnx.Rngs(seed))
    assert_aligned_row_equals_apart(model, seed, 64, model.document_multiple)


def test_ttt_and_hope_reset_on_aligned_rows():
    seed = fresh_seed()
    for model in (
        build_model(_ttt_cfg("mlp"), nnx.Rngs(seed)),
        build_model(_hope_cfg("hope", "ntp"), nnx.Rngs(seed)),
    ):
        assert_aligned_row_equals_apart(model, seed, 64, model.document_multiple)


def test_reset_needs_an_alignment_on_the_chunk_grid():
    from nl_jax.models.registry import check_document_alignment

    cfg = _titans_cfg("mac")
    for alignment in (0, 4, 12):
        with pytest.raises(ValueError, match="set data.document_alignment to a multiple of 8$"):
            check_document_alignment(cfg, "reset", alignment)
    check_document_alignment(cfg, "reset", 16)
    check_document_alignment(cfg, "ignore", 0)


def _silence_memories(model):
    """Zero every memory's output map and MAC's retrieval output: the memories then pass nothing
    on, so what crosses a document boundary under "mask" could only be attention."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def zero(path, x):
        keys = [str(getattr(p, "key", p)) for p in path]
        silenced = ("memory" in keys and "out_proj" in keys) or "retrieve_out" in keys
        return jnp.zeros_like(x) if silenced else x

    params = jax.tree_util.tree_map_with_path(zero, params)
    return nnx.merge(graphdef, params, rest)


@pytest.mark.parametrize("variant", ["mag", "mal", "mac"])
def test_titans_mask_keeps_attention_within_documents(variant):
    """ "mask" (restart=False): documents off the chunk grid are accepted (MAG, MAL); with the memories
    silenced, each document's logits are its logits alone, so attention does not cross; with them
    live, a later document differs from "reset" (the memories carry over)."""
    from tests.models.test_document_boundaries import ROWS

    seed = fresh_seed()
    model = build_model(_titans_cfg(variant), nnx.Rngs(seed))
    quiet = _silence_memories(model)
    grid = quiet.document_multiple

    def forward(tokens, segments):
        if segments is not None:
            return quiet(tokens, segment_ids=segments, restart=False)
        n = tokens.shape[1]  # alone: filled up to whole MAC segments; the filling follows the document
        filled = jnp.pad(tokens, ((0, 0), (0, -n % grid)), constant_values=3)
        return quiet(filled)[:, :n]

    # MAC's segments are its attention spans: a document off their grid is cut where it is not
    # alone, so there packed = apart holds for documents on the segment grid only
    assert_packed_equals_apart(forward, seed, 64, ROWS8 if variant == "mac" else ROWS)
    tokens, segments = _packed(seed, 64, ROWS8)
    masked = np.asarray(jax.jit(lambda t, s: model(t, segment_ids=s, restart=False))(tokens, segments))
    reset = np.asarray(_jitted(model)(tokens, segments))
    np.testing.assert_allclose(masked[:, :8], reset[:, :8], rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
    assert np.abs(masked[:, 8:] - reset[:, 8:]).max() > 1e-4, f"seed {seed}"


def test_titans_mode_reaches_the_model_through_model_fn():
    """The trainer's ModelFn hands "mask" as restart=False and "reset" as restart=True."""
    from nl_jax.train.state import ModelFn

    seed = fresh_seed()
    cfg = _titans_cfg("mag")
    tokens, segments = _packed(seed, 64, ROWS4)
    model = build_model(cfg, nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param).to_pure_dict()
    for mode, restart in (("mask", False), ("reset", True)):
        fn = ModelFn.from_config(cfg, seed=seed, documents=mode)
        np.testing.assert_allclose(
            fn.apply(params, tokens, segments),
            model(tokens, segment_ids=segments, restart=restart),
            rtol=1e-5,
            atol=1e-5,
            err_msg=f"seed {seed} {mode}",
        )


@pytest.mark.parametrize("variant", ["mag", "mal"])
@pytest.mark.parametrize("mode", ["mask", "reset"])
def test_titans_decoding_with_segment_ids_equals_the_training_forward(variant, mode):
    """MAG / MAL decoded token by token with segment ids (KV caches keeping each slot's document,
    rotary positions from the document's start; under "reset" the memories restart) give the
    training forward's logits in the same mode. "mask" takes documents anywhere."""
    from tests.models.test_document_boundaries import ROWS, T

    seed = fresh_seed()
    model = build_model(_titans_cfg(variant), nnx.Rngs(seed))
    restart = mode == "reset"
    tokens, segments = _packed(seed, 64, ROWS4 if restart else ROWS)
    full = model(tokens, segment_ids=segments, restart=restart)
    step = jax.jit(lambda t, st, s: model.decode_step(t, st, segment_ids=s, restart=restart))
    state = model.init_decode_state(tokens.shape[0], T, documents=True)
    logits = []
    for i in range(T):
        out, state = step(tokens[:, i], state, segments[:, i])
        logits.append(out)
    close = dict(rtol=1e-4, atol=1e-4, err_msg=f"seed {seed}")
    np.testing.assert_allclose(jnp.stack(logits, axis=1), full, **close)
