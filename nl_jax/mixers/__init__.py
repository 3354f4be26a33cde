"""Token mixers: the layers that move information along the sequence, each with its reference and
its fast forms tested equal.

  attention.py          causal softmax attention (full / sliding window, GQA, RoPE, KV cache)
  attention_kernels.py  fused attention for training (Pallas splash, cuDNN)
  mamba.py              Mamba's selective state-space layer (Samba)
  titans.py             Titans' neural memory (LMM; DLA with the dot objective)
  persistent_attention.py  Titans' attention over persistent tokens (MAC, MAG, MAL)
  memora.py             Memora's memory (Miras, KL retention)
  self_modifying.py     self-modifying Titans, HOPE's mixer
  cms.py                the Continuum Memory System (HOPE's MLP levels)
  linear.py             the linear fast-weight family: RetNet, DeltaNet, Gated DeltaNet, Comba
  rwkv7.py              RWKV-7's time mix and channel mix
  ttt.py                the TTT layer (TTT-Linear, TTT-MLP)
  front_end.py          what the fast-weight mixers share: SiLU(conv(x W)) inputs, l2 norm, gated output

The memories run on the associative-memory core `nl_jax.memory.ops`; the models that stack these
mixers are in `nl_jax.models`.
"""

from nl_jax.mixers.attention import (
    Attention,
    KVCache,
    attention_dims,
    attention_mask,
    causal_attention,
    dot_product_attention,
    local_attention,
    segment_mask,
)

__all__ = [
    "Attention",
    "KVCache",
    "attention_dims",
    "attention_mask",
    "causal_attention",
    "dot_product_attention",
    "local_attention",
    "segment_mask",
]
