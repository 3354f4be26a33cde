"""Short causal depthwise convolution (width 4 by default), as on the q/k/v paths of Titans / HOPE.

y_t = sum_{i<W} w[i] * x_{t-W+1+i}: w[W-1] multiplies the current token, earlier taps look back.
The decode state is the last W-1 inputs, so streaming token by token (or chunk by chunk) equals
the full convolution over the whole sequence. With segment ids (the document of each token of a
packed row) a tap never reads a token of another document: each document is convolved as if it
started the row.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.layers.linear import logical_param, to_dtype


def same_document(segment_ids: jax.Array, lag: int) -> jax.Array:
    """bool [B, T]: token t - lag belongs to token t's document; tokens before the row (the state)
    count as the same document."""
    before = jnp.pad(segment_ids, ((0, 0), (lag, 0)), mode="edge")[:, : segment_ids.shape[1]]
    return before == segment_ids


def document_starts(segment_ids: jax.Array) -> jax.Array:
    """bool [B, T]: True at each document's first token after the row's first token (the row's
    first token starts from the initial state anyway)."""
    return ~same_document(segment_ids, 1)


def document_continues(segment_ids: jax.Array) -> jax.Array:
    """float32 [B, T]: 0 where `document_starts`, else 1 (a retention gate that restarts a state)."""
    return same_document(segment_ids, 1).astype(jnp.float32)


class ShortConv(nnx.Module):
    def __init__(
        self,
        channels: int,
        *,
        width: int = 4,
        channel_name: str = "embed",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.channels, self.width, self.dtype = channels, width, to_dtype(dtype)
        # Fan-in of a depthwise filter is its width; std 1/sqrt(W) keeps the output scale of the input.
        self.kernel = logical_param(
            rngs,
            jax.nn.initializers.normal(width**-0.5),
            (width, channels),
            ("conv_width", channel_name),
            param_dtype,
        )

    def init_state(self, batch_size: int, dtype=None) -> jax.Array:
        """Zeros [B, W-1, C]: the inputs before the first token (the same zero padding as training)."""
        return jnp.zeros((batch_size, self.width - 1, self.channels), dtype or self.dtype)

    def forward(
        self, x: jax.Array, state: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """x [B, T, C], state [B, W-1, C] or None (zeros), segment_ids int32 [B, T] or None ->
        (y [B, T, C], new state)."""
        b, t, _ = x.shape
        x = x.astype(self.dtype)
        if state is None:
            state = self.init_state(b)
        xp = jnp.concatenate([state.astype(self.dtype), x], axis=1)  # [B, T+W-1, C]
        w = self.kernel[...].astype(self.dtype)
        taps = [xp[:, i : i + t] for i in range(self.width)]  # W is tiny: unrolled taps
        if segment_ids is not None:
            lags = range(self.width - 1, -1, -1)  # tap i reads token t - (W - 1 - i)
            taps = [
                jnp.where(same_document(segment_ids, lag)[..., None], tap, 0) for lag, tap in zip(lags, taps)
            ]
        y = sum(tap * w[i] for i, tap in enumerate(taps))
        return y, xp[:, t:]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward(x)[0]

    def step(self, x_t: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One decode token: x_t [B, C] -> (y_t [B, C], new state)."""
        y, state = self.forward(x_t[:, None], state)
        return y[:, 0], state
