"""What the encoder-decoder networks (T5, BART) share: one call that encodes then decodes, and the
start of cached decoding (an empty self-attention cache plus the encoded inputs' keys and values)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_lite.nn import layers, stacks
from t5x_lite.nn.attention import DecodeState, MultiHeadAttention, empty_stack_cache


class EncoderDecoderNetwork(nnx.Module):
    """Base of T5 and BART. Subclasses run their stacks (`_encoder_stack`, `_decoder_stack`: embeddings, layers
    and final norms, given the masks), map decoder outputs to logits (`_logits`), and define cached decoding
    (`init_decode_state`, `decode_step`)."""

    def encode(
        self,
        encoder_input_tokens: jax.Array,
        encoder_segment_ids: jax.Array | None = None,
        encoder_positions: jax.Array | None = None,
        *,
        dropout_rngs: nnx.Rngs | None = None,
        encoder_attention_rank: jax.Array | None = None,
    ) -> jax.Array:
        """[b, s] tokens -> [b, s, d_model] encoded sequence (in the activation dtype). Packed rows carry segment
        ids (0 = padding) and in-segment positions; unpacked rows need neither (token id 0 = padding).
        `encoder_attention_rank` [b, s] (the objective space's R) limits each position to the keys at or before
        it in the row's reading order (`layers.order_mask`); None: bidirectional, the mask unchanged."""
        mask = layers.encoder_mask(encoder_input_tokens, encoder_segment_ids)
        if encoder_attention_rank is not None:
            mask = mask & layers.order_mask(encoder_attention_rank)
        positions = _positions(encoder_input_tokens, encoder_positions)
        return self._encoder_stack(encoder_input_tokens, positions, mask, dropout_rngs)

    def decode(
        self,
        encoded: jax.Array,
        encoder_input_tokens: jax.Array,
        decoder_input_tokens: jax.Array,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        *,
        dropout_rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Teacher-forced decoder over [b, t] inputs -> float32 logits [b, t, vocab].

        Decoder inputs start with the model's `decoder_start_id` (by default 0, the pad id), so unpacked
        self-attention is only causal; padded tail positions are garbage and must be masked in the loss.
        """
        self_mask, cross_mask = layers.decoder_masks(
            encoder_input_tokens, decoder_input_tokens, encoder_segment_ids, decoder_segment_ids
        )
        positions = _positions(decoder_input_tokens, decoder_positions)
        y = self._decoder_stack(decoder_input_tokens, positions, encoded, self_mask, cross_mask, dropout_rngs)
        return self._logits(y)

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
        encoder_attention_rank: jax.Array | None = None,
    ) -> jax.Array:
        """Encode then decode: float32 logits [b, t, vocab]."""
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions, dropout_rngs=dropout_rngs,
                              encoder_attention_rank=encoder_attention_rank)
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
        cache = empty_stack_cache(
            batch, config.num_decoder_layers, config.num_heads, max_decode_length, config.head_dim,
            jnp.dtype(config.dtype), scan=config.scan_layers,
        )
        return DecodeState(
            cache=cache, cross=cross, cross_mask=encoder_mask, first_slot=jnp.zeros((batch,), jnp.int32),
            forced_token=jnp.full((batch,), -1, jnp.int32), index=jnp.zeros((), jnp.int32),
        )


def _positions(tokens: jax.Array, positions: jax.Array | None) -> jax.Array:
    """In-segment positions of packed rows, or 0..length-1 for every row."""
    return jnp.arange(tokens.shape[1])[None] if positions is None else positions
