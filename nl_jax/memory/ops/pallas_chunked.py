"""Pallas kernels for the sequential part of the chunked form, for the linear and the MLP memory,
with or without momentum: `memory_chunked(..., impl="pallas")`.

It lives next to `chunked.py` because it is the same closed form split in two:

  XLA, all chunks at once   everything that does not depend on the running state (`chunk_steps`:
                            retention and momentum products, the DGD unit lower-triangular
                            inverse, read masks), folded into a few matrices per chunk
  Pallas, chunk after chunk the state recurrence and the reads, with the per-(batch, head) state
                            (the fast weights and their momentum) kept in the kernel across chunks

The step of one chunk is a pure function of values (`chunk_steps.<structure>_forward`), and the
backward kernel runs its VJP (`chunk_steps.vjp_step`) in reverse over chunks from the chunk-start
states the forward saves; the cotangents of the operands then flow through the XLA part by
ordinary autodiff.

Two kernel layouts of the same step functions, chosen by the platform lowered for:

  grid   grid (B*H, chunks), the chunk axis sequential, the state resident in an output block
         across it; each chunk's operands are streamed in by the pipeline. Mosaic (TPU), and
         interpret mode on CPU.
  loop   grid (B*H,), one program per (batch, head) looping over its chunks with the state in the
         loop carry: Triton runs a grid's programs concurrently, so no grid axis can carry the
         state there. Triton (GPU; widths and chunk sizes powers of two, at least 16);
         `layout="loop"` runs it in interpret mode on CPU.

Under a mesh the call runs inside a `shard_map` over the batch and head axes (Pallas kernels are
not partitioned automatically; every (batch, head) is independent).

Supported: structures "linear" and "mlp", objectives l2 and dot, retention, momentum, DGD, every
read mode (DeltaNet, the gated delta rule, linear attention / RetNet, Titans' and deep linear
attention's memories, the self-modifying update with precomputed targets). Not supported: fast
biases, the inner LayerNorm, self_target, max_grad_norm, delta_scale.
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
from nl_jax.memory.ops.chunk_steps import STEPS

LAYOUTS = ("grid", "loop")

# Triton's launch parameters for the loop layout. One pipeline stage: with Triton's default of three
# the chunk loop's backward asks more shared memory than an H200 has even at head width 64; 8 warps
# ran twice as fast as 4 there. `benchmarks/triton_params.py` times the choices (README).
TRITON_PARAMS = {"num_warps": 8, "num_stages": 1}


def unsupported(spec: st.MemorySpec, rates: update_rule.Rates, norm) -> list[str]:
    """What of this call the kernels do not cover (empty when they cover all of it)."""
    checks = {
        "bias=True": spec.bias,
        "norm=True": spec.norm or norm is not None,
        "self_target=True": spec.self_target,
        f"max_grad_norm={spec.max_grad_norm}": spec.max_grad_norm > 0,
        "delta_scale": rates.delta_scale is not None,
    }
    return [name for name, bad in checks.items() if bad]


def check_supported(spec, rates, norm) -> None:
    missing = unsupported(spec, rates, norm)
    if missing:
        raise ValueError(
            "memory_chunked(impl='pallas') covers the linear and MLP memories without biases, inner "
            f"LayerNorm, self targets, clipping or delta scales; this call has {', '.join(missing)}: "
            "use impl='xla'"
        )


# ---------------------------------------------------------------------------------------------
# The kernels' array layout: (batch x head) first, then chunks


def _kernel_layout(x: jax.Array, c: int) -> jax.Array:
    """[B, T, H, ...] -> [B*H, N, C, ...]."""
    b, t, h = x.shape[:3]
    x = jnp.moveaxis(x.reshape(b, t // c, c, h, *x.shape[3:]), 3, 1)
    return x.reshape(b * h, t // c, c, *x.shape[4:]).astype(jnp.float32)


def _from_kernel_layout(y: jax.Array, b: int, h: int) -> jax.Array:
    """[B*H, N, C, D] -> [B, N C, H, D]."""
    _, n, c, d = y.shape
    return jnp.moveaxis(y.reshape(b, h, n * c, d), 1, 2)


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


def _over_chunks(chunk, n: int, start_refs, carry_refs, layout: str, reverse: bool = False) -> None:
    """Run `chunk(i, carry) -> carry` over the n chunks of one (batch, head), from the carry in
    `start_refs`, and write the last carry to `carry_refs`. In `loop` a fori_loop over the chunks
    (in reverse for the backward); in `grid` one chunk per grid step (the blocks arrive in the
    pass's order), the carry resident in `carry_refs` and seeded at the first step."""
    if layout == "loop":
        order = (lambda j: n - 1 - j) if reverse else (lambda j: j)
        final = jax.lax.fori_loop(0, n, lambda j, c: chunk(order(j), c), tuple(r[...] for r in start_refs))
    else:

        @pl.when(pl.program_id(1) == 0)
        def _():
            for ref, ref0 in zip(carry_refs, start_refs):
                ref[...] = ref0[...]

        final = chunk(..., tuple(ref[...] for ref in carry_refs))
    for ref, x in zip(carry_refs, final):
        ref[...] = x


def _forward_kernel(*refs, ns: int, treedef, save: bool, layout: str, spec: st.MemorySpec):
    forward_step = STEPS[spec.structure][1]
    s0, op_refs, (y_ref,), st_refs, saved = _split(refs, ns, treedef.num_leaves, 1, ns)

    def chunk(i, state):
        for ref, x in zip(saved, state if save else ()):
            ref[i] = x
        y, new = forward_step(spec, state, jax.tree.unflatten(treedef, [ref[i] for ref in op_refs]))
        y_ref[i] = y
        return new

    _over_chunks(chunk, op_refs[0].shape[0], s0, st_refs, layout)


def _backward_kernel(*refs, ns: int, treedef, layout: str, spec: st.MemorySpec):
    backward_step = STEPS[spec.structure][2]
    no = treedef.num_leaves
    saved, (dy_ref,), d_final, op_refs, dop_refs, d_refs = _split(refs, ns, 1, ns, no, no)

    def chunk(i, dstate):
        ops = jax.tree.unflatten(treedef, [ref[i] for ref in op_refs])
        dstate, grads = backward_step(spec, tuple(ref[i] for ref in saved), dstate, dy_ref[i], ops)
        for ref, g in zip(dop_refs, jax.tree.leaves(grads)):
            ref[i] = g
        return dstate

    _over_chunks(chunk, op_refs[0].shape[0], d_final, d_refs, layout, reverse=True)


def _grid(bh: int, nc: int, layout: str) -> tuple[int, ...]:
    """A program per (batch, head) (`loop`), or per (batch, head) and chunk (`grid`)."""
    return (bh,) if layout == "loop" else (bh, nc)


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
    """What the kernels run (`spec`: the memory, whose structure picks the chunk step) and how:
    `interpret` True, Pallas interpret mode in `layout`; otherwise by the platform lowered for:
    interpret mode in `layout` on CPU, Triton in the loop layout on GPU, Mosaic in the grid layout
    otherwise."""

    spec: st.MemorySpec
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
            params = pltriton.CompilerParams(**TRITON_PARAMS)
        return pl.pallas_call(
            functools.partial(kernel, layout=layout, spec=how.spec),
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


def _forward(state0: tuple, ops, *, save: bool, how: _How):
    """(Y [BH, N, C, Dv], final state [BH, O, I] each[, chunk-start states [BH, N, O, I] each]);
    Dv is the output width of the first weight matrix."""
    leaves, treedef = jax.tree.flatten(ops)
    bh, nc, c = ops.k.shape[:3]
    ns = len(state0)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    out_shape = [f32(bh, nc, c, state0[0].shape[-2])] + [f32(*x.shape) for x in state0]
    out_shape += [f32(bh, nc, *x.shape[1:]) for x in (state0 if save else ())]

    def out_specs(layout):
        specs = [_chunk_spec(out_shape[0], layout)] + [_state_spec(x, layout) for x in state0]
        return specs + [_chunk_spec(x, layout) for x in out_shape[1 + ns :]]

    call = _call(
        functools.partial(_forward_kernel, ns=ns, treedef=treedef, save=save),
        how,
        functools.partial(_grid, bh, nc),
        lambda layout: [_state_spec(x, layout) for x in state0] + [_chunk_spec(x, layout) for x in leaves],
        out_specs,
        out_shape,
    )
    y, *rest = call(*state0, *leaves)
    return y, tuple(rest[:ns]), tuple(rest[ns:])


def _backward(saved: tuple, ops, dy, d_final: tuple, *, how: _How):
    """Reverse scan over chunks: (dL/d initial state, dL/d ops)."""
    leaves, treedef = jax.tree.flatten(ops)
    bh, nc = ops.k.shape[:2]
    ns = len(saved)
    rev = lambda layout: functools.partial(_chunk_spec, layout=layout, reverse=True)  # noqa: E731
    call = _call(
        functools.partial(_backward_kernel, ns=ns, treedef=treedef),
        how,
        functools.partial(_grid, bh, nc),
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
def _recurrence(state0: tuple, ops, how: _How):
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
    norm=None,
):
    """`memory_chunked` with the Pallas kernels (same contract; call it through
    `memory_chunked(..., impl="pallas")`, which checks the state). `interpret`: Pallas interpret
    mode; None decides by the lowering platform (interpret on CPU, Triton on GPU, Mosaic on TPU).
    `layout`: the kernel layout of interpret mode ("grid" or "loop", module docstring); compiled
    kernels take their platform's. `norm` (an inner LayerNorm's parameters) is refused, as every
    other spec the kernels do not cover (`unsupported`)."""
    update_rule.check_call(spec, state, rates, read, chunk_size)
    check_supported(spec, rates, norm)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if q.shape[1] % chunk_size:
        raise ValueError(f"chunk_size {chunk_size} does not divide the sequence length {q.shape[1]}")
    if (rates.momentum is None) != (state.momentum is None):
        raise ValueError("momentum rates and a momentum state go together")
    cls = type(state.weights)
    state0 = tuple(state.weights) + (() if state.momentum is None else tuple(state.momentum))
    run = functools.partial(_kernel_call, chunk_size=chunk_size, read=read, how=_How(spec, interpret, layout))
    y, final = _partitioned(run, q, rates, state0)(state0, q, k, v, rates)
    w = cls(*final[: len(cls._fields)])
    s = None if state.momentum is None else cls(*final[len(cls._fields) :])
    return y, st.MemoryState(w, s, w, jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("chunk_size", "read", "how"))
def _kernel_call(
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
    """(y, final state) of the kernels from the state (the weight matrices, then their momenta),
    each [B, H, O, I], of the (local) batch."""
    b, h = q.shape[0], q.shape[2]
    lay = lambda x: _kernel_layout(x, chunk_size)  # noqa: E731
    rates_k = jax.tree.map(lambda r: lay(r[..., None])[..., 0], rates)
    ops = STEPS[how.spec.structure][0](how.spec, lay(q), lay(k), lay(v), rates_k, read)
    flat = tuple(x.reshape(b * h, *x.shape[2:]).astype(jnp.float32) for x in state0)
    y, final = _recurrence(flat, ops, how)
    y = _from_kernel_layout(y, b, h).astype(jnp.result_type(q.dtype, v.dtype, state0[0].dtype))
    return y, tuple(x.reshape(x0.shape).astype(x0.dtype) for x, x0 in zip(final, state0))
