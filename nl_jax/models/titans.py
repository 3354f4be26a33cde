"""Titans (Behrouz et al. 2025): the neural long-term memory alone (LMM) and its three hybrids with
attention, MAC, MAG and MAL (Titans, Sections 3-4). One registered model, `titans`; the variant is
`model.titans.variant`. Every block is pre-norm with residuals and ends in a SwiGLU MLP:

  lmm  h = x + LMM(Norm(x))
  mac  per segment of `segment_size` tokens, with xn = Norm(x) and M the memory at the segment start:
         r = M(q(xn))                              retrieve: one memory token per segment token
         y = Attn(xn | keys [persistent || r || xn])   causal inside the segment (query j sees r_i, xn_i
                                                   for i <= j, and every persistent token)
         m = LMM(Norm(y))                          the memory learns from y (its update) and reads M*(y)
         h = x + W_o(Norm(y) * sigmoid(Norm(m)))   the paper's y (x) M*(y)
  mag  h = x + W_o(Norm(a) * sigmoid(Norm(m)))  with a = SWA(xn | [persistent || xn]), m = LMM(xn)
  mal  g = x + LMM(Norm(x));  h = g + SWA(Norm(g) | [persistent || Norm(g)])
  all  y = h + SwiGLU(Norm(h))

LMM is `nl_jax.mixers.titans.NeuralMemory` (its own output norm and SiLU gate, Titans 4.4).
Persistent memory: `persistent_tokens` learnable vectors prepended to the attention input; they are
projected by the attention's own W_K / W_V, take no rotary position, and every query sees them (also
past the sliding window). MAC's segments double as its attention span, so its attention costs
O(T * segment) and its decode cache holds one segment.

Packed rows (segment ids given): attention stays within the document (MAG / MAL windows, their
rotary positions counted from the document's first token; MAC's keys: query j sees r_i and x_i only
for tokens i of its own document, and the persistent tokens always, as they belong to no document).
With `data.document_boundaries`="reset" (the forward's `restart=True`, the default) every memory
also restarts from its meta-learned initial weights at each document's first token and its short
convs stop at the boundary, so a packed row gives the logits its documents give apart. The chunked
memory takes every gradient of a chunk at the chunk's start state, so a restart must start a chunk:
documents must start at multiples of the memory chunk_size (MAC: of segment_size, since its
segments are also its attention spans and its retrieval points); the forward checks that
(`document_multiple`; data.document_alignment lays documents on that grid). With "mask"
(`restart=False`) only attention is masked: the memories and their convs run across documents, as
with "ignore", and documents may start anywhere (LMM, without attention, is then "ignore"; MAC's
segments stay its attention spans, so a document starting inside one sees the tokens of its own
document in that segment only). Decoding takes segment ids too (`init_decode_state(...,
documents=True)`; not MAC): LMM restarts the rows that start a document, MAG / MAL mask their KV
caches by document, count rotary positions from the document's start and, with `restart`, restart
the memories.

Config: the Transformer++ fields (vocab_size, d_model, num_layers, num_heads, num_kv_heads, head_dim,
mlp_hidden, rope_theta, sliding_window (MAG / MAL attention window; 0 = full causal), tie_embeddings,
norm_eps, dtype, param_dtype, scan_layers, remat_policy, init_std) plus a `titans` section, see
experiments/configs/titans_base.py: variant, segment_size, persistent_tokens and `memory` (num_heads,
head_dim, structure, hidden, activation, chunk_size, read, momentum, objective, retention,
simplex_scale, max_lr, conv_width, remat_chunks, form, impl). The same LMM shell, with other memory
settings, is the `dla` (objective 'dot', nl_jax/models/dla.py) and `memora` (retention 'kl',
nl_jax/models/memora.py) models.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.layers import Linear, RMSNorm, SwiGLU, to_dtype
from nl_jax.memory import ops
from nl_jax.memory.ops.chunked import restart_where
from nl_jax.metrics.profiler import part
from nl_jax.mixers import (
    KVCache,
    attention_dims,
)
from nl_jax.mixers.front_end import l2_normalize
from nl_jax.mixers.memora import MemoraMemory
from nl_jax.mixers.persistent_attention import PersistentAttention
from nl_jax.mixers.titans import NeuralMemory, NeuralMemoryState
from nl_jax.models.lm import RESIDUAL, CausalLM
from nl_jax.models.registry import register
from nl_jax.parallel.rules import constrain

VARIANTS = ("lmm", "mac", "mag", "mal")


def check_variant(cfg) -> str:
    variant = cfg.titans.variant
    if variant not in VARIANTS:
        raise ValueError(f"unknown titans variant {variant!r}; choose one of {VARIANTS}")
    return variant


def memory_dims(cfg) -> tuple[int, int, int]:
    """(heads, head_dim, hidden) of the neural memory, with the 0 = default conventions resolved."""
    mem = cfg.titans.memory
    heads = mem.num_heads or cfg.num_heads
    head_dim = mem.head_dim or cfg.d_model // heads
    return heads, head_dim, mem.hidden or head_dim


def _kw(cfg, rngs):
    return dict(
        init_std=cfg.init_std, dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype), rngs=rngs
    )


def _norm(cfg, dim=None):
    return RMSNorm(dim or cfg.d_model, eps=cfg.norm_eps, param_dtype=to_dtype(cfg.param_dtype))


RETENTIONS = ("l2", "kl")  # Titans' weight decay | Memora's KL divergence (nl_jax/mixers/memora.py)


def _memory(cfg, rngs) -> NeuralMemory:
    mem = cfg.titans.memory
    heads, head_dim, hidden = memory_dims(cfg)
    kwargs = dict(
        structure=mem.structure,
        hidden=hidden,
        activation=mem.activation,
        chunk_size=mem.chunk_size,
        read=mem.read,
        max_lr=mem.max_lr,
        conv_width=mem.conv_width,
        remat_chunks=mem.remat_chunks,
        form=mem.form,
        impl=mem.get("impl", "xla"),  # configs saved before the field existed
        **_kw(cfg, rngs),
    )
    retention = mem.get("retention", "l2")  # configs saved before the field existed
    if retention not in RETENTIONS:
        raise ValueError(f"titans.memory.retention must be one of {RETENTIONS}, got {retention!r}")
    if retention == "kl":
        if cfg.titans.variant != "lmm" or mem.get("objective", "l2") != "l2" or mem.momentum:
            raise ValueError(
                "titans.memory.retention='kl' (Memora) runs in the lmm variant with objective='l2' and "
                "momentum=False; set those, or retention='l2'"
            )
        return MemoraMemory(cfg.d_model, heads, head_dim, scale=mem.simplex_scale, **kwargs)
    return NeuralMemory(
        cfg.d_model,
        heads,
        head_dim,
        momentum=mem.momentum,
        objective=mem.get("objective", "l2"),
        **kwargs,
    )


def _restarts(segment_ids, restart: bool):
    """The segment ids a memory restarts at: none under "mask" (`restart` False)."""
    return segment_ids if restart else None


class _MLPOut(nnx.Module):
    """y = h + SwiGLU(Norm(h)), the second half of every block."""

    def __init__(self, cfg, *, rngs):
        self.mlp_norm = _norm(cfg)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden, **_kw(cfg, rngs))

    def __call__(self, h):
        with part("mlp"):
            return constrain(h + self.mlp(self.mlp_norm(h)), RESIDUAL)


class _Gate(nnx.Module):
    """W_o(Norm(y) * sigmoid(Norm(m))): the MAC / MAG combination of attention and memory outputs
    (learnable vector-valued normalisation, then a non-linearity on the memory branch)."""

    def __init__(self, cfg, *, rngs):
        self.y_norm, self.m_norm = _norm(cfg), _norm(cfg)
        self.out = Linear((cfg.d_model,), (cfg.d_model,), ("embed",), ("embed",), **_kw(cfg, rngs))

    def __call__(self, y, m):
        return self.out(self.y_norm(y) * jax.nn.sigmoid(self.m_norm(m)))


class LMMBlock(nnx.Module):
    def __init__(self, cfg, *, rngs):
        self.mem_norm, self.memory = _norm(cfg), _memory(cfg, rngs)
        self.out = _MLPOut(cfg, rngs=rngs)

    def init_state(self, batch_size: int, max_len: int | None = None):
        return self.memory.init_state(batch_size)

    def __call__(self, x, state=None, segment_ids=None, restart=True):
        m, state = self.memory(self.mem_norm(x), state, _restarts(segment_ids, restart))
        return self.out(x + m), state


class MAGBlock(nnx.Module):
    def __init__(self, cfg, *, rngs):
        self.norm, self.memory = _norm(cfg), _memory(cfg, rngs)
        self.attn = PersistentAttention(cfg, cfg.sliding_window, rngs=rngs)
        self.gate, self.out = _Gate(cfg, rngs=rngs), _MLPOut(cfg, rngs=rngs)

    def init_state(self, batch_size: int, max_len: int | None = None, documents: bool = False):
        return self.attn.init_cache(batch_size, max_len, documents), self.memory.init_state(batch_size)

    def __call__(self, x, state=None, segment_ids=None, restart=True, document_pos=None):
        xn = self.norm(x)
        if state is None:
            a, (m, _) = self.attn(xn, segment_ids), self.memory(xn, None, _restarts(segment_ids, restart))
        else:
            a, cache = self.attn.decode(xn, state[0], segment_ids, document_pos)
            m, mem = self.memory(xn, state[1])
            state = (cache, mem)
        return self.out(x + self.gate(a, m)), state


class MALBlock(nnx.Module):
    def __init__(self, cfg, *, rngs):
        self.mem_norm, self.memory = _norm(cfg), _memory(cfg, rngs)
        self.attn_norm = _norm(cfg)
        self.attn = PersistentAttention(cfg, cfg.sliding_window, rngs=rngs)
        self.out = _MLPOut(cfg, rngs=rngs)

    def init_state(self, batch_size: int, max_len: int | None = None, documents: bool = False):
        return self.attn.init_cache(batch_size, max_len, documents), self.memory.init_state(batch_size)

    def __call__(self, x, state=None, segment_ids=None, restart=True, document_pos=None):
        if state is None:
            g = x + self.memory(self.mem_norm(x), None, _restarts(segment_ids, restart))[0]
            return self.out(g + self.attn(self.attn_norm(g), segment_ids)), None
        m, mem = self.memory(self.mem_norm(x), state[1])
        g = x + m
        a, cache = self.attn.decode(self.attn_norm(g), state[0], segment_ids, document_pos)
        return self.out(g + a), (cache, mem)


class MACState(NamedTuple):
    """Decode state of one MAC layer."""

    memory: NeuralMemoryState
    segment_weights: ops.MLPWeights | ops.LinearWeights  # the memory at the start of the segment
    cache: KVCache  # keys / values of the current segment (retrieved tokens and inputs)


class MACBlock(nnx.Module):
    def __init__(self, cfg, *, rngs):
        self.segment_size = cfg.titans.segment_size
        chunk = cfg.titans.memory.chunk_size
        if self.segment_size % chunk:
            raise ValueError(
                f"titans segment_size {self.segment_size} must be a multiple of the memory chunk_size {chunk}"
            )
        kw = _kw(cfg, rngs)
        heads, head_dim, _ = memory_dims(cfg)
        self.norm, self.memory = _norm(cfg), _memory(cfg, rngs)
        self.mem_norm = _norm(cfg)  # the memory learns from Norm(y): bounded inputs keep its inner GD stable
        # Retrieval r = M(q): its own query projection and output map (norm per head, then W).
        self.retrieve_q = Linear((cfg.d_model,), (heads, head_dim), ("embed",), ("heads", "head_dim"), **kw)
        self.retrieve_norm = RMSNorm(head_dim, names=("head_dim",), param_dtype=kw["param_dtype"])
        self.retrieve_out = Linear((heads, head_dim), (cfg.d_model,), ("heads", "head_dim"), ("embed",), **kw)
        self.attn = PersistentAttention(cfg, 0, rngs=rngs)
        self.gate, self.out = _Gate(cfg, rngs=rngs), _MLPOut(cfg, rngs=rngs)

    def _retrieve(self, x, weights):
        """x [B, S, d_model], memory weights [B, H, O, I] -> r [B, S, d_model] (no update)."""
        q = l2_normalize(jax.nn.silu(self.retrieve_q(x)).astype(jnp.float32))
        r = ops.apply(self.memory.spec, weights, jnp.swapaxes(q, 1, 2))  # [B, H, S, D]
        return self.retrieve_out(self.retrieve_norm(jnp.swapaxes(r, 1, 2).astype(x.dtype)))

    def init_state(self, batch_size: int, max_len: int | None = None) -> MACState:
        mem = self.memory.init_state(batch_size)
        return MACState(mem, mem.memory.weights, self.attn.init_segment_cache(batch_size, self.segment_size))

    def __call__(self, x, state: MACState | None = None, segment_ids=None, restart=True):
        xn = self.norm(x)
        if state is None:
            y, m = self._segments(xn, segment_ids, restart)
        else:
            j = state.cache.pos % self.segment_size
            start = j == 0  # the memory sits at a chunk boundary there: its weights start the segment
            seg_w = jax.tree.map(
                lambda a, b: jnp.where(start, a, b), state.memory.memory.weights, state.segment_weights
            )
            y, cache = self.attn.segment_decode(self._retrieve(xn, seg_w), xn, state.cache, j)
            m, mem = self.memory(self.mem_norm(y), state.memory)
            state = MACState(mem, seg_w, cache)
        return self.out(x + self.gate(y, m)), state

    def _segments(self, xn, segment_ids=None, restart_memory=True):
        b, t, d = xn.shape
        s = self.segment_size
        if t % s:
            raise ValueError(f"titans segment_size {s} does not divide the sequence length {t}")
        init = self.memory.init_state(b)

        def restart(mem, first):
            """Rows whose segment starts a document take the initial memory and conv tails."""
            fields = ("weights", "momentum", "boundary")
            new = {f: restart_where(first, getattr(init.memory, f), getattr(mem.memory, f)) for f in fields}
            return NeuralMemoryState(restart_where(first, init.conv, mem.conv), mem.memory._replace(**new))

        def body(mem, inputs):
            x_seg, seg = inputs
            if seg is not None:
                if restart_memory:  # documents start only at segments' starts (checked by the model)
                    mem = restart(mem, seg[:, 0] != seg[:, 1])
                seg = seg[:, 1:]  # the ids of the segment (one token of left context dropped)
            y = self.attn.segment(self._retrieve(x_seg, mem.memory.weights), x_seg, seg)
            m, mem = self.memory.forward(self.mem_norm(y), mem)  # the update learns from the attention output
            return mem, (y, m)

        to_segments = lambda a: jnp.moveaxis(a.reshape(b, t // s, s, *a.shape[2:]), 1, 0)  # noqa: E731
        segs = None
        if segment_ids is not None:  # each segment's ids with the id of the token before it
            prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
            segs = jnp.concatenate([to_segments(prev)[..., :1], to_segments(segment_ids)], axis=-1)
        _, (y, m) = jax.lax.scan(body, init, (to_segments(xn), segs))
        merge = lambda z: jnp.moveaxis(z, 0, 1).reshape(b, t, d)  # noqa: E731
        return merge(y), merge(m)


_BLOCKS = {"lmm": LMMBlock, "mac": MACBlock, "mag": MAGBlock, "mal": MALBlock}


@register("titans")
class Titans(CausalLM):
    """Titans LMM / MAC / MAG / MAL language model (`model.titans.variant`). Decoding MAG / MAL with
    full attention (sliding_window=0) needs max_len; each layer's memory starts from its own
    meta-learned initial weights."""

    document_boundaries = ("ignore", "mask", "reset")
    mask_carries_memory = True  # "mask" is the forward's restart=False (module docstring)

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        variant = check_variant(cfg)
        block = _BLOCKS[variant]
        super().__init__(cfg, lambda r: block(cfg, rngs=r), rngs=rngs)
        # documents must start where the memory (MAC: a segment) starts a chunk (module docstring)
        self.document_multiple = cfg.titans.segment_size if variant == "mac" else cfg.titans.memory.chunk_size
        # LMM's "reset" is its fresh state at a document's first token, so the shell restarts those
        # rows; MAG / MAL also mask their KV caches (`decode_step`); MAC's segment cache does not
        self.variant = variant
        self.documents_in_decoding = {"lmm": "restart", "mag": "blocks", "mal": "blocks"}.get(variant)

    def init_decode_state(self, batch_size: int, max_len: int | None = None, documents: bool = False):
        """As CausalLM's; with `documents` (MAG / MAL) the layers' states with KV caches that keep
        each slot's document, the last token's document and where each row's document began."""
        if not documents or self.variant == "lmm":
            return super().init_decode_state(batch_size, max_len, documents)
        return {
            "layers": super().init_decode_state(batch_size, max_len, documents),
            "segment": jnp.full((batch_size,), -1, jnp.int32),
            "start": jnp.zeros((batch_size,), jnp.int32),
            "pos": jnp.zeros((), jnp.int32),
        }

    def decode_step(
        self, tokens: jax.Array, state, segment_ids: jax.Array | None = None, restart: bool = True
    ):
        """As CausalLM's; MAG / MAL with `segment_ids` [B]: attention within the token's document (its
        rotary position counted from the document's start) and, if `restart` ("reset"; False is
        "mask"), the memories of rows whose token starts a document restarted from a fresh state."""
        if segment_ids is None or self.variant == "lmm":
            return super().decode_step(tokens, state, segment_ids)
        self._check_documents_in_decoding()
        if not isinstance(state, dict) or "start" not in state:
            raise ValueError(
                "decoding with segment ids needs a state that keeps the documents: "
                "init_decode_state(batch_size, max_len, documents=True)"
            )
        ids, pos = segment_ids.astype(jnp.int32), state["pos"]
        starts = ids != state["segment"]
        start = jnp.where(starts, pos, state["start"])
        caches, memories = state["layers"]
        if restart:  # the memories of rows starting a document (their caches mask by document)
            memories = self._restart_rows(starts, memories, part=lambda layers: layers[1])
        kwargs = dict(segment_ids=ids[:, None], document_pos=pos - start)
        logits, layers = self._run(tokens[:, None], (caches, memories), **kwargs)
        return logits[:, 0], {"layers": layers, "segment": ids, "start": start, "pos": pos + 1}

    @staticmethod
    def forward_flops_per_token(cfg, seq_len: int) -> float:
        """Forward matmul FLOPs per token, the memory's inner loop included (see memory_flops_per_token)."""
        return forward_flops_per_token(cfg, seq_len)


def memory_flops_per_token(cfg) -> float:
    """Inner-loop FLOPs of one neural memory per token (all heads), for the chunked training path.

    Per head and token, with M(z) = z + W1 s(W2 z) (widths D and Dh) and chunk C: the forward on the
    key at the boundary state (2 matmuls), the error back through W1, the rank-one gradients summed
    into both matrices, the read of the query at the boundary (2 matmuls), and for the in-chunk reads
    (per_token / post_update) the query-key and query-hidden scores against the C tokens of the
    chunk and the weighted sums of their errors. A linear memory has one D x D matrix.
    """
    mem = cfg.titans.memory
    heads, d, hid = memory_dims(cfg)
    c = mem.chunk_size
    in_chunk = mem.read != "boundary"
    if mem.structure == "linear":
        per_head = 2 * d * d * 3 + (4 * c * d if in_chunk else 0)
    else:
        mm = 2 * d * hid  # one matrix-vector product
        per_head = 2 * mm + mm + 2 * mm + 2 * mm + (2 * 2 * c * (d + hid) if in_chunk else 0)
    return float(heads * per_head)


def _memory_layer_flops(cfg) -> float:
    heads, d, _ = memory_dims(cfg)
    hd = heads * d
    rates = 3 if cfg.titans.memory.momentum else 2  # lr, forget (and momentum) gates
    proj = 2 * cfg.d_model * hd * 5 + 2 * cfg.d_model * heads * rates  # q k v gate out; the rates
    conv = 3 * 2 * cfg.titans.memory.conv_width * hd
    return proj + conv + memory_flops_per_token(cfg)


def forward_flops_per_token(cfg, seq_len: int) -> float:
    """Analytic forward FLOPs per token of the titans model for training sequences of seq_len."""
    variant = check_variant(cfg)
    d = cfg.d_model
    heads, kv, hd = attention_dims(cfg)
    n_p = cfg.titans.persistent_tokens
    layer = 2 * 3 * d * cfg.mlp_hidden + _memory_layer_flops(cfg)
    qo, kvp = 2 * 2 * d * heads * hd, 2 * 2 * d * kv * hd  # q and o, k and v projections of one token
    if variant in ("mag", "mal"):
        w = cfg.sliding_window or seq_len
        keys = sum(min(t + 1, w) for t in range(seq_len)) / seq_len + n_p  # visible keys, on average
        layer += qo + kvp + 2 * 2 * heads * hd * keys
    if variant == "mac":
        s = cfg.titans.segment_size
        mheads, md, hid = memory_dims(cfg)
        retrieve = 2 * d * mheads * md * 2 + mheads * (
            2 * 2 * md * (hid if cfg.titans.memory.structure == "mlp" else md)
        )
        keys = (s + 1) + n_p  # query j sees r_0..r_j, x_0..x_j and the persistent tokens
        layer += retrieve + qo + 2 * kvp + 2 * 2 * heads * hd * keys
    if variant in ("mac", "mag"):
        layer += 2 * d * d  # the gate's output projection
    return float(cfg.num_layers * layer + 2 * d * cfg.vocab_size)


class FixedMemoryLM(Titans):
    """A Titans LMM model whose memory layout is fixed by its name (`dla`, `memora`): the memory's
    `layout` = (objective, retention), no momentum; another config is one error line."""

    model_name: str
    layout: tuple[str, str]

    def __init__(self, cfg, *, rngs):
        mem = cfg.titans.memory
        settings = (cfg.titans.variant, mem.get("objective", "l2"), mem.get("retention", "l2"), mem.momentum)
        objective, retention = self.layout
        if settings != ("lmm", objective, retention, False):
            raise ValueError(
                f"{self.model_name} is the lmm memory with titans.memory.objective='{objective}', "
                f"retention='{retention}' and momentum=False (got variant, objective, retention, momentum "
                f"= {settings}); start from experiments/configs/{self.model_name}_base.py"
            )
        super().__init__(cfg, rngs=rngs)
