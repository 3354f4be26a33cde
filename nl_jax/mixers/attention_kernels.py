"""Fused attention kernels for the training forward, selected by `attention_impl`:

  xla     the einsum form of `attention.py` (the reference; every platform)
  splash  Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention): blocks of
          128 queries and keys, the softmax online, blocks the causal / sliding-window / document
          mask hides skipped. Mosaic when lowering for TPU; Pallas interpret mode when lowering
          for CPU (exact, slow: for tests), decided at lowering (`jax.lax.platform_dependent`), so
          an AOT compile for TPU from a CPU host gets the kernel. Under a mesh it runs inside a
          `shard_map` over the batch and head axes (Mosaic kernels are not partitioned
          automatically; every (sequence, head) is independent).
  cudnn   jax.nn.dot_product_attention(implementation="cudnn"): cuDNN's fused attention on GPU.

All take q [B, T, H, D], k / v [B, T, KVH, D] (GQA: splash repeats each kv head over its query
group), causal with an optional sliding window W (a query sees itself and the W-1 keys before it)
and optional segment ids [B, T] (a query sees only keys of its own document), and return
[B, T, H, D] in q's dtype. Decoding (a KV cache) always uses the einsum form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IMPLS = ("xla", "splash", "cudnn")
BLOCK = 128  # splash's query / key block: its kernels need multiples of the TPU's 128 lanes


def check_impl(impl: str, seq_len: int | None = None) -> None:
    """One error line for an unknown impl, or a sequence splash cannot tile."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {IMPLS}, got {impl!r}")
    if impl == "splash" and seq_len is not None and seq_len % BLOCK:
        raise ValueError(
            f"attention_impl='splash' tiles the sequence in blocks of {BLOCK}; seq_len {seq_len} is not a "
            f"multiple of it: use a multiple of {BLOCK} or attention_impl='xla'"
        )


def _splash_kernel(seq_len: int, heads: int, window: int, interpret: bool):
    """Built in each trace that uses it, not cached: its mask tables become arrays of that trace
    (constants of a jit, or of an AOT compile for another platform's devices)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    shape = (seq_len, seq_len)
    one = sm.LocalMask(shape, window_size=(window - 1, 0), offset=0) if window else sm.CausalMask(shape)
    b = BLOCK
    sizes = sk.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
        block_q_dq=b, block_kv_dq=b,
    )
    return sk.make_splash_mha(
        sm.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def _splash_local(q, k, v, segment_ids, *, window: int, interpret: bool | None):
    """Splash on the arrays of one device: q [B, T, H, D], k / v [B, T, KVH, D], segment_ids [B, T]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, h, d = q.shape
    group = h // k.shape[2]
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, H, T, D], the kernel's layout
    qh = heads_first(q * jnp.asarray(d**-0.5, q.dtype))
    kh, vh = (heads_first(jnp.repeat(x, group, axis=2)) for x in (k, v))

    def run(interpret: bool):
        kernel = _splash_kernel(t, h, window, interpret)

        def one(qh, kh, vh, seg):
            ids = None if segment_ids is None else sk.SegmentIds(q=seg, kv=seg)
            return kernel(qh, kh, vh, segment_ids=ids)

        seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
        return lambda qh, kh, vh: jax.vmap(one)(qh, kh, vh, seg)

    if interpret is None:
        out = jax.lax.platform_dependent(qh, kh, vh, cpu=run(True), default=run(False))
    else:
        out = run(interpret)(qh, kh, vh)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def splash_attention(q, k, v, segment_ids=None, *, window: int = 0, interpret: bool | None = None):
    """Splash attention (module docstring); `interpret` None decides by the lowering platform."""
    check_impl("splash", q.shape[1])
    fn = functools.partial(_splash_local, window=window, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q, k, v, segment_ids)
    from nl_jax.parallel.rules import batch_and_head_axes  # noqa: PLC0415 (only under a mesh)

    batch, heads = batch_and_head_axes(q.shape[0], k.shape[2], mesh)
    tokens, kv = P(batch, None, heads, None), P(batch, None, heads, None)
    seg = None if segment_ids is None else P(batch, None)
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(tokens, kv, kv, seg), out_specs=tokens, check_vma=False
    )(q, k, v, segment_ids)


def cudnn_attention(q, k, v, segment_ids=None, *, window: int = 0, implementation: str = "cudnn"):
    """cuDNN's fused attention through jax.nn.dot_product_attention (GPU only; `implementation`
    "xla" runs the same call on any platform, which is how it is tested on CPU)."""
    if segment_ids is not None:
        raise ValueError(
            "attention_impl='cudnn' does not take segment ids (packed documents): use "
            "attention_impl='xla' or 'splash', or data.document_boundaries='ignore'"
        )
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(
            f"attention_impl='cudnn' needs a GPU, this backend is {jax.default_backend()!r}: use 'xla'"
        )
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        is_causal=True,
        local_window_size=(window - 1, 0) if window else None,
        implementation=implementation,
    ).astype(q.dtype)


def fused_attention(q, k, v, segment_ids=None, *, window: int = 0, impl: str):
    """The training forward's attention by `impl` ("splash" or "cudnn"; "xla" is attention.py's)."""
    if impl == "splash":
        return splash_attention(q, k, v, segment_ids, window=window)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segment_ids, window=window)
    raise ValueError(f"fused_attention takes 'splash' or 'cudnn', got {impl!r}")
