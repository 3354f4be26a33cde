"""Continuum Memory System (CMS, Eq. 70-74 of the paper; docs/design.md, Decision 7): K MLP levels
updated at different periods.

Each level is a pre-norm residual SwiGLU, `z <- z + MLP_l(Norm_l(z))`, whose weights are *fast
weights*: a float32 pytree carried per sequence (never Params). Its meta-learned initial value is
the level's ordinary SwiGLU parameters, so the outer gradient reaches them through every use of the
fast weights. Level l collects per-token gradient terms over its period P_l (default 16, 64, 256,
1024 tokens) and applies their sum at the period's boundary, with its own inner lr:

    W_l <- W_l - lr_l * sum_{t in period} g_t       (only when the position count hits k * P_l)

The gradient terms are first-order: they enter under stop_gradient, so the outer gradient does not
differentiate through the inner one (but does flow through the fast weights to their init).

Variants (`variant`):
  sequential   the chain z <- z + MLP_l(Norm_l(z)), l = 1..K (paper Eq. 70, Hope's forward).
  independent  parallel levels on the same input, y = x + sum_l a_l MLP_l(Norm_l(x)), a learnable.
  nested       the sequential chain, plus (our first-order reading of the paper's Eq. 72) each level l
               but the last has a second fast state I_l, its re-initialisation point, which the next
               level's schedule maintains: at every boundary of P_{l+1},
                   I_l <- I_l - lr_{l+1} * sum of level l's gradient terms over that P_{l+1} window
                   W_l <- I_l
               (the sum of the gradients along level l's trajectory is the first-order MAML gradient
               wrt its initial state). The last level has no re-initialisation: its init is the Param.
               Needs P_{l+1} to be a multiple of P_l.

Inner signal (`signal`):
  ntp    the next-token-loss gradient wrt the fast weights. It needs the model's loss, so the model
         computes it (nl_jax/models/hope.py) and hands it to `accumulate`; the layer only reads
         (`apply`).
  local  a layer-local l2 objective with self-generated targets: level l learns to predict the next
         position's level input from the current one,
             g_t = grad_W 1/2 || MLP_l(u_{t-1}; W) - sg(u_t) ||^2,    u_t = Norm_l(z_t)
         (no term at t = 0), each token's term clipped to norm 1 (a quartic objective: see _local_grad).
         Weights are constant inside a period, so every term of a period is taken at the same W:
         fully parallel within the period (one vjp per period).
  none   a static MLP stack: exactly the parameters and the output of K pre-norm SwiGLU sublayers,
         no fast state (the "w/o CMS" ablation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.layers.linear import logical_param, to_dtype
from nl_jax.layers.mlp import SwiGLU
from nl_jax.layers.norms import RMSNorm
from nl_jax.parallel.rules import constrain

VARIANTS = ("sequential", "independent", "nested")
LOCAL_MAX_GRAD_NORM = 1.0  # the local objective's per-token gradient clip (see ContinuumMemory._local_grad)
SIGNALS = ("ntp", "local", "none")
_FAST_NAMES = {
    "gate": ("batch", "embed", "mlp"),
    "up": ("batch", "embed", "mlp"),
    "down": ("batch", "mlp", "embed"),
}


class CMSState(NamedTuple):
    """Fast state of one CMS layer (all arrays float32 and per sequence, leading batch axis).

    levels: one dict per level with
        weights          fast weights {"gate": [B, D, H], "up": [B, D, H], "down": [B, H, D]}
        grad_sum         the gradient terms accumulated since the level's last boundary (same shapes)
        reinit           nested only (levels 0..K-2): the re-initialisation point I_l
        reinit_grad_sum  nested only (levels 0..K-2): level l's gradient terms since the last
                         boundary of P_{l+1}
    prev: local only: each level's input u at the previous position [B, D] (zeros before position 0)
    pos:  int32 []: number of tokens consumed
    """

    levels: tuple
    prev: tuple | None
    pos: jax.Array


def swiglu_fast(w: dict, u: jax.Array, dtype) -> jax.Array:
    """SwiGLU with per-sequence weights: u [B, T, D] -> [B, T, D], matmuls in `dtype`."""
    u = u.astype(dtype)
    mm = lambda a, b, spec: jnp.einsum(spec, a, b.astype(dtype))  # noqa: E731
    hid = jax.nn.silu(mm(u, w["gate"], "btd,bdh->bth")) * mm(u, w["up"], "btd,bdh->bth")
    return mm(hid, w["down"], "bth,bhd->btd")


def _tree_where(c, a, b):
    """where(c, a, b) leaf by leaf for a scalar c. lax.select keeps the predicate scalar (jnp.where
    broadcasts it), so a backward through the step saves one bool, not a mask the size of the weights."""
    if isinstance(c, bool):
        return a if c else b
    c = jnp.asarray(c, bool)
    return jax.tree.map(lambda x, y: jax.lax.select(c, x, y), a, b)


class CMSSchedule(NamedTuple):
    """The update cadence of the levels (static): pure functions of a CMSState, so a model can apply
    them to the states of all its layers at once (e.g. under jax.vmap over the layer axis)."""

    periods: tuple
    inner_lr: tuple

    def level_boundary(self, i: int, lv: dict, end_pos, ok=True, on_grid: bool = False) -> dict:
        """Level i's boundary step at token count end_pos (a no-op off its boundaries or if not ok).
        `on_grid`: the caller knows end_pos is a multiple of the period, so no predicate is traced."""
        hit = ok if on_grid else jnp.logical_and(ok, end_pos % self.periods[i] == 0)
        lr = self.inner_lr[i]
        lv = dict(lv)
        step = lambda w, g, rate: jax.tree.map(lambda a, b: a - rate * b, w, g)  # noqa: E731
        zero = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
        lv["weights"] = _tree_where(hit, step(lv["weights"], lv["grad_sum"], lr), lv["weights"])
        lv["grad_sum"] = _tree_where(hit, zero(lv["grad_sum"]), lv["grad_sum"])
        if "reinit" in lv:  # nested: the next level's schedule moves the re-initialisation point
            hit2 = jnp.logical_and(ok, end_pos % self.periods[i + 1] == 0)
            lr2 = self.inner_lr[i + 1]
            lv["reinit"] = _tree_where(hit2, step(lv["reinit"], lv["reinit_grad_sum"], lr2), lv["reinit"])
            lv["reinit_grad_sum"] = _tree_where(hit2, zero(lv["reinit_grad_sum"]), lv["reinit_grad_sum"])
            lv["weights"] = _tree_where(hit2, lv["reinit"], lv["weights"])
        return lv

    @staticmethod
    def add_grads(lv: dict, g: dict) -> dict:
        g = jax.lax.stop_gradient(g)  # first order: no outer gradient through the inner gradient
        lv = dict(lv, grad_sum=jax.tree.map(jnp.add, lv["grad_sum"], g))
        if "reinit_grad_sum" in lv:
            lv["reinit_grad_sum"] = jax.tree.map(jnp.add, lv["reinit_grad_sum"], g)
        return lv

    def accumulate(
        self, state: CMSState, grads: tuple, num_tokens: int, apply_ok=True, defer: tuple = ()
    ) -> CMSState:
        """Adds one segment's gradient terms (one dict per level, per sequence) and applies the
        boundary updates at the segment's end. The segment must not straddle a boundary (its
        gradients were all taken at the same weights): the model uses segments of min(periods)
        tokens starting at multiples of it. `apply_ok` (bool) gates the whole step.

        `defer`: levels whose boundary step is left to the caller (`boundaries`, later at the same
        position); their gradients are still added. For a caller that knows those boundaries do not
        fall inside the span, so their weights can stay out of the per-segment state."""
        end = state.pos + num_tokens
        # A segment of exactly one period that does not straddle a boundary ends on one.
        levels = tuple(
            self.add_grads(lv, g)
            if i in defer
            else self.level_boundary(i, self.add_grads(lv, g), end, on_grid=self.periods[i] == num_tokens)
            for i, (lv, g) in enumerate(zip(state.levels, grads))
        )
        return _tree_where(apply_ok, state._replace(levels=levels, pos=end), state)

    def boundaries(self, state: CMSState, levels: tuple, on_grid: tuple = ()) -> CMSState:
        """The boundary steps of `levels` at the state's position (those `accumulate` deferred).
        `on_grid`: levels whose boundary the caller knows the position to be on (no predicate)."""
        new = tuple(
            self.level_boundary(i, lv, state.pos, on_grid=i in on_grid) if i in levels else lv
            for i, lv in enumerate(state.levels)
        )
        return state._replace(levels=new)


class CMSLevel(nnx.Module):
    """One level: its pre-norm and its SwiGLU (whose kernels are the meta-learned fast-weight init)."""

    def __init__(self, d_model: int, hidden: int, *, norm_eps, init_std, dtype, param_dtype, rngs):
        self.norm = RMSNorm(d_model, eps=norm_eps, param_dtype=param_dtype)
        self.mlp = SwiGLU(d_model, hidden, init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def init_weights(self, batch_size: int) -> dict:
        w = {n: getattr(self.mlp, n).kernel[...].astype(jnp.float32) for n in _FAST_NAMES}
        return {
            n: constrain(jnp.broadcast_to(a, (batch_size, *a.shape)), _FAST_NAMES[n]) for n, a in w.items()
        }


class ContinuumMemory(nnx.Module):
    """K-level CMS on the residual stream: x [B, T, D] -> y [B, T, D] (residuals included)."""

    def __init__(
        self,
        d_model: int,
        *,
        hidden: Sequence[int] = (704, 704, 704, 704),
        periods: Sequence[int] = (16, 64, 256, 1024),
        inner_lr: Sequence[float] = (1e-3, 1e-3, 1e-3, 1e-3),
        variant: str = "sequential",
        signal: str = "ntp",
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
        dtype="float32",
        param_dtype="float32",
        rngs: nnx.Rngs,
    ):
        hidden, periods, inner_lr = tuple(hidden), tuple(int(p) for p in periods), tuple(inner_lr)
        if variant not in VARIANTS:
            raise ValueError(f"unknown CMS variant {variant!r}; choose one of {VARIANTS}")
        if signal not in SIGNALS:
            raise ValueError(f"unknown CMS signal {signal!r}; choose one of {SIGNALS}")
        if not (len(hidden) == len(periods) == len(inner_lr)) or not hidden:
            raise ValueError(
                f"CMS needs one hidden width, period and inner lr per level; got hidden={hidden}, "
                f"periods={periods}, inner_lr={inner_lr}"
            )
        if min(periods) < 1:
            raise ValueError(f"CMS periods must be positive, got {periods}")
        if signal == "ntp" and any(p % min(periods) for p in periods):
            raise ValueError(
                f"the ntp signal runs segments of min(periods) tokens, so every period must be a "
                f"multiple of it; got {periods}"
            )
        if variant == "nested":
            for a, b in zip(periods, periods[1:]):
                if b % a:
                    raise ValueError(f"nested CMS needs each period to divide the next one, got {periods}")
        self.variant, self.signal = variant, signal
        self.hidden, self.periods, self.inner_lr = hidden, periods, inner_lr
        self.schedule = CMSSchedule(periods, inner_lr)
        self.dtype = to_dtype(dtype)
        kw = dict(norm_eps=norm_eps, init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.levels = nnx.List([CMSLevel(d_model, h, **kw) for h in hidden])
        if variant == "independent":  # aggregation weights of the parallel levels, a plain sum at init
            self.agg = logical_param(None, jax.nn.initializers.ones, (len(hidden),), ("levels",), param_dtype)

    @property
    def num_levels(self) -> int:
        return len(self.hidden)

    @property
    def segment(self) -> int:
        """Largest token count that never straddles a boundary when started on one: min(periods)."""
        return min(self.periods)

    # ---------------------------------------------------------------- state
    def init_state(self, batch_size: int) -> CMSState | None:
        """Fast state at the start of a sequence (None for the static `none` signal)."""
        if self.signal == "none":
            return None
        levels = []
        for i, lvl in enumerate(self.levels):
            w = lvl.init_weights(batch_size)
            d = {"weights": w, "grad_sum": jax.tree.map(jnp.zeros_like, w)}
            if self.variant == "nested" and i < self.num_levels - 1:
                d["reinit"], d["reinit_grad_sum"] = w, d["grad_sum"]
            levels.append(d)
        d_model = self.levels[0].norm.scale.shape[0]
        prev = None
        if self.signal == "local":
            prev = tuple(jnp.zeros((batch_size, d_model), jnp.float32) for _ in self.levels)
        return CMSState(tuple(levels), prev, jnp.zeros((), jnp.int32))

    @staticmethod
    def fast_weights(state: CMSState) -> tuple:
        """The weights the forward reads, one dict per level (what the ntp gradient is taken wrt)."""
        return tuple(lv["weights"] for lv in state.levels)

    @staticmethod
    def with_fast_weights(state: CMSState, weights: tuple) -> CMSState:
        return state._replace(levels=tuple({**lv, "weights": w} for lv, w in zip(state.levels, weights)))

    # ---------------------------------------------------------------- forward
    def _level_in(self, i, z):
        return self.levels[i].norm(z)

    def _combine(self, x, outs):
        """Residual aggregation of level outputs for the independent variant."""
        a = self.agg[...].astype(x.dtype)
        return x + sum(a[i] * o.astype(x.dtype) for i, o in enumerate(outs))

    def apply(self, weights: tuple, x: jax.Array) -> jax.Array:
        """Forward with explicit fast weights (constant over x): x [B, T, D] -> y [B, T, D]."""
        if self.variant == "independent":
            return self._combine(
                x, [swiglu_fast(w, self._level_in(i, x), self.dtype) for i, w in enumerate(weights)]
            )
        z = x
        for i, w in enumerate(weights):
            z = z + swiglu_fast(w, self._level_in(i, z), self.dtype).astype(z.dtype)
        return z

    def static(self, x: jax.Array) -> jax.Array:
        """The `none` signal: the levels as an ordinary MLP stack (their Params used directly)."""
        if self.variant == "independent":
            return self._combine(x, [lvl.mlp(lvl.norm(x)) for lvl in self.levels])
        for lvl in self.levels:
            x = x + lvl.mlp(lvl.norm(x))
        return x

    def __call__(self, x: jax.Array, state: CMSState | None = None):
        """x [B, T, D] -> (y, new state).

        none: the static stack (state passes through). ntp: a read with the state's fast weights
        (the model accumulates the gradients; without a state the initial weights are read). local:
        reads and updates; without a state the sequence starts from the meta-learned init and the
        returned state is None (a training forward).
        """
        if self.signal == "none":
            return self.static(x), state
        if self.signal == "ntp":
            weights = (
                self.fast_weights(state)
                if state is not None
                else self.fast_weights(self.init_state(x.shape[0]))
            )
            return self.apply(weights, x), state
        y, new = self._local(x, state if state is not None else self.init_state(x.shape[0]))
        return y, (new if state is not None else None)

    def accumulate(self, state: CMSState, grads: tuple, num_tokens: int, apply_ok=True) -> CMSState:
        """See CMSSchedule.accumulate."""
        return self.schedule.accumulate(state, grads, num_tokens, apply_ok)

    # ---------------------------------------------------------------- local signal
    def _local_grad(self, w, keys, targets, mask):
        """sum_t mask_t clip(grad_W 1/2 ||MLP(keys_t; W) - targets_t||^2) (one vjp over the tokens).

        Each token's gradient is scaled to norm <= LOCAL_MAX_GRAD_NORM, as the memories clip theirs:
        the l2 loss of a SwiGLU is quartic in its weights, so plain GD at a fixed inner lr diverges once
        a level's weights have grown (hope_tiny at 2,048 tokens: one period's gradient reached 4e5 and
        the loss went NaN at outer step 3). A token's gradient is linear in its output error, so
        scaling the error scales that token's gradient; its norm comes from the per-token factors
        (each weight's gradient is an outer product of the token's input and backpropagated error)."""
        keys = keys.astype(jnp.float32)
        gate = keys @ w["gate"]
        up = keys @ w["up"]
        act = jax.nn.silu(gate)
        err = (act * up) @ w["down"] - targets  # [B, T, D]
        d_hid = err @ jnp.swapaxes(w["down"], -1, -2)
        d_gate = d_hid * up * jax.grad(lambda g: jnp.sum(jax.nn.silu(g)))(gate)
        sq = lambda a: jnp.sum(a * a, axis=-1)  # noqa: E731
        norm_sq = sq(act * up) * sq(err) + sq(keys) * (sq(d_gate) + sq(d_hid * act))
        scale = LOCAL_MAX_GRAD_NORM * jax.lax.rsqrt(jnp.maximum(norm_sq, LOCAL_MAX_GRAD_NORM**2))
        out, vjp = jax.vjp(lambda w_: swiglu_fast(w_, keys, self.dtype).astype(jnp.float32), w)
        return vjp(err * (scale * mask)[..., None])[0]

    def _local_level(self, i, lv, prev, u, pos):
        """Level i over u [B, T, D] from token count pos: outputs, new level state, new prev.

        The tokens are laid out on the level's period grid (left-padded by pos % P, right-padded to
        whole periods) and scanned period by period; a period's update is applied iff its last
        token is real (its end <= pos + T)."""
        b, t, d = u.shape
        p = self.periods[i]
        u32 = u.astype(jnp.float32)
        keys = jnp.concatenate([prev[:, None], u32[:, :-1]], axis=1)  # u_{t-1}
        valid = jnp.broadcast_to((pos + jnp.arange(t)) > 0, (b, t)).astype(jnp.float32)
        if t == 1:  # decode: one token, no period grid
            out = swiglu_fast(lv["weights"], u, self.dtype)
            lv = self.schedule.add_grads(lv, self._local_grad(lv["weights"], keys, u32, valid))
            lv = self.schedule.level_boundary(i, lv, pos + 1)
            return out, lv, u32[:, -1]
        off = pos % p
        n = -(-(t + p - 1) // p)  # static bound on the number of periods touched
        total = n * p

        def grid(a):  # [B, T, ...] -> [n, B, P, ...], token j at slot off + j
            z = jnp.zeros((b, total) + a.shape[2:], a.dtype)
            z = jax.lax.dynamic_update_slice_in_dim(z, a, off, axis=1)
            return jnp.moveaxis(z.reshape((b, n, p) + a.shape[2:]), 1, 0)

        ends = pos - off + p * (jnp.arange(n) + 1)  # token count at each grid period's end

        def body(lv, xs):
            ub, kb, mb, end = xs
            out = swiglu_fast(lv["weights"], ub, self.dtype)
            lv = self.schedule.add_grads(lv, self._local_grad(lv["weights"], kb, ub.astype(jnp.float32), mb))
            lv = self.schedule.level_boundary(i, lv, end, end <= pos + t)
            return lv, out

        lv, outs = jax.lax.scan(body, lv, (grid(u), grid(keys), grid(valid), ends))
        outs = jnp.moveaxis(outs, 0, 1).reshape(b, total, d)
        out = jax.lax.dynamic_slice_in_dim(outs, off, t, axis=1)
        return out, lv, u32[:, -1]

    def _local(self, x: jax.Array, state: CMSState):
        levels, prevs = list(state.levels), list(state.prev)
        if self.variant == "independent":
            outs = []
            for i in range(self.num_levels):
                o, levels[i], prevs[i] = self._local_level(
                    i, levels[i], prevs[i], self._level_in(i, x), state.pos
                )
                outs.append(o)
            y = self._combine(x, outs)
        else:
            y = x
            for i in range(self.num_levels):
                o, levels[i], prevs[i] = self._local_level(
                    i, levels[i], prevs[i], self._level_in(i, y), state.pos
                )
                y = y + o.astype(y.dtype)
        return y, CMSState(tuple(levels), tuple(prevs), state.pos + x.shape[1])
