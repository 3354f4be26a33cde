"""HOPE family defaults: `hope` (self-modifying Titans + CMS) and `hope_attention` (attention + CMS).

`model.cms` configures the Continuum Memory System (nl_jax/mixers/cms.py); `model.memory` holds the
keyword arguments of the self-modifying Titans layer (nl_jax/mixers/self_modifying.py), passed as
they are. The paper's ablation rows (Table 6) are flags on `hope_*`:

    w/o DGD               --config.model.memory.dgd=False
    w/o momentum          --config.model.memory.momentum=False
    w/o weight decay      --config.model.memory.weight_decay=False
    w/o CMS               --config.model.cms.signal=none
    w/o inner-proj. k     --config.model.memory.adaptive_k=False
    w/o inner-proj. v     --config.model.memory.adaptive_v=False
    adaptive q            --config.model.memory.adaptive_q=True

The paper's literal self-modifying update, without nl_jax's stabilisers (docs/design.md,
Decision 11): --config.model.memory.paper_literal=True (or one at a time: normalize_values=False,
eta_param=paper, max_grad_norm=0, memory_inputs=shared).
"""

import ml_collections

from experiments.configs import base


def cms_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            variant="sequential",  # sequential | independent | nested (Eq. 72-74 of the paper)
            signal="ntp",  # ntp (next-token-loss gradient) | local (l2, self-generated targets) | none (static MLPs)
            periods=(16, 64, 256, 1024),  # update period of each level in tokens; min = the ntp segment
            hidden=(704, 704, 704, 704),  # SwiGLU hidden width of each level
            inner_lr=(
                1e-3,
                1e-3,
                1e-3,
                1e-3,
            ),  # inner lr of each level (applied to the period's gradient sum)
        )
    )


def memory_config() -> ml_collections.ConfigDict:
    """SelfModifyingTitans keyword arguments (names exactly as the layer's)."""
    return ml_collections.ConfigDict(
        dict(
            num_heads=8,  # memory heads
            head_dim=128,  # per-head width of every memory (k, v, q, eta, alpha, memory)
            # mlp (2-layer residual MLP, docs/design.md, Decision 4) | linear (gated delta rule with
            # modified values)
            structure="mlp",
            hidden=0,  # hidden width of each memory MLP; 0 = head_dim
            activation="silu",
            chunk_size=8,  # chunk of all memories but the output one (docs/design.md, Decision 6)
            memory_chunk_size=64,  # chunk of the output memory (docs/design.md, Decision 6)
            read="boundary",  # boundary (paper Eq. 90) | per_token (dual form)
            dgd=True,  # delta gradient descent (ablation: w/o DGD)
            momentum=True,  # Titans-style momentum (ablation: w/o momentum)
            weight_decay=True,  # retention gate alpha (ablation: w/o weight decay)
            adaptive_k=True,  # k from its own memory (ablation: w/o inner-projection k)
            adaptive_v=True,  # v from its own memory (ablation: w/o inner-projection v)
            adaptive_q=False,  # q static by default (paper Eq. 83-85); True = adaptive q
            max_lr=0.1,  # eta = max_lr * sigmoid(.), in (0, 1] (eta_param="bounded" only)
            max_grad_norm=1.0,  # each token's inner gradient clipped to this norm (0: off, the paper's form)
            normalize_values=False,  # raw v, the paper's form (True: l2-normalise v like q and k)
            eta_param="bounded",  # bounded (max_lr * sigmoid) | paper (softplus, no cap; max_lr unused)
            # shared (one input for all, the paper's Eq. 83-88) | projected (each memory reads its own
            # projection of x)
            memory_inputs="shared",
            # True: the paper's literal form, overriding the four above (normalize_values=False,
            # eta_param="paper", max_grad_norm=0, memory_inputs="shared"); docs/design.md, Decision 11
            paper_literal=False,
            conv_width=4,  # causal depthwise conv on the q/k/v paths
            # jax.checkpoint every chunk of the memory scans: the backward recomputes a chunk instead of
            # reading every chunk's intermediates back (hope_tiny step 1.75x faster on CPU, less memory)
            remat_chunks=True,
            memory_target="self",  # output memory's target: self (M_B(v), Eq. 83-85) | value (v, Eq. 79-82)
        )
    )


def get_config(name: str = "hope") -> ml_collections.ConfigDict:
    """`name`: hope | hope_attention."""
    config = base.get_config()
    config.model.name = name
    config.model.cms = cms_config()
    del config.model["mlp_hidden"]  # the CMS levels replace the MLP
    if name == "hope":
        config.model.memory = memory_config()
        attention = ("num_heads", "num_kv_heads", "head_dim", "rope_theta", "sliding_window", "attention_impl")
        for key in attention:
            del config.model[key]  # no attention
    elif name != "hope_attention":
        raise ValueError(f"unknown HOPE family member {name!r}; choose hope or hope_attention")
    return config
