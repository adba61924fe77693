"""BART-style encoder-decoder transformer in Flax NNX (denoising pre-training, text-to-text fine-tuning).

Learned absolute positions, a layer norm on the embeddings, post-layer-norm blocks with biases, GELU,
and one token embedding shared by the encoder, the decoder and the (tied) output layer, plus a
`final_logits_bias`. Token id 0 is padding; packed rows carry segment ids (0 = padding) and
in-segment positions, which the learned position embeddings need.

The parameters map one to one onto Hugging Face's `BartForConditionalGeneration` (`t5x_lite.hf.bart`).
Decoding encodes once, projects every layer's cross-attention keys/values once, then runs the cached
`decode_step` inside `t5x_lite.decoding`'s while loops. For large models, `BartConfig.scan_layers` and
`remat_policy` work as T5's (see `t5x_lite.nn.stacks`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_lite.networks.config_checks import check_config
from t5x_lite.networks.encoder_decoder import EncoderDecoderNetwork
from t5x_lite.nn import attention, kernels, layers, stacks
from t5x_lite.nn.attention import DecodeState, StackCache

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


@dataclasses.dataclass(frozen=True)
class BartConfig:
    """Hyperparameters of a BART network; defaults are BART-base (~140M)."""

    vocab_size: int = 50265
    d_model: int = 768
    num_heads: int = 12
    head_dim: int = 64
    d_ff: int = 3072
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    max_position_embeddings: int = 1024
    dropout_rate: float = 0.0  # embeddings and residual branches (HF `dropout`)
    attention_dropout_rate: float = 0.0  # attention probabilities (HF `attention_dropout`)
    activation_dropout_rate: float = 0.0  # the MLP's hidden activations (HF `activation_dropout`)
    activation: str = "gelu"  # erf GELU as BART; "gelu_tanh" or "relu" also work
    scale_embedding: bool = False  # multiply token embeddings by sqrt(d_model) (HF `scale_embedding`)
    layer_norm_epsilon: float = 1e-5
    dtype: str = "float32"  # activation dtype name, e.g. "bfloat16"
    remat_policy: str = "none"  # per-layer jax.checkpoint in training: "none", "full" or "dots" (stacks.REMAT_POLICIES)
    scan_layers: bool = False  # stacked layer params (leading "layers" axis), applied with lax.scan
    kernels: str = "auto"  # KERNELS: "auto" (by backend), "xla" or "cpu_tuned" (see nn/kernels.py)

    def __post_init__(self):
        positive = ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_encoder_layers",
                    "num_decoder_layers", "max_position_embeddings")
        check_config(self, positive, {"activation": ACTIVATIONS})


def _attention(config: BartConfig, ops: kernels.Kernels, rngs: nnx.Rngs) -> attention.MultiHeadAttention:
    return attention.MultiHeadAttention(
        config.d_model, config.num_heads, config.head_dim, kernels=ops, dropout_rate=config.attention_dropout_rate,
        scale_logits=True, use_bias=True, dtype=config.dtype, rngs=rngs,
    )


def _mlp(config: BartConfig, ops: kernels.Kernels, rngs: nnx.Rngs) -> layers.MlpBlock:
    return layers.MlpBlock(
        config.d_model, config.d_ff, kernels=ops, activation=config.activation,
        dropout_rate=config.activation_dropout_rate, use_bias=True, dtype=config.dtype, rngs=rngs,
    )


def _norm(config: BartConfig) -> layers.LayerNorm:
    return layers.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=config.dtype)


class EncoderLayer(nnx.Module):
    """Post-norm: x <- norm(x + attention(x)), then x <- norm(x + mlp(x)), with residual dropout."""

    def __init__(self, config: BartConfig, *, rngs: nnx.Rngs):
        self.kernels = kernels.resolve(config.kernels)
        self.self_attention = _attention(config, self.kernels, rngs)
        self.self_attention_layer_norm = _norm(config)
        self.mlp = _mlp(config, self.kernels, rngs)
        self.mlp_layer_norm = _norm(config)
        self.dropout_rate = config.dropout_rate

    def __call__(self, x: jax.Array, bias: jax.Array, dropout_rngs: nnx.Rngs | None) -> jax.Array:
        drop = self.kernels.dropout
        h = self.self_attention(x, x, bias, dropout_rngs=dropout_rngs)
        x = self.self_attention_layer_norm(x + drop(h, self.dropout_rate, dropout_rngs))
        h = self.mlp(x, dropout_rngs=dropout_rngs)
        return self.mlp_layer_norm(x + drop(h, self.dropout_rate, dropout_rngs))


class DecoderLayer(nnx.Module):
    """Post-norm causal self-attention, cross-attention to the encoder, and MLP."""

    def __init__(self, config: BartConfig, *, rngs: nnx.Rngs):
        self.kernels = kernels.resolve(config.kernels)
        self.self_attention = _attention(config, self.kernels, rngs)
        self.self_attention_layer_norm = _norm(config)
        self.cross_attention = _attention(config, self.kernels, rngs)
        self.cross_attention_layer_norm = _norm(config)
        self.mlp = _mlp(config, self.kernels, rngs)
        self.mlp_layer_norm = _norm(config)
        self.dropout_rate = config.dropout_rate

    def __call__(
        self,
        y: jax.Array,
        encoded: jax.Array,
        self_bias: jax.Array,
        cross_bias: jax.Array,
        dropout_rngs: nnx.Rngs | None,
    ) -> jax.Array:
        def drop(h: jax.Array) -> jax.Array:
            return self.kernels.dropout(h, self.dropout_rate, dropout_rngs)

        y = self.self_attention_layer_norm(y + drop(self.self_attention(y, y, self_bias, dropout_rngs=dropout_rngs)))
        h = self.cross_attention(y, encoded, cross_bias, dropout_rngs=dropout_rngs)
        y = self.cross_attention_layer_norm(y + drop(h))
        return self.mlp_layer_norm(y + drop(self.mlp(y, dropout_rngs=dropout_rngs)))

    def decode_step(
        self, y: jax.Array, state: DecodeState, cache: StackCache, layer: int | jax.Array, self_bias: jax.Array
    ) -> tuple[jax.Array, StackCache]:
        """One position [b, 1, e] as layer `layer` of the stack's self-attention `cache`; returns the output
        and the cache with this position written. No dropout (inference)."""
        h, cache = self.self_attention.decode_step(y, cache, layer, state.index, self_bias)
        y = self.self_attention_layer_norm(y + h)
        h = self.cross_attention.attend_cached(y, attention.layer_cache(state.cross, layer), state.cross_attention_bias())
        y = self.cross_attention_layer_norm(y + h)
        return self.mlp_layer_norm(y + self.mlp(y)), cache


class Embedder(nnx.Module):
    """One stack's input: shared token embedding (optionally scaled) + its own learned positions, then a
    layer norm and dropout."""

    def __init__(self, config: BartConfig, *, rngs: nnx.Rngs):
        self.position_embedder = layers.PositionEmbed(
            config.max_position_embeddings, config.d_model, dtype=config.dtype, rngs=rngs
        )
        self.embedding_layer_norm = _norm(config)
        self.scale = config.d_model**0.5 if config.scale_embedding else None
        self.dropout_rate = config.dropout_rate
        self.kernels = kernels.resolve(config.kernels)

    def __call__(
        self, token_embeddings: jax.Array, positions: jax.Array, dropout_rngs: nnx.Rngs | None
    ) -> jax.Array:
        x = token_embeddings if self.scale is None else token_embeddings * jnp.asarray(self.scale, token_embeddings.dtype)
        x = self.embedding_layer_norm(x + self.position_embedder(positions))
        return self.kernels.dropout(x, self.dropout_rate, dropout_rngs)


class Bart(EncoderDecoderNetwork):
    """The BART encoder-decoder network: token ids in, float32 logits out.

    Dropout is applied iff `dropout_rngs` is given (e.g. `nnx.Rngs(dropout=key)`) and a rate is > 0.
    """

    def __init__(self, config: BartConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.token_embedder = layers.Embed(
            config.vocab_size, config.d_model, kernels=kernels.resolve(config.kernels), stddev=0.02,
            dtype=config.dtype, rngs=rngs,
        )
        self.encoder_embedder = Embedder(config, rngs=rngs)
        self.encoder_layers = stacks.make_layers(
            lambda rngs: EncoderLayer(config, rngs=rngs), config.num_encoder_layers, config.scan_layers, rngs
        )
        self.decoder_embedder = Embedder(config, rngs=rngs)
        self.decoder_layers = stacks.make_layers(
            lambda rngs: DecoderLayer(config, rngs=rngs), config.num_decoder_layers, config.scan_layers, rngs
        )
        self.final_logits_bias = nnx.Param(jnp.zeros((config.vocab_size,), jnp.float32), logical_axes=("vocab",))

    def _encoder_stack(
        self, tokens: jax.Array, positions: jax.Array, mask: jax.Array, dropout_rngs: nnx.Rngs | None
    ) -> jax.Array:
        x = self.encoder_embedder(self.token_embedder(tokens), positions, dropout_rngs)
        return stacks.apply_layers(
            self.encoder_layers, x, (layers.mask_to_bias(mask),), dropout_rngs,
            scan=self.config.scan_layers, remat_policy=self.config.remat_policy,
        )

    def _decoder_stack(
        self, tokens: jax.Array, positions: jax.Array, encoded: jax.Array, self_mask: jax.Array,
        cross_mask: jax.Array, dropout_rngs: nnx.Rngs | None,
    ) -> jax.Array:
        y = self.decoder_embedder(self.token_embedder(tokens), positions, dropout_rngs)
        return stacks.apply_layers(
            self.decoder_layers, y, (encoded, layers.mask_to_bias(self_mask), layers.mask_to_bias(cross_mask)),
            dropout_rngs, scan=self.config.scan_layers, remat_policy=self.config.remat_policy,
        )

    def _logits(self, y: jax.Array) -> jax.Array:
        return self.token_embedder.attend(y) + self.final_logits_bias[...]

    def init_decode_state(self, encoded: jax.Array, encoder_mask: jax.Array, max_decode_length: int) -> DecodeState:
        """Empty self-attention caches for `max_decode_length` positions plus every decoder layer's
        cross-attention keys and values, projected once from `encoded` [b, s, e]; `encoder_mask` [b, s]
        marks its real tokens."""
        if max_decode_length > self.config.max_position_embeddings:
            raise ValueError(
                f"max_decode_length {max_decode_length} exceeds the decoder's {self.config.max_position_embeddings} "
                "learned positions; decode fewer tokens (TASK_FEATURE_LENGTHS['targets'])."
            )
        return self._decode_state(
            self.decoder_layers, lambda layer: layer.cross_attention, encoded, encoder_mask, max_decode_length
        )

    def decode_step(self, state: DecodeState, token_ids: jax.Array) -> tuple[jax.Array, DecodeState]:
        """Feeds one decoder token per row ([b] ids for position `state.index`; position 0 takes the BOS
        id 0) and returns float32 next-token logits [b, vocab] and the advanced state; equal to row
        `state.index` of `decode` over the same prefix, at the cost of one position per call."""
        y = self.decoder_embedder(self.token_embedder(token_ids[:, None]), state.index[None, None], None)
        self_bias = state.self_attention_bias()

        def step(layer: DecoderLayer, carry, i):
            y, cache = carry
            return layer.decode_step(y, state, cache, i, self_bias), None

        (y, cache), _ = stacks.each_layer(self.decoder_layers, step, (y, state.cache), scan=self.config.scan_layers)
        return self._logits(y)[:, 0], state.advanced(cache)
