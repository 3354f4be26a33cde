"""HOPE (self-modifying Titans + CMS) and HOPE-Attention (softmax attention + CMS), docs/design.md,
Decisions 3 and 7.

Block (pre-norm residual, RMSNorm):
    hope            h = x + SelfModTitans(Norm(x))      (the layer has its own out norm, gate, out proj)
    hope_attention  h = x + Attention(Norm(x))          (RoPE, full or sliding window, GQA)
    both            y = CMS(h): z <- z + MLP_l(Norm_l(z)) for the levels (nl_jax/mixers/cms.py)

Config (`model` section): vocab_size, d_model, num_layers, tie_embeddings, norm_eps, dtype, param_dtype,
scan_layers, remat_policy, init_std; `model.cms` (variant, signal, periods, hidden, inner_lr, optional
checkpoint_segments); hope: `model.memory` (the SelfModifyingTitans keyword arguments); hope_attention:
num_heads, num_kv_heads, head_dim, rope_theta, sliding_window.

The CMS `ntp` signal (the paper's: the next-token-loss gradient wrt each level's fast weights) is
model level. The forward cuts the sequence into segments of S = min(periods) tokens and scans over
them with the whole layer stack inside, carrying every layer's recurrent state (memory states or KV
caches, CMS fast weights and gradient accumulators). Per segment, the linearized segment forward
gives its logits and, from the next-token cross-entropy of its tokens (the target of a segment's
last token is the first token of the next one; the sequence's last token has none), the gradient
wrt every layer's fast weights, summed over the segment's tokens. Those enter under stop_gradient
and are applied at each level's boundary. The fast weights of a segment are fixed, so this gradient
is d(loss of the segment's tokens) / d(the segment's weights): exactly what a brute-force reference
computes with a separate copy of the weights per segment (tests/models/test_hope_ntp.py). The
segment is a custom_vjp: the outer gradient differentiates the segment forwards (through the fast
weights to their meta-learned init, the updates being constants: first order) and never the inner
backward, so it costs one extra backward per segment. That backward transposes the logits' part
of the segment alone: the new mixer states do not enter it, so a self-modifying layer whose reads
come from the segment's start state contributes its read path and not its updates
(self_modifying_cost.reads_from_segment_start).

Memory: the outer backward needs, per segment, the fast weights and mixer states it started from (per
sequence, each as large as the CMS weights: 256 segments of a 4096-token sequence would keep 256 copies;
hope_760m needed 1.3 TiB per v5p chip at 4 sequences per chip). With `cms.checkpoint_segments` = k > 1
(default 0: about sqrt(T / S) when the model's remat_policy is not "none", 1 when it is) the training
forward scans chunks of k segments under jax.checkpoint: the backward keeps the state at each chunk
start and recomputes one chunk at a time (one more forward, inner backward included, per segment).
Inside a chunk the levels whose period is a multiple of the chunk do not change; their weights are
constants of the chunk's segment scan rather than part of its carry, so the recomputed chunk keeps one
copy of them, not one per segment; and the accumulators that are zero at every chunk start (period
dividing the chunk) are not saved. The values are exactly those of the plain segment scan. The
per-sequence states are sharded with the batch (over data and fsdp; XLA may split the rest over tensor),
not like the parameters they start from.

Packed rows (segment ids; `data.document_boundaries`): hope_attention masks its attention by
document ("mask"; also "reset", since attention is its only token mixer), on the training path and on
the ntp segment scan, whose KV cache looks up the ids of the cached positions in the row's ids. hope
restarts every self-modifying memory from its meta-learned initial state at each document's first
token, and its short convs stop there ("reset"); the memories take a chunk's keys, values and
gradients from the chunk's start state, so documents must start at multiples of
lcm(chunk_size, memory_chunk_size) (checked), and the ntp segments must sit on those grids.
The CMS levels are not restarted (decision): they are the slow end of the continuum, updated at
their own periods over the whole sequence, and a level whose period exceeds a document would
otherwise never update; so they carry across documents like the training stream's sequences, and
a packed row equals its documents apart only while no level boundary falls inside the row (or the
inner lr is 0). Segment ids are taken by the training forwards only, not by the decode state.

Decoding reproduces the forward: the decode state keeps the current segment's tokens and the
recurrent states at its start; when the first token of the next segment arrives (the target of the
segment's last token), the segment's vjp is recomputed from those states, the gradients are
accumulated and the boundary updates applied, then the new token runs with the updated weights.
(Recomputing only the last position would miss the paths from the segment's weights at one token
into the losses of its later tokens, through attention or the memory, which the segment vjp has.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nl_jax.layers import RMSNorm, to_dtype
from nl_jax.layers.conv import document_starts
from nl_jax.metrics.profiler import part
from nl_jax.mixers import Attention, attention_dims
from nl_jax.mixers.cms import CMSSchedule, ContinuumMemory
from nl_jax.models.lm import RESIDUAL, CausalLM
from nl_jax.models.registry import register
from nl_jax.models.stack import Layers, from_layers, to_layers
from nl_jax.parallel.rules import constrain


def _cms_kwargs(cfg) -> dict:
    c = cfg.cms
    return dict(
        hidden=tuple(c.hidden),
        periods=tuple(c.periods),
        inner_lr=tuple(c.inner_lr),
        variant=c.variant,
        signal=c.signal,
        norm_eps=cfg.norm_eps,
        init_std=cfg.init_std,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
    )


def segments_per_checkpoint(n: int, checkpoint_segments: int, remat_policy: str) -> int:
    """Segments per checkpointed chunk of the ntp forward over n segments: the largest divisor of n up
    to `checkpoint_segments`, or (0, automatic) the divisor nearest sqrt(n) unless remat_policy is
    "none" (then 1: no checkpointing)."""
    if checkpoint_segments == 0:
        if remat_policy == "none":
            return 1
        return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - n**0.5), d))
    return max(d for d in range(1, min(checkpoint_segments, n) + 1) if n % d == 0)


def _per_layer(fn, cms, *args):
    """fn(CMS state of one layer, *its args) -> its new state, over every layer's: `cms` and `args`
    are Layers (an unrolled stack's segment scan) or stacked along a leading layer axis. Stacked,
    every layer is at the same position, so it enters the vmap unbatched: each boundary's predicate
    stays one scalar, and the backward of its select keeps that, not a mask the size of the weights
    per layer."""
    if isinstance(cms, Layers):
        return Layers(fn(*per) for per in zip(cms, *args))
    pos = cms.pos[0]
    one = lambda levels, prev, *a: fn(cms._replace(levels=levels, prev=prev, pos=pos), *a)  # noqa: E731
    new = jax.vmap(one, out_axes=cms._replace(levels=0, prev=0, pos=None))(cms.levels, cms.prev, *args)
    return new._replace(pos=jnp.broadcast_to(new.pos, cms.pos.shape))


def _fast_weights(cms):
    """The fast weights every layer reads (ContinuumMemory.fast_weights), in the layout of `cms`."""
    if isinstance(cms, Layers):
        return Layers(map(ContinuumMemory.fast_weights, cms))
    return ContinuumMemory.fast_weights(cms)


def _with_fast_weights(cms, weights):
    """`cms` with every layer's fast weights replaced (None: left out), in its layout."""
    if isinstance(cms, Layers):
        per_layer = weights or [None] * len(cms)
        return Layers(_with_fast_weights(c, w) for c, w in zip(cms, per_layer))
    return ContinuumMemory.with_fast_weights(cms, weights or tuple(None for _ in cms.levels))


def _split_inexact(tree):
    """A pytree's floating leaves (a list) and a function that puts a list of that form back with
    its other leaves (integer positions and steps, or their float0 cotangents): what
    `jax.linear_transpose` takes, which refuses mixed dtypes."""
    leaves, treedef = jax.tree.flatten(tree)
    inexact = [jnp.issubdtype(a.dtype, jnp.inexact) for a in leaves]

    def merge(floats):
        floats = iter(floats)
        return treedef.unflatten([next(floats) if f else a for a, f in zip(leaves, inexact)])

    return [a for a, f in zip(leaves, inexact) if f], merge


class HopeBlock(nnx.Module):
    """h = x + Mixer(Norm(x)); y = CMS(h). Block state: (mixer state, CMS state) when streaming."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.attention = cfg.name == "hope_attention"
        param_dtype = to_dtype(cfg.param_dtype)
        self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
        kw = dict(init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        if self.attention:
            self.mixer = Attention.from_config(cfg, **kw)
        else:
            from nl_jax.mixers.self_modifying import SelfModifyingTitans  # noqa: PLC0415 (hope only)

            self.mixer = SelfModifyingTitans(cfg.d_model, **dict(cfg.memory), **kw)
        self.cms = ContinuumMemory(cfg.d_model, **_cms_kwargs(cfg), rngs=rngs)

    def init_state(self, batch_size: int, max_len: int | None = None):
        if self.attention:
            mixer = self.mixer.init_cache(batch_size, max_len)
        else:
            mixer = self.mixer.init_state(batch_size)
        return (mixer, self.cms.init_state(batch_size))

    def __call__(
        self,
        x,
        state=None,
        aligned: bool = False,
        segment_ids=None,
        document_start=None,
        row_segment_ids=None,
    ):
        """`aligned` (static): the state sits on the mixer's chunk grids (see SelfModifyingTitans.core).
        Packed rows: `segment_ids` [B, T] of x's tokens; with a state (the ntp segment scan) also
        `document_start` [B] (x's first token starts a document: the memories restart before it)
        and `row_segment_ids` [B, P] (the ids of the row from position 0: those of cached keys)."""
        u = self.mixer_norm(x)
        if state is None:  # training forward of the static / local CMS: whole sequence at once
            with part("mixer"):
                if self.attention:
                    a = self.mixer(u, segment_ids)
                else:
                    a = self.mixer(u, segment_ids=segment_ids)[0]
            with part("cms"):
                y, _ = self.cms(x + a)
            return constrain(y, RESIDUAL), None
        mixer, cms = state
        with part("mixer"):
            if self.attention:
                a, mixer = self.mixer.extend(u, mixer, segment_ids, row_segment_ids)
            else:
                a, mixer = self.mixer(
                    u, mixer, aligned=aligned, segment_ids=segment_ids, document_start=document_start
                )
        with part("cms"):
            y, cms = self.cms(x + a, cms)
        return constrain(y, RESIDUAL), (mixer, cms)


class _Hope(CausalLM):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        super().__init__(cfg, lambda r: HopeBlock(cfg, rngs=r), rngs=rngs)
        if cfg.name == "hope":  # restarts start chunks of both memory grids (module docstring)
            self.document_multiple = int(np.lcm(cfg.memory.chunk_size, cfg.memory.memory_chunk_size))
        self.signal = cfg.cms.signal
        self.schedule = CMSSchedule(tuple(int(p) for p in cfg.cms.periods), tuple(cfg.cms.inner_lr))
        self.segment = min(self.schedule.periods)
        self.checkpoint_segments = int(cfg.cms.get("checkpoint_segments", 0))
        if self.checkpoint_segments < 0:
            raise ValueError(
                f"cms.checkpoint_segments must be >= 0 (0: automatic), got {self.checkpoint_segments}"
            )
        self.remat_policy = cfg.remat_policy

    # ---------------------------------------------------------------- pieces
    @property
    def segments_aligned(self) -> bool:
        """Whether segments that start at multiples of the segment length stay on the mixer's chunk
        grids (always for attention, whose cache has none)."""
        return self.blocks.layers.attention or self.blocks.layers.mixer.aligned(self.segment)

    def _segment_grads(self, mixer, cms, tokens, targets, mask, aligned: bool = False, documents=None):
        """One segment's logits, new mixer states and next-token-loss gradients wrt every layer's
        CMS fast weights (leading axis L).

        A custom_vjp: its forward linearizes the segment once and transposes the logits' part alone
        to the inner cotangent (what XLA needs of it: the activation gradients and the fast-weight
        gradients); its backward transposes the whole linearization (logits and mixer states) to the
        outer cotangents, and gives the inner gradients none (first order). So the outer gradient
        never traces the derivative of the inner backward, and costs one ordinary backward of the
        segment. (A vjp of both outputs with a zero cotangent for the states would run the states'
        backward on zeros: the memories' chunk scans instantiate a zero cotangent of their carry.)
        `documents`: the HopeBlock keywords of packed rows (segment ids ...), or None.
        """
        graphdef, params, rest = nnx.split(self, nnx.Param, ...)
        cms_rest = _with_fast_weights(cms, None)

        def f(p, w, m, r, cr, tok, docs):
            model = nnx.merge(graphdef, p, r, copy=True)
            cms_state = _with_fast_weights(cr, w)
            logits, (new_mixer, _) = model._run(tok, (m, cms_state), aligned=aligned, **(docs or {}))
            return logits, new_mixer

        def fwd(p, w, m, r, cr, tok, tgt, msk, docs):
            m_inexact, with_m = _split_inexact(m)

            def g(p_, w_, m_):
                logits, new = f(p_, w_, with_m(m_), r, cr, tok, docs)
                return (logits, _split_inexact(new)[0]), new  # the new states whole as aux

            (logits, new_inexact), lin, new = jax.linearize(g, p, w, m_inexact, has_aux=True)
            # d(sum of the segment's cross-entropies)/d(logits) = softmax - onehot, on tokens with a target.
            probs = jax.nn.softmax(logits, axis=-1)
            ct = (probs - jax.nn.one_hot(tgt, logits.shape[-1], dtype=probs.dtype)) * msk[..., None]
            with part("inner_backward"):
                grads = jax.linear_transpose(lambda *t: lin(*t)[0], p, w, m_inexact)(ct)[1]
            return (logits, new, grads), jax.linear_transpose(lin, p, w, m_inexact)

        def bwd(outer, cts):
            ct_logits, ct_mixer, _ = cts  # the inner gradients are constants to the outer level
            ct_inexact, with_ct = _split_inexact(ct_mixer)  # the states in and out have one structure
            dp, dw, dm = outer((ct_logits, ct_inexact))
            return (dp, dw, with_ct(dm), None, None, None, None, None, None)

        # Everything traced is an argument: a custom_vjp must not close over tracers of the scan.
        seg = jax.custom_vjp(lambda *args: fwd(*args)[0])
        seg.defvjp(fwd, bwd)
        weights = _fast_weights(cms)
        return seg(params, weights, mixer, rest, cms_rest, tokens, targets, mask, documents)

    def _accumulate(self, cms, grads, ok=True, defer=()):
        """Segment gradients into every layer's accumulators, boundary updates at the segment end
        (but for the `defer` levels, see CMSSchedule.accumulate)."""
        step = lambda s, g: self.schedule.accumulate(s, g, self.segment, ok, defer)  # noqa: E731
        with part("cms_update"):
            return _per_layer(step, cms, grads)

    def segments_per_checkpoint(self, n: int) -> int:
        """Segments per checkpointed chunk of the ntp forward over n segments (see
        `segments_per_checkpoint`)."""
        return segments_per_checkpoint(n, self.checkpoint_segments, self.remat_policy)

    def _segment_step(self, defer, aligned, row, carry, xs):
        """One segment of the scan: logits, new mixer states, gradients into the CMS state. `row`:
        the row's segment ids (packed rows; then xs ends with the segment's ids and start flags).

        The boundary steps of the levels not in `defer` run at the start of the next segment, not at
        the end of this one (`_pending_boundaries`; the scan's caller flushes the last): the values
        are the same, and the weights the segment saves for the backward are then the ones the scan
        carries out, so XLA updates them in place instead of copying every level's weights and
        accumulators at each segment's start."""
        mixer, cms = carry
        documents = None
        if row is not None:
            *xs, ids, first = xs
            documents = dict(segment_ids=ids, document_start=first, row_segment_ids=row)
        cms = self._pending_boundaries(cms, defer)
        logits, mixer, grads = self._segment_grads(mixer, cms, *xs, aligned=aligned, documents=documents)
        everything = tuple(range(len(self.schedule.periods)))
        return (mixer, self._accumulate(cms, grads, defer=everything)), logits

    def _pending_boundaries(self, cms, defer=()):
        """The boundary steps at the CMS state's position of the levels not in `defer`. A no-op where
        they were applied already or nothing was accumulated: their gradient sums are then zero."""
        levels = tuple(i for i in range(len(self.schedule.periods)) if i not in defer)
        on_grid = tuple(i for i in levels if self.schedule.periods[i] == self.segment)
        with part("cms_update"):
            return _per_layer(lambda c: self.schedule.boundaries(c, levels, on_grid), cms)

    def _chunk_step(self, k: int, row=None):
        """Scan body over chunks of k segments of a sequence started at position 0, for jax.checkpoint.

        Levels whose period is a multiple of the chunk (`fixed`) keep their weights through the chunk:
        those are closed over by the segment scan (one copy kept for the backward, not k) and their
        boundary steps are applied after it, at the chunk's end (the same operations as the plain
        scan). Accumulators of levels whose period divides the chunk are zero at every chunk start,
        so the chunk starts from literal zeros and the backward need not keep them."""
        span, periods = k * self.segment, self.schedule.periods
        fixed = tuple(i for i, p in enumerate(periods) if p % span == 0)

        def reset(lv, i):  # grad_sum is reset at level i's boundaries, reinit_grad_sum at level i + 1's
            resets = {"grad_sum": periods[i], "reinit_grad_sum": periods[min(i + 1, len(periods) - 1)]}
            return {
                name: jax.tree.map(jnp.zeros_like, a) if name in resets and span % resets[name] == 0 else a
                for name, a in lv.items()
            }

        def chunk(carry, xs):
            mixer, cms = carry
            cms = cms._replace(levels=tuple(reset(lv, i) for i, lv in enumerate(cms.levels)))
            weights = {i: cms.levels[i]["weights"] for i in fixed}

            def put(c, ws):  # the fixed levels' weights in (ws) or out (ws None) of a CMS state
                without = lambda lv: {a: v for a, v in lv.items() if a != "weights"}  # noqa: E731
                levels = tuple(
                    ({**lv, "weights": ws[i]} if ws is not None else without(lv)) if i in fixed else lv
                    for i, lv in enumerate(c.levels)
                )
                return c._replace(levels=levels)

            def body(c, seg):
                c = (c[0], put(c[1], weights))
                (m, cm), logits = self._segment_step(fixed, self.segments_aligned, row, c, seg)
                return (m, put(cm, None)), logits

            (mixer, cms), logits = jax.lax.scan(body, (mixer, put(cms, None)), xs)
            cms = self._pending_boundaries(put(cms, weights))  # every level's, the fixed ones' too
            return (mixer, cms), logits

        return chunk

    @staticmethod
    def _targets(tokens):
        """Next tokens and their mask (the last position has no target)."""
        t = tokens.shape[1]
        targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
        mask = jnp.broadcast_to(jnp.arange(t) < t - 1, tokens.shape).astype(jnp.float32)
        return targets, mask

    # ---------------------------------------------------------------- forward
    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens int32 [B, T] -> logits float32 [B, T, vocab_size]; fast state reset per sequence
        (`segment_ids` [B, T]: packed rows, see the module docstring)."""
        if self.signal != "ntp":
            return super().__call__(tokens, segment_ids)
        self._check_documents(segment_ids)
        return self.forward_ntp(tokens, segment_ids=segment_ids)[0]

    def forward_ntp(self, tokens: jax.Array, states=None, segment_ids: jax.Array | None = None):
        """The ntp-signal forward over segments; returns (logits, final layer states). `states`
        (stacked layer states, e.g. carried from an earlier call at evaluation) default to the
        meta-learned initial ones; a sequence not a multiple of the segment is padded at the end
        (padding never reaches earlier logits). `segment_ids` [B, T] (from the initial states only):
        packed rows."""
        b, t = tokens.shape
        s = self.segment
        n = -(-t // s)
        targets, mask = self._targets(tokens)
        pad = ((0, 0), (0, n * s - t))
        tokens_p, targets, mask = jnp.pad(tokens, pad), jnp.pad(targets, pad), jnp.pad(mask, pad)
        if segment_ids is not None and states is not None:
            raise ValueError("segment ids are taken from the initial states only (not from a carried state)")
        k, aligned = 1, False
        if states is None:  # a fresh sequence: chunks start at multiples of k * S (checkpointing)
            states = self.blocks.init_state(b, n * s)
            k, aligned = self.segments_per_checkpoint(n), self.segments_aligned
        to_segments = lambda a: jnp.moveaxis(a.reshape(b, n, s), 1, 0)  # noqa: E731
        xs = tuple(map(to_segments, (tokens_p, targets, mask)))
        row = None
        if segment_ids is not None:  # padding continues the last document (it reaches no earlier logit)
            row = jnp.pad(segment_ids, pad, mode="edge")
            first = jnp.moveaxis(document_starts(row)[:, ::s], 1, 0)  # [n, B]: a segment starts a document
            xs = (*xs, to_segments(row), first)
        if k == 1:
            step = functools.partial(self._segment_step, (), aligned, row)
            layers = self.blocks.num_layers
            unrolled = not self.blocks.scan_layers  # the scan carries each layer's states apart
            carry = tuple(to_layers(half, layers) for half in states) if unrolled else states
            (mixer, cms), logits = jax.lax.scan(step, carry, xs)
            if unrolled:
                mixer, cms = from_layers(mixer), from_layers(cms)
            states = (mixer, self._pending_boundaries(cms))
        else:
            # inside a scan: no CSE anyway
            chunk = jax.checkpoint(self._chunk_step(k, row), prevent_cse=False)
            xs = jax.tree.map(lambda a: a.reshape(n // k, k, *a.shape[1:]), xs)
            states, logits = jax.lax.scan(chunk, states, xs)
            logits = logits.reshape(n, *logits.shape[2:])
        logits = jnp.moveaxis(logits, 0, 1).reshape(b, n * s, -1)[:, :t]
        return logits, states

    # ---------------------------------------------------------------- decoding
    def init_decode_state(self, batch_size: int, max_len: int | None = None, documents: bool = False):
        """Stacked per-layer states (plus, for the ntp signal, the segment buffer and the states at
        the segment's start). hope_attention needs max_len unless its attention is sliding-window.
        Decoding takes no segment ids (`documents` is refused by name)."""
        states = super().init_decode_state(batch_size, max_len, documents)
        if self.signal != "ntp":
            return states
        mixer, cms = states
        return dict(
            pos=jnp.zeros((), jnp.int32),
            buffer=jnp.zeros((batch_size, self.segment), jnp.int32),
            start=mixer,  # recurrent states at the start of the current segment
            mixer=mixer,  # recurrent states after the last token
            cms=cms,
        )

    def decode_step(self, tokens: jax.Array, state, segment_ids: jax.Array | None = None):
        """tokens int32 [B] -> (logits float32 [B, V], new state); step by step == the forward.
        `segment_ids` are refused (no `documents_in_decoding`)."""
        if segment_ids is not None or self.signal != "ntp":
            return super().decode_step(tokens, state, segment_ids)
        pos, buffer = state["pos"], state["buffer"]
        s = self.segment
        complete = jnp.logical_and(pos > 0, pos % s == 0)  # `tokens` is the last target of a full segment

        def close_segment(st):
            targets = jnp.concatenate([st["buffer"][:, 1:], tokens[:, None]], axis=1)
            mask = jnp.ones(targets.shape, jnp.float32)
            _, mixer, grads = self._segment_grads(
                st["start"], st["cms"], st["buffer"], targets, mask, aligned=self.segments_aligned
            )
            return dict(st, start=mixer, mixer=mixer, cms=self._accumulate(st["cms"], grads))

        state = jax.lax.cond(complete, close_segment, lambda st: st, state)
        logits, (mixer, _) = self._run(tokens[:, None], (state["mixer"], state["cms"]))
        buffer = jax.lax.dynamic_update_slice_in_dim(buffer, tokens[:, None], pos % s, axis=1)
        return logits[:, 0], dict(state, pos=pos + 1, buffer=buffer, mixer=mixer)

    def forward_with_state(self, tokens: jax.Array, state):
        """Continue from a decode state over tokens [B, T]: (logits [B, T, V], new state), equal to T
        decode steps (the evaluation runner's multi-token path, nl_jax.eval.runner). The none and
        local signals run every layer's streaming forward on the whole block; ntp steps token by
        token, since its segment buffer may start and end anywhere in a segment."""
        if self.signal != "ntp":
            return self._run(tokens, state)

        def step(st, tok):
            logits, st = self.decode_step(tok, st)
            return st, logits

        state, logits = jax.lax.scan(step, state, tokens.T)
        return jnp.moveaxis(logits, 0, 1), state

    # ---------------------------------------------------------------- FLOPs
    @staticmethod
    def _layer_flops_per_token(cfg, seq_len: int) -> tuple[float, float, float]:
        """(mixer, mixer projections, CMS) forward FLOPs per token of one layer, the self-modifying
        inner loops included; the projections are the mixer's static matmuls."""
        d = cfg.d_model
        cms = sum(6 * d * h for h in cfg.cms.hidden)
        if cfg.name == "hope_attention":
            heads, kv, head_dim = attention_dims(cfg)
            ctx = (seq_len + 1) / 2 if not cfg.sliding_window else min(cfg.sliding_window, (seq_len + 1) / 2)
            proj = 2 * d * head_dim * (2 * heads + 2 * kv)
            return proj + 4 * heads * head_dim * ctx, proj, cms
        from nl_jax.mixers import self_modifying_cost  # noqa: PLC0415

        mem = dict(cfg.memory)
        mixer = self_modifying_cost.forward_flops_per_token(seq_len, d, **mem)
        return mixer, self_modifying_cost.projection_flops_per_token(d, **mem), cms

    @classmethod
    def flops_per_token(cls, cfg, seq_len: int) -> dict:
        """Analytic FLOPs per token of a training step's parts (2 per multiply-add):

        forward  the model's function: every layer's mixer (inner loops included) and CMS levels,
                 and the unembedding; the outer backward differentiates it (2x).
        inner    the CMS inner objective, which the outer gradient does not differentiate. local:
                 each level's MLP on the previous position and its weight gradient (7/3 of the
                 level's forward). ntp: each segment's inner backward from the logits, i.e. the
                 activation gradients through the unembedding, every CMS and the mixers above
                 layer 0 (attention: its whole backward but its projections' weight gradients; the
                 self-modifying layer: `segment_backward_flops_per_token`, mostly its read path)
                 and the CMS weight gradients, for the segments whose gradients reach a boundary
                 inside the sequence (all but the last).
        """
        n, unembed = cfg.num_layers, 2 * cfg.d_model * cfg.vocab_size
        mixer, proj, cms = cls._layer_flops_per_token(cfg, seq_len)
        forward = n * (mixer + cms) + unembed
        inner = 0.0
        if cfg.cms.signal == "local":
            inner = n * 7 / 3 * cms
        elif cfg.cms.signal == "ntp":
            segment = min(int(p) for p in cfg.cms.periods)
            segments = -(-seq_len // segment)
            if cfg.name == "hope_attention":
                mixer_backward = 2 * mixer - proj
            else:
                from nl_jax.mixers import self_modifying_cost  # noqa: PLC0415

                mixer_backward = self_modifying_cost.segment_backward_flops_per_token(
                    segment, cfg.d_model, **dict(cfg.memory)
                )
            backward = unembed + n * 2 * cms + (n - 1) * mixer_backward
            inner = backward * (segments - 1) / segments
        return {"forward": float(forward), "inner": float(inner)}

    @classmethod
    def forward_flops_per_token(cls, cfg, seq_len: int) -> float:
        """The forward pass as it runs: the model's function and the inner objective's work."""
        f = cls.flops_per_token(cfg, seq_len)
        return f["forward"] + f["inner"]

    @classmethod
    def train_flops_per_token(cls, cfg, seq_len: int) -> float:
        """A training step: the forward, its backward (2x the model's function) and the inner work
        once (first order: the outer gradient does not differentiate it)."""
        f = cls.flops_per_token(cfg, seq_len)
        return 3 * f["forward"] + f["inner"]

    @staticmethod
    def ntp_segments_per_checkpoint(cfg, seq_len: int) -> int:
        """Segments per checkpointed chunk of the training forward over seq_len tokens (1: none)."""
        if cfg.cms.signal != "ntp":
            return 1
        segment = min(int(p) for p in cfg.cms.periods)
        n = -(-seq_len // segment)
        return segments_per_checkpoint(n, int(cfg.cms.get("checkpoint_segments", 0)), cfg.remat_policy)

    @classmethod
    def recompute_flops_per_token(cls, cfg, seq_len: int) -> float:
        """Forward FLOPs per token recomputed in the backward (rematerialisation: overhead, not model
        FLOPs; analytic). A "full" remat policy recomputes every layer once per backward through it,
        and the ntp signal has two (the inner one and the outer one); the "dots" policies keep the
        weight matmuls and are counted as free. With the ntp forward checkpointed in chunks, the
        backward runs the whole forward once more, inner backward included."""
        full = cfg.remat_policy in ("full", "nothing_saveable")
        mixer, _, cms = cls._layer_flops_per_token(cfg, seq_len)
        layers = cfg.num_layers * (mixer + cms + (7 / 3 * cms if cfg.cms.signal == "local" else 0))
        if cfg.cms.signal != "ntp":
            return float(layers if full else 0.0)
        recompute = 2 * layers if full else 0.0
        if cls.ntp_segments_per_checkpoint(cfg, seq_len) > 1:
            recompute += cls.forward_flops_per_token(cfg, seq_len) + (layers if full else 0.0)
        return float(recompute)


@register("hope")
class Hope(_Hope):
    """HOPE: self-modifying Titans followed by a CMS in every block (no attention)."""

    document_boundaries = ("ignore", "reset")


@register("hope_attention")
class HopeAttention(_Hope):
    """HOPE-Attention: a Transformer++ whose MLP is a CMS."""

    document_boundaries = ("ignore", "mask", "reset")
