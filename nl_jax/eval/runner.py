"""Jitted scoring views of any registered model, optionally with the batch sharded over a mesh.

Every evaluation in `nl_jax.eval` reduces to three primitives on token arrays, all provided here
through the registry interface only (`model(tokens) -> logits`, and for decoding models
`init_decode_state` / `decode_step`):

* `score(inputs, targets)`: per-position log p(target | inputs[:t+1]) and whether the target is the
  argmax, from one full forward (a fresh state per row: what training sees).
* `stream(inputs, targets, state)`: the same numbers with a decode state carried in and out, so a sequence
  longer than the training length flows through segment by segment (docs/design.md, Decision 8). The generic
  path scans `decode_step` over the tokens; a model may expose a faster multi-token stateful path as a method
  `forward_with_state(tokens [B, T], state) -> (logits [B, T, V], state)`, used when present. For attention
  models the state is the KV cache: past `max_len` it wraps and acts as a sliding window of `max_len` tokens.
* `generate(prompt, n)`: greedy decoding (decode_step after a streamed prefill, or repeated full
  forwards for models that do not decode).

Shapes are padded to a fixed batch size and to a multiple of `length_bucket` tokens so that a whole
evaluation compiles a handful of programs; padding sits after the real tokens (causal models never
see it) or in extra rows (dropped). With a mesh, parameters are placed by the logical-axis rules and
the batch is sharded over ('data', 'fsdp'); results are identical to one device.
"""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nl_jax.models.interface import CausalModel, StatefulModel
from nl_jax.parallel.rules import state_shardings

BATCH_AXES = ("data", "fsdp")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _target_stats(logits, targets):
    """log p(target) and target == argmax, in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return lp, jnp.argmax(logits, axis=-1) == targets


class ModelRunner:
    """Scoring and decoding for one model (an nnx.Module following the registry interface)."""

    def __init__(
        self,
        model: nnx.Module,
        *,
        mesh: Mesh | None = None,
        batch_size: int = 8,
        length_bucket: int = 64,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if length_bucket < 1:
            raise ValueError(f"length_bucket must be >= 1, got {length_bucket}")
        self.mesh = mesh
        self.length_bucket = length_bucket
        shards = 1 if mesh is None else math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)
        self.batch_size = _round_up(batch_size, shards)  # every device gets whole rows
        self.graphdef, state = nnx.split(model)
        if mesh is not None:
            state = jax.device_put(state, state_shardings(state, mesh))
        self.state = state
        self.can_decode = isinstance(model, CausalModel)
        self.has_stateful_forward = isinstance(model, StatefulModel)
        self._takes_max_len = self.can_decode and _accepts_max_len(model.init_decode_state)
        self._batch_axes_cache: dict = {}
        # Scores come back replicated, so every host can read them (multi-host meshes).
        replicated = None if mesh is None else NamedSharding(mesh, P())
        self._score = jax.jit(self._score_impl, out_shardings=replicated)
        # No donation of the decode state: some models share one buffer between state leaves.
        self._stream = jax.jit(self._stream_impl)
        self._greedy = jax.jit(self._greedy_impl, static_argnums=(3,))
        self._logits = jax.jit(lambda s, x: nnx.merge(self.graphdef, s)(x))

    # ----------------------------------------------------------------- placement
    def _mesh_ctx(self):
        import contextlib

        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _put_batch(self, x: np.ndarray):
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, NamedSharding(self.mesh, P(BATCH_AXES)))

    def model(self) -> nnx.Module:
        """The model with this runner's (possibly sharded) state."""
        return nnx.merge(self.graphdef, self.state)

    # ----------------------------------------------------------------- full forward
    def _score_impl(self, state, inputs, targets):
        logits = nnx.merge(self.graphdef, state)(inputs)
        return _target_stats(logits, targets)

    def score(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """inputs, targets int [N, T] -> (log p(targets) float64 [N, T], is_argmax bool [N, T]).

        Rows are independent full forwards, batched by `batch_size`; T is padded up to the length
        bucket (after the tokens, so causal outputs are unchanged)."""
        inputs, targets = np.asarray(inputs, np.int32), np.asarray(targets, np.int32)
        if inputs.shape != targets.shape or inputs.ndim != 2:
            raise ValueError(f"inputs {inputs.shape} and targets {targets.shape} must be equal [N, T]")
        n, t = inputs.shape
        tp = _round_up(max(t, 1), self.length_bucket)
        lps, oks = [], []
        with self._mesh_ctx():
            for start in range(0, n, self.batch_size):
                x = np.zeros((self.batch_size, tp), np.int32)
                y = np.zeros((self.batch_size, tp), np.int32)
                rows = min(self.batch_size, n - start)
                x[:rows, :t], y[:rows, :t] = inputs[start : start + rows], targets[start : start + rows]
                lp, ok = self._score(self.state, self._put_batch(x), self._put_batch(y))
                lps.append(np.asarray(lp, np.float64)[:rows, :t])
                oks.append(np.asarray(ok)[:rows, :t])
        if not lps:
            return np.zeros((0, t)), np.zeros((0, t), bool)
        return np.concatenate(lps), np.concatenate(oks)

    # ----------------------------------------------------------------- streaming state
    def init_state(self, batch_size: int, max_len: int):
        """A fresh decode state for `batch_size` rows; `max_len` sizes attention caches (ignored by
        purely recurrent models, whose state does not grow)."""
        if not self.can_decode:
            raise ValueError(
                "this model has no init_decode_state/decode_step, so it cannot carry state across "
                "segments; use sliding windows (mode='sliding') instead"
            )
        with self._mesh_ctx():
            return self._init_state(batch_size, max_len)

    def _init_state(self, batch_size: int, max_len: int):
        model = self.model()
        if self._takes_max_len:
            return model.init_decode_state(batch_size, max_len)
        return model.init_decode_state(batch_size)

    def _stream_impl(self, state, inputs, targets, dstate):
        if self.has_stateful_forward:
            logits, dstate = nnx.merge(self.graphdef, state).forward_with_state(inputs, dstate)
            lp, ok = _target_stats(logits, targets)
            return lp, ok, dstate

        def step(ds, xt):
            tok, tgt = xt
            logits, ds = nnx.merge(self.graphdef, state).decode_step(tok, ds)
            return ds, _target_stats(logits, tgt)

        dstate, (lp, ok) = jax.lax.scan(step, dstate, (inputs.T, targets.T))
        return lp.T, ok.T, dstate

    def stream(self, inputs: np.ndarray, targets: np.ndarray, dstate):
        """Scores [B, T] tokens continuing from `dstate` (B must equal the state's batch size).

        Returns (log p float64 [B, T], is_argmax bool [B, T], new state). No length padding: the
        state after the call is the state after exactly these tokens."""
        inputs, targets = np.asarray(inputs, np.int32), np.asarray(targets, np.int32)
        if inputs.shape != targets.shape or inputs.ndim != 2:
            raise ValueError(f"inputs {inputs.shape} and targets {targets.shape} must be equal [B, T]")
        with self._mesh_ctx():
            lp, ok, dstate = self._stream(self.state, jnp.asarray(inputs), jnp.asarray(targets), dstate)
        return np.asarray(lp, np.float64), np.asarray(ok), dstate

    def stream_chunked(self, inputs: np.ndarray, targets: np.ndarray, dstate):
        """`stream` over any length with few compiled shapes: chunks of `length_bucket` tokens,
        then the remainder in power-of-two pieces. Same results as one `stream` call."""
        inputs, targets = np.asarray(inputs, np.int32), np.asarray(targets, np.int32)
        t, c = inputs.shape[1], self.length_bucket
        sizes = [c] * (t // c)
        rest = t - sum(sizes)
        while rest:
            sizes.append(1 << (rest.bit_length() - 1))
            rest -= sizes[-1]
        lps, oks, s = [], [], 0
        for n in sizes:
            lp, ok, dstate = self.stream(inputs[:, s : s + n], targets[:, s : s + n], dstate)
            lps.append(lp)
            oks.append(ok)
            s += n
        if not lps:
            return np.zeros(inputs.shape), np.zeros(inputs.shape, bool), dstate
        return np.concatenate(lps, axis=1), np.concatenate(oks, axis=1), dstate

    # ----------------------------------------------------------------- greedy decoding
    def _greedy_impl(self, state, first, dstate, steps):
        def step(carry, _):
            tok, ds = carry
            logits, ds = nnx.merge(self.graphdef, state).decode_step(tok, ds)
            nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return (nxt, ds), nxt

        (_, dstate), out = jax.lax.scan(step, (first, dstate), None, length=steps)
        return out.T, dstate

    def generate(self, prompts: np.ndarray, max_new_tokens: int, max_len: int | None = None) -> np.ndarray:
        """Greedy continuation of equal-length prompts int [B, T] -> int32 [B, max_new_tokens].

        Decoding models: the prompt streams through decode_step (state carried), then tokens are
        generated one by one. Other models: one full forward per new token."""
        prompts = np.asarray(prompts, np.int32)
        if prompts.ndim != 2 or prompts.shape[1] < 1:
            raise ValueError(f"prompts must be a non-empty [B, T] array, got shape {prompts.shape}")
        if max_new_tokens < 1:
            return np.zeros((prompts.shape[0], 0), np.int32)
        b, t = prompts.shape
        if not self.can_decode:
            return self._generate_by_forward(prompts, max_new_tokens)
        dstate = self.init_state(b, max_len or t + max_new_tokens)
        if t > 1:
            _, _, dstate = self.stream_chunked(prompts[:, :-1], prompts[:, 1:], dstate)
        with self._mesh_ctx():
            out, _ = self._greedy(self.state, jnp.asarray(prompts[:, -1]), dstate, max_new_tokens)
        return np.asarray(out, np.int32)

    def _generate_by_forward(self, prompts, max_new_tokens):
        seq = prompts
        out = []
        for _ in range(max_new_tokens):
            n, t = seq.shape
            tp = _round_up(t, self.length_bucket)
            x = np.zeros((n, tp), np.int32)
            x[:, :t] = seq
            with self._mesh_ctx():
                logits = np.asarray(self._logits(self.state, jnp.asarray(x)))
            nxt = logits[:, t - 1].argmax(-1).astype(np.int32)
            out.append(nxt)
            seq = np.concatenate([seq, nxt[:, None]], axis=1)
        return np.stack(out, axis=1)

    # ----------------------------------------------------------------- batch axes of a state
    def broadcast_state(self, dstate, batch_size: int, max_len: int):
        """A batch-1 decode state repeated to `batch_size` rows (to branch one context into many
        continuations). The batch axis of each leaf is found by comparing the abstract states for
        batch sizes 1 and 2; leaves without one (e.g. a shared position counter) are kept."""
        key = max_len
        if key not in self._batch_axes_cache:
            one = jax.eval_shape(lambda: self._init_state(1, max_len))
            two = jax.eval_shape(lambda: self._init_state(2, max_len))

            def axis(a, b):
                diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
                return diff[0] if diff else -1

            self._batch_axes_cache[key] = jax.tree.map(axis, one, two)
        axes = self._batch_axes_cache[key]
        return jax.tree.map(
            # tiling (not repeating elements) is also right for a batch folded into heads, [B * H]
            lambda x, ax: x if ax < 0 else jnp.concatenate([x] * batch_size, axis=ax),
            dstate,
            axes,
        )


def _accepts_max_len(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params.values())
