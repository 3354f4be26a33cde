"""ttt-lm-jax's TTT inner loop in float64 numpy: the mini-batch dual form of `process_mini_batch`
(TTTLinear / TTTMLP, Sun et al. 2024), written out as there, in their layout (weights [in, out],
biases [1, out]; TTT-MLP's W1 is the input side). Shared by the memory-core and the model tests."""

import numpy as np


def gelu(x):  # flax's nn.gelu (tanh approximation)
    return 0.5 * x * (1 + np.tanh(0.79788456 * (x + 0.044715 * x**3)))


def diff_gelu(x):  # ttt-lm-jax's diff_gelu
    t = np.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
    return 0.5 * x * ((1 - t * t) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + t)


def layer_norm(z, g, b, eps=1e-6):
    """flax nn.LayerNorm over the last axis; returns (output, what the backward needs)."""
    mu = z.mean(-1, keepdims=True)
    std = np.sqrt(((z - mu) ** 2).mean(-1, keepdims=True) + eps)
    xh = (z - mu) / std
    return g * xh + b, (xh, std)


def layer_norm_bwd(dy, g, cache):
    xh, std = cache
    gx = dy * g
    return (gx - gx.mean(-1, keepdims=True) - xh * (gx * xh).mean(-1, keepdims=True)) / std


def mini_batch(layer, params, xq, xk, xv, eta, g, beta):
    """One mini-batch of one head: xq, xk, xv [C, D], eta [C, C] (eta[t, s] = token_idx_t lr_s),
    LayerNorm scale g and bias beta [D]. Returns (the params handed on, output [C, D])."""
    tril = np.tril(np.ones_like(eta))
    last = eta[-1][:, None]
    if layer == "linear":
        w1, b1 = params
        out, cache = layer_norm(xk @ w1 + b1, g, beta)
        gz1 = layer_norm_bwd(out - (xv - xk), g, cache)
        b1_bar = b1 - (eta * tril) @ gz1
        z1_bar = xq @ w1 - (eta * np.tril(xq @ xk.T)) @ gz1 + b1_bar
        y = xq + layer_norm(z1_bar, g, beta)[0]
        return (w1 - (last * xk).T @ gz1, b1 - np.sum(last * gz1, 0, keepdims=True)), y
    w1, w2, b1, b2 = params
    z1 = xk @ w1 + b1
    x2 = gelu(z1)
    out, cache = layer_norm(x2 @ w2 + b2, g, beta)
    gz2 = layer_norm_bwd(out - (xv - xk), g, cache)
    gz1 = gz2 @ w2.T * diff_gelu(z1)
    z1_bar = xq @ w1 - (eta * np.tril(xq @ xk.T)) @ gz1 + b1 - (eta * tril) @ gz1
    x2_bar = gelu(z1_bar)
    z2_bar = x2_bar @ w2 - (eta * np.tril(x2_bar @ x2.T)) @ gz2 + b2 - (eta * tril) @ gz2
    y = xq + layer_norm(z2_bar, g, beta)[0]
    new = (
        w1 - (last * xk).T @ gz1,
        w2 - (last * x2).T @ gz2,
        b1 - np.sum(last * gz1, 0, keepdims=True),
        b2 - np.sum(last * gz2, 0, keepdims=True),
    )
    return new, y


def dual_form(layer, params, xq, xk, xv, lr, tau, g, beta, chunk):
    """All mini-batches of one head: xq, xk, xv [T, D], lr (the gated, scaled inner lr) and tau
    (token_idx plus its learned offset, clipped) [T]. Returns (final params, output [T, D])."""
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    params = tuple(f64(p) for p in params)
    xq, xk, xv, lr, tau, g, beta = map(f64, (xq, xk, xv, lr, tau, g, beta))
    out = np.zeros_like(xq)
    for a in range(0, xq.shape[0], chunk):
        sl = slice(a, a + chunk)
        eta = np.outer(tau[sl], lr[sl])  # get_eta: token_idx per row (reader), lr per column (source)
        params, out[sl] = mini_batch(layer, params, xq[sl], xk[sl], xv[sl], eta, g, beta)
    return params, out
