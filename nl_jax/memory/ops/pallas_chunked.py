"""A Pallas kernel for the sequential part of the chunked form, for the linear memory (the gated
delta rule family): `memory_chunked(..., impl="pallas")`.

It lives next to `chunked.py` because it is the same closed form split in two, and reuses that
module's coefficients (`segment_products`, `unit_lower_inverse`):

  XLA, all chunks at once   everything that does not depend on the running state: the retention
                            products, the DGD unit lower-triangular inverse (the UT/WY algebra) and
                            the read masks, folded into a few matrices per chunk (`_operands`)
  Pallas, chunk after chunk the state recurrence and the reads, with the per-(batch, head) state
                            kept in the kernel across chunks (grid (B*H, chunks): the first axis
                            parallel, the second sequential)

For the linear memory without momentum every quantity of chunk_update is linear in the chunk's
starting state W [Dv, Dk], so per chunk (C tokens) the kernel only does

  U  = N (K W^T) + R              the per-token updates (eta e_s + gamma p_s of `chunked`), [C, Dv]
  Y  = Qs W^T - Aq U              the reads
  W' = a W - U^T Kd               the state after the chunk

with N [C, C], R [C, Dv], Qs, Kd [C, Dk], Aq [C, C] and the scalar a built by `_operands`.

Backward: a second Pallas kernel, a reverse scan over chunks carrying dL/dW (`_backward_step`),
from the chunk-start states the forward kernel saves; the cotangents of the operands then flow
through `_operands` by ordinary XLA autodiff. The interpret choice is made at lowering
(`jax.lax.platform_dependent`): interpret mode when lowering for CPU (exact, slow: for tests),
Mosaic otherwise, so an AOT compile for TPU from a CPU host gets the compiled kernel. Under a mesh
the call runs inside a `shard_map` over the batch and head axes (Mosaic kernels are not
partitioned automatically; every (batch, head) is independent). GPU is refused: Triton runs the
grid's programs concurrently, so the chunk axis cannot carry the state there (a GPU variant would
loop over chunks inside one program per (batch, head)).

Supported: structure "linear", objectives l2 and dot, retention, DGD, every read mode (DeltaNet,
the gated delta rule, linear attention / RetNet, the linear self-modifying update without
momentum). Not supported: momentum, fast biases, the inner LayerNorm, self_target,
max_grad_norm, delta_scale, the MLP memory.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from nl_jax.memory.ops import update_rule
from nl_jax.memory.ops import structures as st
from nl_jax.memory.ops.chunked import _coefs, unit_lower_inverse

_HIGHEST = jax.lax.Precision.HIGHEST


def unsupported(spec: st.MemorySpec, state: st.MemoryState, rates: update_rule.Rates, norm) -> list[str]:
    """What of this call the kernel does not cover (empty when it covers all of it)."""
    checks = {
        f"structure={spec.structure!r}": spec.structure != "linear",
        "bias=True": spec.bias,
        "norm=True": spec.norm or norm is not None,
        "self_target=True": spec.self_target,
        f"max_grad_norm={spec.max_grad_norm}": spec.max_grad_norm > 0,
        "momentum": rates.momentum is not None or state.momentum is not None,
        "delta_scale": rates.delta_scale is not None,
    }
    return [name for name, bad in checks.items() if bad]


def check_supported(spec, state, rates, norm) -> None:
    missing = unsupported(spec, state, rates, norm)
    if missing:
        raise ValueError(
            f"memory_chunked(impl='pallas') covers the linear memory without momentum; this call has "
            f"{', '.join(missing)}: use impl='xla'"
        )


# ---------------------------------------------------------------------------------------------
# The chunk-parallel part (XLA)


class _Operands(NamedTuple):
    """Per chunk, in kernel layout [B*H, N, ...], float32 (see the module docstring)."""

    qs: jax.Array  # [BH, N, C, Dk] queries scaled by the read's prefix retention
    k: jax.Array  # [BH, N, C, Dk]
    n: jax.Array  # [BH, N, C, C]  U's dependence on K W^T
    r: jax.Array  # [BH, N, C, Dv] U's part that does not depend on the state
    aq: jax.Array  # [BH, N, C, C]  the read's retention-masked Q K^T
    kd: jax.Array  # [BH, N, C, Dk] keys scaled by their retention to the chunk's end
    a: jax.Array  # [BH, N, 1, 1]  retention over the whole chunk


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

    From `chunked.chunk_update` with W_0 = W: the errors are lam (K W^T) - eta V (lam = eta for
    l2, 0 for dot), the DGD predictions P = T^-1 (a' (K W^T) - (A' * K K^T) E) with
    T = I + (A' * K K^T) diag(gamma), and U = eta E + gamma P; so U = N (K W^T) + R.
    """
    post, pre = _coefs(rates)
    eta = rates.lr
    lam = eta if spec.objective == "l2" else jnp.zeros_like(eta)
    eye = jnp.eye(k.shape[-2], dtype=k.dtype)
    n = lam[..., :, None] * eye
    r = -eta[..., None] * v
    if rates.dgd is not None:
        gamma = rates.dgd
        gram = jnp.einsum("...ti,...si->...ts", k, k, precision=_HIGHEST)
        lower = pre.A * gram  # (A' * K K^T)
        t_inv = unit_lower_inverse(eye + lower * gamma[..., None, :])
        m1 = jnp.matmul(t_inv, pre.a[..., :, None] * eye - lower * lam[..., None, :], precision=_HIGHEST)
        m2v = jnp.matmul(
            t_inv, jnp.matmul(lower * eta[..., None, :], v, precision=_HIGHEST), precision=_HIGHEST
        )
        n = n + gamma[..., :, None] * m1
        r = r + gamma[..., None] * m2v
    if read == "boundary":
        qs, aq = q, jnp.zeros_like(n)
    else:
        co = pre if read == "per_token" else post
        qs = co.a[..., None] * q
        aq = co.A * jnp.einsum("...ti,...si->...ts", q, k, precision=_HIGHEST)
    kd = post.A[..., -1, :, None] * k
    return _Operands(qs, k, n, r, aq, kd, post.a[..., -1, None, None])


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


def _forward_step(w, qs, k, n, r, aq, kd, a):
    """(Y [C, Dv], W' [Dv, Dk]) of one chunk from its starting state w [Dv, Dk]."""
    u = _mm(n, _mm_t(k, w)) + r
    y = _mm_t(qs, w) - _mm(aq, u)
    return y, a * w - _t_mm(u, kd)


def _backward_step(w, dw_next, dy, qs, k, n, r, aq, kd, a):
    """The VJP of `_forward_step`: (dL/dw, dL/d(qs, k, n, r, aq, kd, a)) from dL/dY and dL/dW'."""
    kw = _mm_t(k, w)
    u = _mm(n, kw) + r
    du = -_t_mm(aq, dy) - _mm_t(kd, dw_next)
    dkw = _t_mm(n, du)
    dw = a * dw_next + _t_mm(dy, qs) + _t_mm(dkw, k)
    grads = (
        _mm(dy, w),  # qs
        _mm(dkw, w),  # k
        _mm_t(du, kw),  # n
        du,  # r
        -_mm_t(dy, u),  # aq
        -_mm(u, dw_next),  # kd
        jnp.sum(dw_next * w, keepdims=True),  # a
    )
    return dw, grads


# ---------------------------------------------------------------------------------------------
# The kernels: grid (B*H, chunks), the state resident in an output block across the chunk axis


def _chunk_spec(x: jax.Array, reverse: bool = False) -> pl.BlockSpec:
    """One chunk of a [BH, N, C, D] array per grid step (in reverse chunk order for the backward)."""
    nc = x.shape[1]
    index = (lambda b, i: (b, nc - 1 - i, 0, 0)) if reverse else (lambda b, i: (b, i, 0, 0))
    return pl.BlockSpec((pl.squeezed, pl.squeezed, *x.shape[2:]), index)


def _state_spec(w: jax.Array) -> pl.BlockSpec:
    """The [Dv, Dk] state of one (batch, head), the same block for every chunk (so it stays resident)."""
    return pl.BlockSpec((pl.squeezed, *w.shape[1:]), lambda b, i: (b, 0, 0))


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret: bool | None):
    """The pallas_call; `interpret=None` decides by the platform the computation is lowered for
    (interpret mode for CPU, Mosaic otherwise), so an AOT compile for TPU from a CPU host gets the
    compiled kernel and the same jitted function still runs on the CPU."""

    def build(interpret: bool):
        params = None
        if not interpret:  # Mosaic (TPU): (batch * head) blocks independent, chunks in order
            params = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))
        return pl.pallas_call(
            kernel,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            out_shape=out_shape,
            interpret=interpret,
            compiler_params=params,
        )

    if interpret is not None:
        return build(interpret)
    return lambda *args: jax.lax.platform_dependent(*args, cpu=build(True), default=build(False))


def _forward_kernel(w0_ref, *refs, save_states: bool):
    ops_refs, (y_ref, w_ref, *ws_ref) = refs[:7], refs[7:]

    @pl.when(pl.program_id(1) == 0)
    def _():
        w_ref[...] = w0_ref[...]

    w = w_ref[...]
    if save_states:
        ws_ref[0][...] = w
    y, w_next = _forward_step(w, *(ref[...] for ref in ops_refs))
    y_ref[...] = y
    w_ref[...] = w_next


def _forward(w0, ops: _Operands, *, save_states: bool, interpret: bool):
    """(Y [BH, N, C, Dv], final state [BH, Dv, Dk][, chunk-start states [BH, N, Dv, Dk]])."""
    bh, nc, c, _ = ops.qs.shape
    dv = ops.r.shape[-1]
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    out_shape = [f32(bh, nc, c, dv), f32(*w0.shape)]
    out_specs = [_chunk_spec(ops.r), _state_spec(w0)]
    if save_states:
        out_shape.append(f32(bh, nc, *w0.shape[1:]))
        out_specs.append(pl.BlockSpec((pl.squeezed, pl.squeezed, *w0.shape[1:]), lambda b, i: (b, i, 0, 0)))
    call = _call(
        functools.partial(_forward_kernel, save_states=save_states),
        (bh, nc),
        [_state_spec(w0)] + [_chunk_spec(x) for x in ops],
        out_specs,
        out_shape,
        interpret,
    )
    return call(w0, *ops)


def _backward_kernel(ws_ref, dy_ref, dwf_ref, *refs):
    ops_refs, (dops_refs, dw_ref) = refs[:7], (refs[7:14], refs[14])

    @pl.when(pl.program_id(1) == 0)
    def _():
        dw_ref[...] = dwf_ref[...]

    dw, grads = _backward_step(ws_ref[...], dw_ref[...], dy_ref[...], *(ref[...] for ref in ops_refs))
    for ref, g in zip(dops_refs, grads):
        ref[...] = g
    dw_ref[...] = dw


def _backward(ws, ops: _Operands, dy, dw_final, *, interpret: bool):
    """Reverse scan over chunks: (dL/dW0 [BH, Dv, Dk], dL/d ops)."""
    bh, nc = ops.qs.shape[:2]
    rev = functools.partial(_chunk_spec, reverse=True)
    call = _call(
        _backward_kernel,
        (bh, nc),
        [rev(ws), rev(dy), _state_spec(dw_final)] + [rev(x) for x in ops],
        [rev(x) for x in ops] + [_state_spec(dw_final)],
        [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (*ops, dw_final)],
        interpret,
    )
    *dops, dw0 = call(ws, dy, dw_final, *ops)
    return dw0, _Operands(*dops)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _recurrence(w0, ops: _Operands, interpret: bool):
    return _forward(w0, ops, save_states=False, interpret=interpret)


def _recurrence_fwd(w0, ops, interpret):
    y, w, ws = _forward(w0, ops, save_states=True, interpret=interpret)
    return (y, w), (ws, ops)


def _recurrence_bwd(interpret, res, cot):
    ws, ops = res
    dy, dw = cot
    return _backward(ws, ops, dy, dw, interpret=interpret)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


# ---------------------------------------------------------------------------------------------
# Entry


def check_backend() -> None:
    """GPU is refused (interpret mode on CPU and Mosaic on TPU are chosen at lowering, `_call`)."""
    if jax.default_backend() == "gpu":
        raise ValueError(
            "memory_chunked(impl='pallas') has no GPU lowering yet (the chunk axis of its grid carries "
            "the state, which Triton's concurrent programs cannot): use impl='xla' or interpret=True"
        )


def _partitioned(fn, q, rates, state):
    """`fn` under a `shard_map` when a mesh is set (`jax.set_mesh`): Mosaic kernels are not
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
    state_specs = jax.tree.map(lambda _: weights, state)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(state_specs, tok, tok, tok, rate_specs),
        out_specs=(tok, weights),
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
):
    """`memory_chunked` with the Pallas kernel (same contract; call it through
    `memory_chunked(..., impl="pallas")`, which checks the state). `interpret`: Pallas interpret
    mode; None decides by the lowering platform (interpret for CPU, Mosaic for TPU)."""
    update_rule.check_call(spec, state, rates, read, chunk_size)
    check_supported(spec, state, rates, None)
    if q.shape[1] % chunk_size:
        raise ValueError(f"chunk_size {chunk_size} does not divide the sequence length {q.shape[1]}")
    run = functools.partial(_kernel_call, spec, chunk_size=chunk_size, read=read, interpret=interpret)
    y, w = _partitioned(run, q, rates, state.weights.w)(state.weights.w, q, k, v, rates)
    w = st.LinearWeights(w)
    return y, st.MemoryState(w, None, w, jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("spec", "chunk_size", "read", "interpret"))
def _kernel_call(
    spec: st.MemorySpec,
    w0,
    q,
    k,
    v,
    rates: update_rule.Rates,
    *,
    chunk_size: int,
    read: str,
    interpret: bool | None,
):
    """(y, final weights) of the kernel from the weights w0 [B, H, Dv, Dk] of the (local) batch."""
    b, h = q.shape[0], q.shape[2]
    lay = lambda x: _kernel_layout(x, chunk_size)  # noqa: E731
    rates_k = jax.tree.map(lambda r: lay(r[..., None])[..., 0], rates)
    ops = _operands(spec, lay(q), lay(k), lay(v), rates_k, read)
    y, w = _recurrence(w0.reshape(b * h, *w0.shape[2:]).astype(jnp.float32), ops, interpret)
    y = _from_kernel_layout(y, b, h).astype(jnp.result_type(q.dtype, v.dtype, w0.dtype))
    return y, w.reshape(w0.shape).astype(w0.dtype)
