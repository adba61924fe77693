"""What the encoder-decoder networks (T5, BART) share: one call that encodes then decodes, and the
start of cached decoding (an empty self-attention cache plus the encoded inputs' keys and values)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_lite.nn import stacks
from t5x_lite.nn.attention import DecodeState, KVCache, MultiHeadAttention


class EncoderDecoderNetwork(nnx.Module):
    """Base of T5 and BART: subclasses define `encode`, `decode`, `decode_step` and `init_decode_state`."""

    def __call__(
        self,
        encoder_input_tokens: jax.Array,
        decoder_input_tokens: jax.Array,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        encoder_positions: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        *,
        dropout_rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Encode then decode: float32 logits [b, t, vocab]."""
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions, dropout_rngs=dropout_rngs)
        return self.decode(
            encoded, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids, decoder_segment_ids,
            decoder_positions, dropout_rngs=dropout_rngs,
        )

    def _decode_state(
        self,
        decoder_layers: nnx.Module,
        cross_attention: Callable[[nnx.Module], MultiHeadAttention],
        encoded: jax.Array,
        encoder_mask: jax.Array,
        max_decode_length: int,
    ) -> DecodeState:
        """An empty self-attention cache of `max_decode_length` slots and every decoder layer's keys/values of
        `encoded` [b, s, e], projected once (`cross_attention(layer)` is the layer's cross-attention);
        `encoder_mask` [b, s] marks the real encoder tokens."""
        config, batch = self.config, encoded.shape[0]
        _, cross = stacks.each_layer(
            decoder_layers, lambda layer, carry, i: (carry, cross_attention(layer).project_kv(encoded)), None,
            scan=config.scan_layers,
        )
        cache = KVCache.zeros(
            batch, config.num_decoder_layers, config.num_heads, max_decode_length, config.head_dim,
            jnp.dtype(config.dtype),
        )
        return DecodeState(
            cache=cache, cross=cross, cross_mask=encoder_mask, first_slot=jnp.zeros((batch,), jnp.int32),
            forced_token=jnp.full((batch,), -1, jnp.int32), index=jnp.zeros((), jnp.int32),
        )
