"""Pallas kernels for the sequential part of the chunked form, for the linear memory (the gated
delta rule family, with or without momentum): `memory_chunked(..., impl="pallas")`.

It lives next to `chunked.py` because it is the same closed form split in two, and reuses that
module's coefficients (`_coefs`, `unit_lower_inverse`):

  XLA, all chunks at once   everything that does not depend on the running state: the retention
                            and momentum products, the DGD unit lower-triangular inverse (the UT/WY
                            algebra) and the read masks, folded into a few matrices per chunk
                            (`_operands`)
  Pallas, chunk after chunk the state recurrence and the reads, with the per-(batch, head) state
                            (W, and the momentum S) kept in the kernel across chunks

Every quantity of `chunked.chunk_update` for the linear memory is linear in the chunk's starting
state (W [Dv, Dk], S), so per chunk (C tokens) the kernel only does

  U  = Ne (K W^T) + Re                    eta_s e_s, the per-token gradient factors      [C, Dv]
  G  = Nw (K W^T) + Ns (K S^T) + Rg       gamma_s p_s, the DGD factors (momentum and DGD only)
  Y  = Qa W^T + Qm S^T - Aq U - Ag G      the reads
  W' = a W + mu S - U^T Kd - G^T Kg       the state after the chunk
  S' = b S - U^T Kb

with the C x C matrices Ne, Nw, Ns, Aq, Ag, the [C, D] matrices Re, Rg, Qa, Qm, Kd, Kg, Kb and the
scalars a, mu, b built by `_operands`. Without momentum (Cm = A in `chunked`) the DGD factors share
U's coefficients, so G folds into U and S, Qm, Ns, Ag, Kg, Kb, mu, b are absent (None).

Backward: the same kernel shape run in reverse over chunks, carrying dL/dW (and dL/dS), from the
chunk-start states the forward saves (`_backward_step`, checked against autodiff of
`_forward_step` in the tests); the cotangents of the operands then flow through `_operands` by
ordinary XLA autodiff.

Two kernel layouts of the same step functions, chosen by the platform lowered for:

  grid   grid (B*H, chunks), the chunk axis sequential, the state resident in an output block
         across it; each chunk's operands are streamed in by the pipeline. Mosaic (TPU), and
         interpret mode on CPU.
  loop   grid (B*H,), one program per (batch, head) looping over its chunks with the state in the
         loop carry: Triton runs a grid's programs concurrently, so no grid axis can carry the
         state there. Triton (GPU); `layout="loop"` runs it in interpret mode on CPU.

Under a mesh the call runs inside a `shard_map` over the batch and head axes (Pallas kernels are
not partitioned automatically; every (batch, head) is independent).

Supported: structure "linear", objectives l2 and dot, retention, momentum, DGD, every read mode
(DeltaNet, the gated delta rule, linear attention / RetNet, Titans' and deep linear attention's
linear memories, the linear self-modifying update). Not supported: fast biases, the inner
LayerNorm, self_target, max_grad_norm, delta_scale, the MLP memory.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from nl_jax.memory.ops import update_rule
from nl_jax.memory.ops import structures as st
from nl_jax.memory.ops.chunked import _coefs, unit_lower_inverse

_HIGHEST = jax.lax.Precision.HIGHEST
LAYOUTS = ("grid", "loop")


def unsupported(spec: st.MemorySpec, state: st.MemoryState, rates: update_rule.Rates, norm) -> list[str]:
    """What of this call the kernels do not cover (empty when they cover all of it)."""
    checks = {
        f"structure={spec.structure!r}": spec.structure != "linear",
        "bias=True": spec.bias,
        "norm=True": spec.norm or norm is not None,
        "self_target=True": spec.self_target,
        f"max_grad_norm={spec.max_grad_norm}": spec.max_grad_norm > 0,
        "delta_scale": rates.delta_scale is not None,
    }
    return [name for name, bad in checks.items() if bad]


def check_supported(spec, state, rates, norm) -> None:
    missing = unsupported(spec, state, rates, norm)
    if missing:
        raise ValueError(
            f"memory_chunked(impl='pallas') covers the linear memory (with or without momentum); this call "
            f"has {', '.join(missing)}: use impl='xla'"
        )


# ---------------------------------------------------------------------------------------------
# The chunk-parallel part (XLA)


class _Operands(NamedTuple):
    """Per chunk, in kernel layout [B*H, N, ...], float32 (see the module docstring); the fields of
    momentum (and of DGD with momentum) are None without it, the read's masks None for `boundary`."""

    qa: jax.Array  # [BH, N, C, Dk] queries scaled by the read's prefix retention
    k: jax.Array  # [BH, N, C, Dk]
    ne: jax.Array  # [BH, N, C, C]  U's dependence on K W^T
    re: jax.Array  # [BH, N, C, Dv] U's part that does not depend on the state
    kd: jax.Array  # [BH, N, C, Dk] keys scaled by U's coefficient in the chunk's last state
    a: jax.Array  # [BH, N, 1, 1]  retention over the whole chunk
    aq: jax.Array | None  # [BH, N, C, C] the read's masked Q K^T against U
    qm: jax.Array | None = None  # [BH, N, C, Dk] queries scaled by the read's momentum coefficient
    mu: jax.Array | None = None  # [BH, N, 1, 1] S's coefficient in the chunk's last W
    b: jax.Array | None = None  # [BH, N, 1, 1] momentum decay over the whole chunk
    kb: jax.Array | None = None  # [BH, N, C, Dk] keys scaled by U's coefficient in the last S
    nw: jax.Array | None = None  # [BH, N, C, C] G's dependence on K W^T
    ns: jax.Array | None = None  # [BH, N, C, C] G's dependence on K S^T
    rg: jax.Array | None = None  # [BH, N, C, Dv]
    ag: jax.Array | None = None  # [BH, N, C, C] the read's masked Q K^T against G
    kg: jax.Array | None = None  # [BH, N, C, Dk]


def _kernel_layout(x: jax.Array, c: int) -> jax.Array:
    """[B, T, H, ...] -> [B*H, N, C, ...]."""
    b, t, h = x.shape[:3]
    x = jnp.moveaxis(x.reshape(b, t // c, c, h, *x.shape[3:]), 3, 1)
    return x.reshape(b * h, t // c, c, *x.shape[4:]).astype(jnp.float32)


def _from_kernel_layout(y: jax.Array, b: int, h: int) -> jax.Array:
    """[B*H, N, C, D] -> [B, N C, H, D]."""
    _, n, c, d = y.shape
    return jnp.moveaxis(y.reshape(b, h, n * c, d), 1, 2)


def _operands(spec: st.MemorySpec, q, k, v, rates: update_rule.Rates, read: str) -> _Operands:
    """The state-independent matrices of every chunk (inputs in kernel layout, rates [BH, N, C]).

    From `chunked.chunk_update` with W_0 = W, S_0 = S: U = eta E with the errors
    E = lam (K W^T) - V (lam = 1 for l2, 0 for dot), and the DGD predictions
    P = T^-1 (a' (K W^T) + mu' (K S^T) - (Cm' * K K^T) U) with T = I + (A' * K K^T) diag(gamma),
    G = gamma P (primes: the coefficients of the state before each token).
    """
    post, pre = _coefs(rates)
    eta = rates.lr
    lam = eta if spec.objective == "l2" else jnp.zeros_like(eta)
    eye = jnp.eye(k.shape[-2], dtype=k.dtype)
    mm = functools.partial(jnp.matmul, precision=_HIGHEST)
    ne = lam[..., :, None] * eye
    re = -eta[..., None] * v
    momentum = rates.momentum is not None
    nw = ns = rg = None
    if rates.dgd is not None:
        gamma = rates.dgd[..., :, None]
        gram = jnp.einsum("...ti,...si->...ts", k, k, precision=_HIGHEST)
        t_inv = unit_lower_inverse(eye + (pre.A * gram) * rates.dgd[..., None, :])
        cg = pre.Cm * gram  # (Cm' * K K^T)
        nw = gamma * mm(t_inv, pre.a[..., :, None] * eye - cg * lam[..., None, :])
        rg = gamma * mm(t_inv, mm(cg, eta[..., None] * v))
        if momentum:
            ns = gamma * (t_inv * pre.mu[..., None, :])
        else:  # U and G share their coefficients: fold G into U
            ne, re, nw, rg = ne + nw, re + rg, None, None
    ops = dict(k=k, ne=ne, re=re, kd=post.Cm[..., -1, :, None] * k, a=post.a[..., -1, None, None])
    if momentum:
        last = lambda x: x[..., -1, None, None]  # noqa: E731  (a coefficient over the whole chunk)
        ops.update(mu=last(post.mu), b=last(post.b), kb=post.Bm[..., -1, :, None] * k)
        if nw is not None:
            ops.update(nw=nw, ns=ns, rg=rg, kg=post.A[..., -1, :, None] * k)
    if read == "boundary":
        return _Operands(qa=q, aq=None, **ops)
    co = pre if read == "per_token" else post
    qk = jnp.einsum("...ti,...si->...ts", q, k, precision=_HIGHEST)
    ops.update(qa=co.a[..., None] * q, aq=co.Cm * qk)
    if momentum:
        ops.update(qm=co.mu[..., None] * q)
        if nw is not None:
            ops.update(ag=co.A * qk)
    return _Operands(**ops)


# ---------------------------------------------------------------------------------------------
# One chunk of the sequential part: pure functions of values, used inside the kernels


def _dot(a, b, contract):
    """a [.., .] x b [.., .] over the given (lhs, rhs) dimensions, full float32."""
    return jax.lax.dot_general(
        a, b, ((contract[:1], contract[1:]), ((), ())), precision=_HIGHEST, preferred_element_type=jnp.float32
    )


def _mm(a, b):  # a b
    return _dot(a, b, (1, 0))


def _mm_t(a, b):  # a b^T
    return _dot(a, b, (1, 1))


def _t_mm(a, b):  # a^T b
    return _dot(a, b, (0, 0))


def _forward_step(state, o: _Operands):
    """(Y [C, Dv], state after the chunk) of one chunk from its starting state (W,) or (W, S)."""
    w, s = state if len(state) == 2 else (state[0], None)
    kw = _mm_t(o.k, w)
    u = _mm(o.ne, kw) + o.re
    y = _mm_t(o.qa, w)
    if o.aq is not None:
        y = y - _mm(o.aq, u)
    w_next = o.a * w - _t_mm(u, o.kd)
    if s is None:
        return y, (w_next,)
    if o.qm is not None:
        y = y + _mm_t(o.qm, s)
    w_next = w_next + o.mu * s
    s_next = o.b * s - _t_mm(u, o.kb)
    if o.nw is not None:
        g = _mm(o.nw, kw) + _mm(o.ns, _mm_t(o.k, s)) + o.rg
        if o.ag is not None:
            y = y - _mm(o.ag, g)
        w_next = w_next - _t_mm(g, o.kg)
    return y, (w_next, s_next)


def _backward_step(state, dstate_next, dy, o: _Operands):
    """The VJP of `_forward_step`: (dL/d state, dL/d operands) from dL/dY and dL/d(state after)."""
    w, s = state if len(state) == 2 else (state[0], None)
    dw_next, ds_next = dstate_next if len(dstate_next) == 2 else (dstate_next[0], None)
    d = {}
    kw = _mm_t(o.k, w)
    u = _mm(o.ne, kw) + o.re
    du = -_mm_t(o.kd, dw_next)
    if o.aq is not None:
        du = du - _t_mm(o.aq, dy)
        d["aq"] = -_mm_t(dy, u)
    dw = o.a * dw_next + _t_mm(dy, o.qa)
    d["qa"], d["kd"], d["a"] = _mm(dy, w), -_mm(u, dw_next), jnp.sum(dw_next * w, keepdims=True)
    if s is not None:
        du = du - _mm_t(o.kb, ds_next)
        ds = o.mu * dw_next + o.b * ds_next
        d["mu"], d["b"] = jnp.sum(dw_next * s, keepdims=True), jnp.sum(ds_next * s, keepdims=True)
        d["kb"] = -_mm(u, ds_next)
        if o.qm is not None:
            ds = ds + _t_mm(dy, o.qm)
            d["qm"] = _mm(dy, s)
    dkw = _t_mm(o.ne, du)
    d["ne"], d["re"] = _mm_t(du, kw), du
    dk = 0.0
    if o.nw is not None:
        ks = _mm_t(o.k, s)
        g = _mm(o.nw, kw) + _mm(o.ns, ks) + o.rg
        dg = -_mm_t(o.kg, dw_next)
        if o.ag is not None:
            dg = dg - _t_mm(o.ag, dy)
            d["ag"] = -_mm_t(dy, g)
        dkw = dkw + _t_mm(o.nw, dg)
        dks = _t_mm(o.ns, dg)
        ds = ds + _t_mm(dks, o.k)
        dk = _mm(dks, s)
        d["nw"], d["ns"], d["rg"], d["kg"] = _mm_t(dg, kw), _mm_t(dg, ks), dg, -_mm(g, dw_next)
    dw = dw + _t_mm(dkw, o.k)
    d["k"] = dk + _mm(dkw, w)
    grads = _Operands(**{f: (None if getattr(o, f) is None else d[f]) for f in _Operands._fields})
    return ((dw,) if s is None else (dw, ds)), grads


# ---------------------------------------------------------------------------------------------
# The kernels. Refs arrive flat: the operands' leaves (None fields dropped) are rebuilt with the
# operands' treedef. One body per pass runs a chunk; the layout decides what feeds it (module
# docstring): in `grid` the blocks are one chunk (index `...`) and the state is an output block
# that stays resident across the sequential chunk axis, in `loop` the blocks hold every chunk of one
# (batch, head) (index i) and the state is a loop carry.


def _split(refs, *sizes):
    """refs cut into consecutive groups of the given sizes, the rest last."""
    groups, at = [], 0
    for size in sizes:
        groups.append(refs[at : at + size])
        at += size
    return (*groups, refs[at:])


def _forward_kernel(*refs, ns: int, treedef, save: bool, layout: str):
    s0, op_refs, (y_ref,), st_refs, saved = _split(refs, ns, treedef.num_leaves, 1, ns)

    def chunk(i, state):
        for ref, x in zip(saved, state if save else ()):
            ref[i] = x
        y, new = _forward_step(state, jax.tree.unflatten(treedef, [ref[i] for ref in op_refs]))
        y_ref[i] = y
        return new

    if layout == "loop":
        final = jax.lax.fori_loop(0, op_refs[0].shape[0], chunk, tuple(ref[...] for ref in s0))
    else:

        @pl.when(pl.program_id(1) == 0)
        def _():
            for ref, ref0 in zip(st_refs, s0):
                ref[...] = ref0[...]

        final = chunk(..., tuple(ref[...] for ref in st_refs))
    for ref, x in zip(st_refs, final):
        ref[...] = x


def _backward_kernel(*refs, ns: int, treedef, layout: str):
    no = treedef.num_leaves
    saved, (dy_ref,), d_final, op_refs, dop_refs, d_refs = _split(refs, ns, 1, ns, no, no)

    def chunk(i, dstate):
        ops = jax.tree.unflatten(treedef, [ref[i] for ref in op_refs])
        dstate, grads = _backward_step(tuple(ref[i] for ref in saved), dstate, dy_ref[i], ops)
        for ref, g in zip(dop_refs, jax.tree.leaves(grads)):
            ref[i] = g
        return dstate

    if layout == "loop":
        n = op_refs[0].shape[0]
        d0 = jax.lax.fori_loop(0, n, lambda j, d: chunk(n - 1 - j, d), tuple(ref[...] for ref in d_final))
    else:  # the blocks arrive in reverse chunk order

        @pl.when(pl.program_id(1) == 0)
        def _():
            for ref, ref0 in zip(d_refs, d_final):
                ref[...] = ref0[...]

        d0 = chunk(..., tuple(ref[...] for ref in d_refs))
    for ref, x in zip(d_refs, d0):
        ref[...] = x


def _chunk_spec(x: jax.Array, layout: str, reverse: bool = False) -> pl.BlockSpec:
    """A [BH, N, ...] array: one chunk per grid step (`grid`; in reverse chunk order for the
    backward), or all chunks of one (batch, head) per program (`loop`)."""
    if layout == "loop":
        return pl.BlockSpec((pl.squeezed, *x.shape[1:]), lambda b: (b,) + (0,) * (len(x.shape) - 1))
    nc = x.shape[1]
    index = (lambda b, i: (b, nc - 1 - i, 0, 0)) if reverse else (lambda b, i: (b, i, 0, 0))
    return pl.BlockSpec((pl.squeezed, pl.squeezed, *x.shape[2:]), index)


def _state_spec(w: jax.Array, layout: str) -> pl.BlockSpec:
    """The [Dv, Dk] state of one (batch, head), the same block for every chunk (so it stays resident)."""
    index = (lambda b: (b, 0, 0)) if layout == "loop" else (lambda b, i: (b, 0, 0))
    return pl.BlockSpec((pl.squeezed, *w.shape[1:]), index)


class _How(NamedTuple):
    """How the kernels run: `interpret` True, Pallas interpret mode in `layout`; otherwise by the
    platform lowered for: interpret mode in `layout` on CPU, Triton in the loop layout on GPU,
    Mosaic in the grid layout otherwise."""

    interpret: bool | None
    layout: str


def _call(kernel, how: _How, grid_of, in_specs_of, out_specs_of, out_shape):
    """The pallas_call of `kernel` (a function of refs and `layout`) for the way `how` says (see
    `_How`); `grid_of`, `in_specs_of` and `out_specs_of` take the layout."""

    def build(layout: str, backend: str):
        params = None
        if backend == "mosaic":  # (batch * head) blocks independent, chunks in order
            params = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))
        elif backend == "triton":
            params = pltriton.CompilerParams()
        return pl.pallas_call(
            functools.partial(kernel, layout=layout),
            grid=grid_of(layout),
            in_specs=in_specs_of(layout),
            out_specs=out_specs_of(layout),
            out_shape=out_shape,
            interpret=backend == "interpret",
            compiler_params=params,
        )

    if how.interpret:
        return build(how.layout, "interpret")
    triton = build("loop", "triton")
    return lambda *args: jax.lax.platform_dependent(
        *args, cpu=build(how.layout, "interpret"), cuda=triton, rocm=triton, default=build("grid", "mosaic")
    )


def _forward(state0: tuple, ops: _Operands, *, save: bool, how: _How):
    """(Y [BH, N, C, Dv], final state [BH, Dv, Dk] each[, chunk-start states [BH, N, Dv, Dk] each])."""
    leaves, treedef = jax.tree.flatten(ops)
    bh, nc, c, _ = ops.qa.shape
    dv = ops.re.shape[-1]
    ns = len(state0)
    w_shape = state0[0].shape
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    out_shape = [f32(bh, nc, c, dv)] + [f32(*w_shape)] * ns
    out_shape += [f32(bh, nc, *w_shape[1:])] * (ns if save else 0)

    def out_specs(layout):
        specs = [_chunk_spec(ops.re, layout)] + [_state_spec(state0[0], layout)] * ns
        return specs + [_chunk_spec(x, layout) for x in out_shape[1 + ns :]]

    call = _call(
        functools.partial(_forward_kernel, ns=ns, treedef=treedef, save=save),
        how,
        lambda layout: (bh,) if layout == "loop" else (bh, nc),
        lambda layout: [_state_spec(x, layout) for x in state0] + [_chunk_spec(x, layout) for x in leaves],
        out_specs,
        out_shape,
    )
    y, *rest = call(*state0, *leaves)
    return y, tuple(rest[:ns]), tuple(rest[ns:])


def _backward(saved: tuple, ops: _Operands, dy, d_final: tuple, *, how: _How):
    """Reverse scan over chunks: (dL/d initial state, dL/d ops)."""
    leaves, treedef = jax.tree.flatten(ops)
    bh, nc = ops.qa.shape[:2]
    ns = len(saved)
    rev = lambda layout: functools.partial(_chunk_spec, layout=layout, reverse=True)  # noqa: E731
    call = _call(
        functools.partial(_backward_kernel, ns=ns, treedef=treedef),
        how,
        lambda layout: (bh,) if layout == "loop" else (bh, nc),
        lambda layout: (
            [rev(layout)(x) for x in (*saved, dy)]
            + [_state_spec(x, layout) for x in d_final]
            + [rev(layout)(x) for x in leaves]
        ),
        lambda layout: [rev(layout)(x) for x in leaves] + [_state_spec(x, layout) for x in d_final],
        [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (*leaves, *d_final)],
    )
    out = call(*saved, dy, *d_final, *leaves)
    return tuple(out[len(leaves) :]), jax.tree.unflatten(treedef, out[: len(leaves)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _recurrence(state0: tuple, ops: _Operands, how: _How):
    y, final, _ = _forward(state0, ops, save=False, how=how)
    return y, final


def _recurrence_fwd(state0, ops, how):
    y, final, saved = _forward(state0, ops, save=True, how=how)
    return (y, final), (saved, ops)


def _recurrence_bwd(how, res, cot):
    saved, ops = res
    dy, d_final = cot
    return _backward(saved, ops, dy, d_final, how=how)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


# ---------------------------------------------------------------------------------------------
# Entry


def _partitioned(fn, q, rates, state0):
    """`fn` under a `shard_map` when a mesh is set (`jax.set_mesh`): Pallas kernels are not
    partitioned automatically, and every (batch, head) is independent, so each device runs the
    kernel on its own block of sequences and heads, laid out by the logical-axis rules."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn
    from nl_jax.parallel.rules import batch_and_head_axes  # noqa: PLC0415 (only under a mesh)

    batch_axes, head_axes = batch_and_head_axes(q.shape[0], q.shape[2], mesh)
    tok = jax.sharding.PartitionSpec(batch_axes, None, head_axes, None)
    per_head = jax.sharding.PartitionSpec(batch_axes, None, head_axes)
    weights = jax.sharding.PartitionSpec(batch_axes, head_axes, None, None)
    rate_specs = jax.tree.map(lambda _: per_head, rates)
    state_specs = jax.tree.map(lambda _: weights, state0)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(state_specs, tok, tok, tok, rate_specs),
        out_specs=(tok, state_specs),
        check_vma=False,
    )


def memory_chunked_pallas(
    spec: st.MemorySpec,
    state: st.MemoryState,
    q,
    k,
    v,
    rates: update_rule.Rates,
    *,
    chunk_size: int,
    read: str = "per_token",
    interpret: bool | None = None,
    layout: str = "grid",
):
    """`memory_chunked` with the Pallas kernels (same contract; call it through
    `memory_chunked(..., impl="pallas")`, which checks the state). `interpret`: Pallas interpret
    mode; None decides by the lowering platform (interpret on CPU, Triton on GPU, Mosaic on TPU).
    `layout`: the kernel layout of interpret mode ("grid" or "loop", module docstring); compiled
    kernels take their platform's."""
    update_rule.check_call(spec, state, rates, read, chunk_size)
    check_supported(spec, state, rates, None)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if q.shape[1] % chunk_size:
        raise ValueError(f"chunk_size {chunk_size} does not divide the sequence length {q.shape[1]}")
    if (rates.momentum is None) != (state.momentum is None):
        raise ValueError("momentum rates and a momentum state go together")
    state0 = (state.weights.w,) if state.momentum is None else (state.weights.w, state.momentum.w)
    how = _How(interpret, layout)
    run = functools.partial(_kernel_call, spec, chunk_size=chunk_size, read=read, how=how)
    y, final = _partitioned(run, q, rates, state0)(state0, q, k, v, rates)
    w = st.LinearWeights(final[0])
    s = st.LinearWeights(final[1]) if len(final) == 2 else None
    return y, st.MemoryState(w, s, w, jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("spec", "chunk_size", "read", "how"))
def _kernel_call(
    spec: st.MemorySpec,
    state0: tuple,
    q,
    k,
    v,
    rates: update_rule.Rates,
    *,
    chunk_size: int,
    read: str,
    how: _How,
):
    """(y, final state) of the kernels from the state (W,) or (W, S), each [B, H, Dv, Dk], of the
    (local) batch."""
    b, h = q.shape[0], q.shape[2]
    lay = lambda x: _kernel_layout(x, chunk_size)  # noqa: E731
    rates_k = jax.tree.map(lambda r: lay(r[..., None])[..., 0], rates)
    ops = _operands(spec, lay(q), lay(k), lay(v), rates_k, read)
    flat = tuple(x.reshape(b * h, *x.shape[2:]).astype(jnp.float32) for x in state0)
    y, final = _recurrence(flat, ops, how)
    y = _from_kernel_layout(y, b, h).astype(jnp.result_type(q.dtype, v.dtype, state0[0].dtype))
    return y, tuple(x.reshape(x0.shape).astype(x0.dtype) for x, x0 in zip(final, state0))
