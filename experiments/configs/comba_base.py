"""Comba family defaults (fla-org CombaConfig): Gated DeltaNet's layout (head_dim 256 with
num_heads * head_dim = 0.75 d_model, values 2x wider, short conv + SiLU, l2-normalised q/k, Mamba2
gate, SwiGLU FFN, 21 layers at 1.3B) with Comba's state feedback, output correction (d = 1) and a
sigmoid output gate."""

from experiments.configs import gated_deltanet_base


def get_config():
    config = gated_deltanet_base.get_config()
    config.model.name = "comba"
    config.model.output_gate_act = "sigmoid"  # y = W_o(RMSNorm(o) * sigmoid(x W_g))
    config.model.correction_factor = 1.0  # initial d_h of the output correction q - d p
    return config
