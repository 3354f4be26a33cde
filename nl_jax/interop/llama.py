"""Llama checkpoints in the Hugging Face layout (config.json + safetensors) to and from nl_jax.

Two steps each way, with a model-independent layout between them (`LlamaWeights`: the Llama
weights in nl_jax's kernel layout, layers stacked on a leading axis):

    import:  read_hf_config / model_config, read_weights  ->  LlamaWeights  ->  transformer_params
    export:  transformer_weights  ->  LlamaWeights  ->  write_weights, hf_config

Another model that reuses Llama's weights (HOPE-Attention's attention and MLPs) needs only its own
`LlamaWeights -> params` step.

Conventions checked against `transformers`' LlamaForCausalLM (tests/interop):
- RoPE: Hugging Face's Llama weights are in the rotate-half layout (dimension i is paired with
  i + D/2), which is nl_jax's `apply_rope`, so q and k are copied without a permutation. (Meta's
  original checkpoints pair (2i, 2i + 1); Hugging Face's conversion permuted them once already.)
- RMSNorm: x / sqrt(mean(x^2) + eps) * w in both (not Gemma's 1 + w); eps is `rms_norm_eps`.
- Attention: scale head_dim^-0.5, no biases; GQA query head h reads key/value head
  h // (num_heads / num_kv_heads) in both.
- Linear weights: torch's [out, in] is nl_jax's kernel [in, out], with heads as their own axis.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MODEL_TYPES = ("llama",)

# Hugging Face name of each per-layer weight, under model.layers.<i>.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}


@dataclasses.dataclass
class LlamaWeights:
    """A Llama's weights in nl_jax's layout; per-layer arrays have a leading layer axis L."""

    embed: np.ndarray  # [V, D]
    final_norm: np.ndarray  # [D]
    unembed: np.ndarray | None  # [D, V]; None when the embedding is tied
    attn_norm: np.ndarray  # [L, D]
    q: np.ndarray  # [L, D, H, Dh]
    k: np.ndarray  # [L, D, KVH, Dh]
    v: np.ndarray  # [L, D, KVH, Dh]
    o: np.ndarray  # [L, H, Dh, D]
    mlp_norm: np.ndarray  # [L, D]
    gate: np.ndarray  # [L, D, F]
    up: np.ndarray  # [L, D, F]
    down: np.ndarray  # [L, F, D]


# ---- config ----


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: pass a Hugging Face model directory (config.json + *.safetensors)"
        )
    with open(path) as f:
        return json.load(f)


def _rope(hf: dict) -> tuple[str, float]:
    """(rope type, theta) from either layout: `rope_parameters` (transformers 5) or `rope_theta` /
    `rope_scaling` (older config files)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return kind, float(theta)


def model_config(hf: dict) -> dict:
    """The nl_jax `transformer` model fields of a Hugging Face Llama config.json (a ValueError naming
    what nl_jax does not compute the same way)."""
    if hf.get("model_type") not in MODEL_TYPES:
        raise ValueError(
            f"model_type {hf.get('model_type')!r} is not supported; nl_jax imports {', '.join(MODEL_TYPES)}"
        )
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (bool(hf.get("attention_bias", False)), False),
        "mlp_bias": (bool(hf.get("mlp_bias", False)), False),
        "rope type": (_rope(hf)[0], "default"),
    }
    bad = [f"{k}={got!r} (nl_jax computes {want!r})" for k, (got, want) in unsupported.items() if got != want]
    if bad:
        raise ValueError(f"this Llama checkpoint has {'; '.join(bad)}: it cannot be imported exactly")
    heads = int(hf["num_attention_heads"])
    return dict(
        name="transformer",
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        mlp_hidden=int(hf["intermediate_size"]),
        rope_theta=_rope(hf)[1],
        sliding_window=0,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    )


def hf_config(model_cfg, max_position_embeddings: int, dtype: str = "float32") -> dict:
    """A Hugging Face LlamaForCausalLM config.json for an nl_jax `transformer` model config."""
    if model_cfg.get("name") != "transformer":
        raise ValueError(f"only the 'transformer' model exports to Llama, not {model_cfg.get('name')!r}")
    if model_cfg.get("sliding_window", 0):
        raise ValueError(
            f"sliding_window={model_cfg.sliding_window}: Llama has full attention only, so the export "
            "would compute something else"
        )
    heads = int(model_cfg.num_heads)
    theta = float(model_cfg.rope_theta)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(model_cfg.vocab_size),
        "hidden_size": int(model_cfg.d_model),
        "intermediate_size": int(model_cfg.mlp_hidden),
        "num_hidden_layers": int(model_cfg.num_layers),
        "num_attention_heads": heads,
        "num_key_value_heads": int(model_cfg.get("num_kv_heads", 0) or heads),
        "head_dim": int(model_cfg.get("head_dim", 0) or model_cfg.d_model // heads),
        "hidden_act": "silu",
        "rms_norm_eps": float(model_cfg.norm_eps),
        "max_position_embeddings": int(max_position_embeddings),
        "tie_word_embeddings": bool(model_cfg.tie_embeddings),
        "attention_bias": False,
        "mlp_bias": False,
        # transformers >= 5 reads rope_parameters, older versions rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rope_theta": theta,
        "dtype": dtype,
        "torch_dtype": dtype,  # the name before transformers 5
    }


# ---- weights: Hugging Face tensors <-> LlamaWeights ----


def read_tensors(directory: str) -> dict[str, np.ndarray]:
    """Every tensor of a model directory: model.safetensors, or the shards its index lists."""
    from safetensors.numpy import load_file

    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(directory, WEIGHTS_FILE)):
        files = [WEIGHTS_FILE]
    else:
        raise FileNotFoundError(f"{directory} holds neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(directory, name)))
    return tensors


def weights_from_tensors(tensors: dict[str, np.ndarray], hf: dict, dtype=np.float32) -> LlamaWeights:
    """LlamaWeights from Hugging Face tensors (named as LlamaForCausalLM saves them), cast to `dtype`."""
    cfg = model_config(hf)
    layers, d, h = cfg["num_layers"], cfg["d_model"], cfg["num_heads"]
    kvh, dh, f, vocab = cfg["num_kv_heads"], cfg["head_dim"], cfg["mlp_hidden"], cfg["vocab_size"]
    # Older checkpoints also hold RoPE's inverse frequencies: a buffer computed from the config.
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    used = set()

    def take(name: str, shape: tuple) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"the checkpoint has no tensor {name!r}")
        x = tensors[name]
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, config.json implies {shape}")
        used.add(name)
        return np.asarray(x).astype(dtype)

    shapes = {
        "attn_norm": (d,),
        "q": (h * dh, d),
        "k": (kvh * dh, d),
        "v": (kvh * dh, d),
        "o": (d, h * dh),
        "mlp_norm": (d,),
        "gate": (f, d),
        "up": (f, d),
        "down": (d, f),
    }
    per_layer = {
        key: np.stack([take(f"model.layers.{i}.{name}", shapes[key]) for i in range(layers)])
        for key, name in _LAYER_NAMES.items()
    }
    t = lambda x: np.swapaxes(x, -1, -2)  # torch [out, in] -> kernel [in, out]
    weights = LlamaWeights(
        embed=take("model.embed_tokens.weight", (vocab, d)),
        final_norm=take("model.norm.weight", (d,)),
        unembed=None if cfg["tie_embeddings"] else t(take("lm_head.weight", (vocab, d))),
        attn_norm=per_layer["attn_norm"],
        q=t(per_layer["q"]).reshape(layers, d, h, dh),
        k=t(per_layer["k"]).reshape(layers, d, kvh, dh),
        v=t(per_layer["v"]).reshape(layers, d, kvh, dh),
        o=t(per_layer["o"]).reshape(layers, h, dh, d),
        mlp_norm=per_layer["mlp_norm"],
        gate=t(per_layer["gate"]),
        up=t(per_layer["up"]),
        down=t(per_layer["down"]),
    )
    # A tied checkpoint may still hold lm_head.weight (a copy of the embedding): it is not needed.
    extra = sorted(set(tensors) - used - ({"lm_head.weight"} if cfg["tie_embeddings"] else set()))
    if extra:
        raise ValueError(
            f"the checkpoint has tensors a Llama of this config.json does not: {', '.join(extra[:5])}"
            + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        )
    return weights


def read_weights(directory: str, dtype=np.float32) -> tuple[dict, LlamaWeights]:
    """(config.json, LlamaWeights) of a Hugging Face Llama directory."""
    hf = read_hf_config(directory)
    model_config(hf)  # an unsupported checkpoint fails before its tensors are read
    return hf, weights_from_tensors(read_tensors(directory), hf, dtype)


def tensors_from_weights(w: LlamaWeights) -> dict[str, np.ndarray]:
    """Hugging Face tensors (LlamaForCausalLM names, torch layout) of LlamaWeights."""
    layers, d = w.q.shape[0], w.q.shape[1]
    t = lambda x: np.ascontiguousarray(np.swapaxes(x, -1, -2))
    per_layer = {
        "attn_norm": w.attn_norm,
        "q": t(w.q.reshape(layers, d, -1)),
        "k": t(w.k.reshape(layers, d, -1)),
        "v": t(w.v.reshape(layers, d, -1)),
        "o": t(w.o.reshape(layers, -1, d)),
        "mlp_norm": w.mlp_norm,
        "gate": t(w.gate),
        "up": t(w.up),
        "down": t(w.down),
    }
    out = {"model.embed_tokens.weight": w.embed, "model.norm.weight": w.final_norm}
    if w.unembed is not None:
        out["lm_head.weight"] = t(w.unembed)
    for key, name in _LAYER_NAMES.items():
        for i in range(layers):
            out[f"model.layers.{i}.{name}"] = np.ascontiguousarray(per_layer[key][i])
    return out


def write_weights(w: LlamaWeights, directory: str) -> str:
    """Writes model.safetensors (one file) into `directory`; returns its path."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, WEIGHTS_FILE)
    save_file(tensors_from_weights(w), path, metadata={"format": "pt"})  # transformers expects "pt"
    return path


# ---- nl_jax `transformer` parameters <-> LlamaWeights ----


def lm_params(w: LlamaWeights, layers: dict) -> dict:
    """The pure parameter dict of an nl_jax language model: the Llama's embedding, final norm and
    output around `layers`, the stacked per-layer parameters of the model's own blocks."""
    params = {
        "blocks": {"layers": layers},
        "embed": {"embedding": w.embed},
        "final_norm": {"scale": w.final_norm},
    }
    if w.unembed is not None:
        params["unembed"] = {"kernel": w.unembed}
    return params


def transformer_params(w: LlamaWeights) -> dict:
    """The pure parameter dict of nl_jax's `transformer` (`ModelFn.apply` takes it)."""
    layers = {
        "attn": {name: {"kernel": getattr(w, name)} for name in ("q", "k", "v", "o")},
        "attn_norm": {"scale": w.attn_norm},
        "mlp": {name: {"kernel": getattr(w, name)} for name in ("gate", "up", "down")},
        "mlp_norm": {"scale": w.mlp_norm},
    }
    return lm_params(w, layers)


def transformer_weights(params: dict) -> LlamaWeights:
    """LlamaWeights of a `transformer`'s pure parameter dict (host numpy arrays)."""
    p = params
    layers = p["blocks"]["layers"]
    a = lambda x: np.asarray(x)
    return LlamaWeights(
        embed=a(p["embed"]["embedding"]),
        final_norm=a(p["final_norm"]["scale"]),
        unembed=a(p["unembed"]["kernel"]) if "unembed" in p else None,
        attn_norm=a(layers["attn_norm"]["scale"]),
        q=a(layers["attn"]["q"]["kernel"]),
        k=a(layers["attn"]["k"]["kernel"]),
        v=a(layers["attn"]["v"]["kernel"]),
        o=a(layers["attn"]["o"]["kernel"]),
        mlp_norm=a(layers["mlp_norm"]["scale"]),
        gate=a(layers["mlp"]["gate"]["kernel"]),
        up=a(layers["mlp"]["up"]["kernel"]),
        down=a(layers["mlp"]["down"]["kernel"]),
    )


def write_hf_checkpoint(model_cfg, params: dict, directory: str, max_position_embeddings: int) -> None:
    """An nl_jax `transformer` as a Hugging Face Llama directory (config.json + model.safetensors)."""
    w = transformer_weights(params)
    cfg = hf_config(model_cfg, max_position_embeddings, dtype=str(w.embed.dtype))
    write_weights(w, directory)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(cfg, f, indent=2)
