"""T5 encoder-decoder network (v1.1 gated-GELU, UL2 gated-SiLU or v1.0 ReLU) in Flax NNX.

Pre-norm residual blocks, RMS norms, relative position biases (one table per stack, computed once
per forward pass and shared by that stack's layers; umT5: one table per layer), shared token embedding,
tied or untied logits.
Token id 0 is padding; packed rows carry segment ids (0 = padding) that keep segments apart.

Two options for large configs (both off by default; neither changes the numbers):
- `T5Config.remat_policy`: recompute each layer's activations in the backward pass (`jax.checkpoint`
  per layer) instead of keeping them, trading FLOPs for activation memory.
- `T5Config.scan_layers`: each stack's layers are ONE module whose params carry a leading `layers`
  axis, applied with `jax.lax.scan` (in training and in decoding), so the program (and its compile
  time) does not grow with depth. `stacks.stack_layer_params` / `unstack_layer_params` convert params.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_lite import partitioning
from t5x_lite.networks.config_checks import ConfigError, check_config
from t5x_lite.networks.encoder_decoder import EncoderDecoderNetwork
from t5x_lite.nn import attention, kernels, layers, stacks
from t5x_lite.nn.attention import DecodeState, StackCache

FEED_FORWARDS = ("gated-gelu", "gated-silu", "relu")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyperparameters of a T5 network; defaults are T5 v1.1 small."""

    vocab_size: int = 32128
    d_model: int = 512
    num_heads: int = 6
    head_dim: int = 64
    d_ff: int = 1024
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    dropout_rate: float = 0.0
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward: str = "gated-gelu"  # "gated-gelu" (T5 v1.1), "gated-silu" (UL2) or "relu" (T5 v1.0)
    tie_word_embeddings: bool = False  # v1.0 True: logits = decoder_out * d_model**-0.5 @ embedding.T
    layer_norm_epsilon: float = 1e-6
    relative_bias_per_layer: bool = False  # umT5: each layer's self-attention has its own relative-position table
    dtype: str = "float32"  # activation dtype name, e.g. "bfloat16"
    remat_policy: str = "none"  # per-layer jax.checkpoint: "none", "full" or "dots" (see stacks.REMAT_POLICIES)
    scan_layers: bool = False  # stacked layer params (leading "layers" axis) applied with lax.scan
    attention_impl: str = "auto"  # "auto" (cuDNN fused on GPU in bf16, else einsum), "einsum", "xla", "cudnn"
    kernels: str = "auto"  # KERNELS: "auto" (by backend), "xla" or "cpu_tuned" (see nn/kernels.py)

    def __post_init__(self):
        if self.feed_forward not in FEED_FORWARDS:
            raise ConfigError(
                f"T5Config.feed_forward={self.feed_forward!r} is not supported; "
                "use 'gated-gelu' (T5 v1.1), 'gated-silu' (UL2) or 'relu' (T5 v1.0)."
            )
        if self.scan_layers and min(self.num_encoder_layers, self.num_decoder_layers) < 1:
            raise ConfigError(
                f"T5Config.scan_layers=True needs at least one layer per stack, got "
                f"{self.num_encoder_layers} encoder / {self.num_decoder_layers} decoder layers."
            )
        check_config(self)


def _attention(config: T5Config, ops: kernels.Kernels, rngs: nnx.Rngs) -> attention.MultiHeadAttention:
    return attention.MultiHeadAttention(
        config.d_model, config.num_heads, config.head_dim, kernels=ops, dropout_rate=config.dropout_rate,
        implementation=config.attention_impl, dtype=config.dtype, rngs=rngs,
    )


def _mlp(config: T5Config, ops: kernels.Kernels, rngs: nnx.Rngs) -> layers.MlpBlock:
    return layers.MlpBlock(
        config.d_model, config.d_ff, kernels=ops, activation=config.feed_forward, dropout_rate=config.dropout_rate,
        dtype=config.dtype, rngs=rngs,
    )


def _norm(config: T5Config) -> layers.RMSNorm:
    return layers.RMSNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=config.dtype)


def _relpos_bias(config: T5Config, bidirectional: bool, rngs: nnx.Rngs) -> layers.RelativePositionBias:
    return layers.RelativePositionBias(
        config.num_heads,
        num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
        bidirectional=bidirectional,
        rngs=rngs,
    )


def _stack_relpos_bias(config: T5Config, bidirectional: bool, rngs: nnx.Rngs) -> layers.RelativePositionBias | None:
    """The table a stack's layers share (None when each layer has its own)."""
    return None if config.relative_bias_per_layer else _relpos_bias(config, bidirectional, rngs)


def _layer_relpos_bias(config: T5Config, bidirectional: bool, rngs: nnx.Rngs) -> layers.RelativePositionBias | None:
    """A layer's own table (umT5), else None."""
    return _relpos_bias(config, bidirectional, rngs) if config.relative_bias_per_layer else None


def _with_layer_bias(
    relpos_bias: layers.RelativePositionBias | None, ops: kernels.Kernels, bias: jax.Array, positions: jax.Array
) -> jax.Array:
    """`bias` plus `relpos_bias` over `positions` x `positions` (unchanged when there is no table here)."""
    return bias if relpos_bias is None else ops.add(relpos_bias(positions, positions), bias)


class EncoderLayer(nnx.Module):
    """Pre-norm self-attention then pre-norm feed-forward, each with dropout and a residual."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.kernels = kernels.resolve(config.kernels)
        self.relpos_bias = _layer_relpos_bias(config, bidirectional=True, rngs=rngs)
        self.pre_attention_layer_norm = _norm(config)
        self.attention = _attention(config, self.kernels, rngs)
        self.pre_mlp_layer_norm = _norm(config)
        self.mlp = _mlp(config, self.kernels, rngs)
        self.dropout_rate = config.dropout_rate

    def __call__(self, x: jax.Array, bias: jax.Array, dropout_rngs: nnx.Rngs | None) -> jax.Array:
        drop = self.kernels.dropout
        bias = _with_layer_bias(self.relpos_bias, self.kernels, bias, jnp.arange(x.shape[1]))
        h = self.pre_attention_layer_norm(x)
        h = self.attention(h, h, bias, dropout_rngs=dropout_rngs)
        x = x + drop(h, self.dropout_rate, dropout_rngs)
        h = self.mlp(self.pre_mlp_layer_norm(x), dropout_rngs=dropout_rngs)
        return x + drop(h, self.dropout_rate, dropout_rngs)


class DecoderLayer(nnx.Module):
    """Pre-norm causal self-attention, cross-attention to the encoder, and feed-forward."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.kernels = kernels.resolve(config.kernels)
        self.relpos_bias = _layer_relpos_bias(config, bidirectional=False, rngs=rngs)
        self.pre_self_attention_layer_norm = _norm(config)
        self.self_attention = _attention(config, self.kernels, rngs)
        self.pre_cross_attention_layer_norm = _norm(config)
        self.encoder_decoder_attention = _attention(config, self.kernels, rngs)
        self.pre_mlp_layer_norm = _norm(config)
        self.mlp = _mlp(config, self.kernels, rngs)
        self.dropout_rate = config.dropout_rate

    def __call__(
        self,
        y: jax.Array,
        encoded: jax.Array,
        self_bias: jax.Array,
        cross_bias: jax.Array,
        dropout_rngs: nnx.Rngs | None,
    ) -> jax.Array:
        drop = self.kernels.dropout
        self_bias = _with_layer_bias(self.relpos_bias, self.kernels, self_bias, jnp.arange(y.shape[1]))
        h = self.pre_self_attention_layer_norm(y)
        h = self.self_attention(h, h, self_bias, dropout_rngs=dropout_rngs)
        y = y + drop(h, self.dropout_rate, dropout_rngs)
        h = self.pre_cross_attention_layer_norm(y)
        h = self.encoder_decoder_attention(h, encoded, cross_bias, dropout_rngs=dropout_rngs)
        y = y + drop(h, self.dropout_rate, dropout_rngs)
        h = self.mlp(self.pre_mlp_layer_norm(y), dropout_rngs=dropout_rngs)
        return y + drop(h, self.dropout_rate, dropout_rngs)

    def decode_step(
        self, y: jax.Array, state: DecodeState, cache: StackCache, layer: int | jax.Array, self_bias: jax.Array
    ) -> tuple[jax.Array, StackCache]:
        """One position [b, 1, e] as layer `layer` of the stack's self-attention `cache`; returns the output
        and the cache with this position written. No dropout (inference)."""
        if self.relpos_bias is not None:
            key_positions = jnp.arange(attention.cache_length(cache))
            self_bias = self.relpos_bias(state.index[None], key_positions) + self_bias
        h, cache = self.self_attention.decode_step(
            self.pre_self_attention_layer_norm(y), cache, layer, state.index, self_bias
        )
        y = y + h
        h = self.pre_cross_attention_layer_norm(y)
        cross = attention.layer_cache(state.cross, layer)
        y = y + self.encoder_decoder_attention.attend_cached(h, cross, state.cross_attention_bias())
        return y + self.mlp(self.pre_mlp_layer_norm(y)), cache


class Encoder(nnx.Module):
    """Stack of encoder layers sharing one bidirectional relative-position bias, then a final norm."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.kernels = kernels.resolve(config.kernels)
        self.relpos_bias = _stack_relpos_bias(config, bidirectional=True, rngs=rngs)
        self.layers = stacks.make_layers(
            lambda rngs: EncoderLayer(config, rngs=rngs), config.num_encoder_layers, config.scan_layers, rngs
        )
        self.encoder_norm = _norm(config)
        self.dropout_rate = config.dropout_rate
        self.scan_layers = config.scan_layers
        self.remat_policy = config.remat_policy

    def __call__(self, x: jax.Array, mask: jax.Array, dropout_rngs: nnx.Rngs | None) -> jax.Array:
        x = self.kernels.dropout(x, self.dropout_rate, dropout_rngs)
        x = stacks.apply_layers(
            self.layers, x, (self._bias(mask),), dropout_rngs, scan=self.scan_layers, remat_policy=self.remat_policy
        )
        return self.kernels.dropout(self.encoder_norm(x), self.dropout_rate, dropout_rngs)

    def hidden_states(self, x: jax.Array, mask: jax.Array) -> list[jax.Array]:
        """The residual stream before each layer and after the last (then normed, as `__call__` returns
        it), without dropout: [embedding output, layer 1, ..., layer n], each [b, s, e]."""
        bias = self._bias(mask)

        def layer_output(layer: EncoderLayer, x: jax.Array, i) -> tuple[jax.Array, jax.Array]:
            x = layer(x, bias, None)
            return x, x

        _, outputs = stacks.each_layer(self.layers, layer_output, x, scan=self.scan_layers)
        states = [x, *stacks.per_layer(outputs)]
        return states[:-1] + [self.encoder_norm(states[-1])]

    def _bias(self, mask: jax.Array) -> jax.Array:
        """The layers' shared attention bias: relative positions (unless per layer) plus the mask [b, 1, q or 1, k]."""
        positions = jnp.arange(mask.shape[-1])
        return _with_layer_bias(self.relpos_bias, self.kernels, layers.mask_to_bias(mask), positions)


class Decoder(nnx.Module):
    """Stack of decoder layers sharing one causal relative-position bias, then a final norm."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.kernels = kernels.resolve(config.kernels)
        self.relpos_bias = _stack_relpos_bias(config, bidirectional=False, rngs=rngs)
        self.layers = stacks.make_layers(
            lambda rngs: DecoderLayer(config, rngs=rngs), config.num_decoder_layers, config.scan_layers, rngs
        )
        self.decoder_norm = _norm(config)
        self.dropout_rate = config.dropout_rate
        self.scan_layers = config.scan_layers
        self.remat_policy = config.remat_policy

    def __call__(
        self,
        y: jax.Array,
        encoded: jax.Array,
        self_mask: jax.Array,
        cross_mask: jax.Array,
        dropout_rngs: nnx.Rngs | None,
    ) -> jax.Array:
        self_bias = _with_layer_bias(self.relpos_bias, self.kernels, layers.mask_to_bias(self_mask), jnp.arange(y.shape[1]))
        cross_bias = layers.mask_to_bias(cross_mask)
        y = self.kernels.dropout(y, self.dropout_rate, dropout_rngs)
        y = stacks.apply_layers(
            self.layers, y, (encoded, self_bias, cross_bias), dropout_rngs,
            scan=self.scan_layers, remat_policy=self.remat_policy,
        )
        return self.kernels.dropout(self.decoder_norm(y), self.dropout_rate, dropout_rngs)

    def decode_step(self, y: jax.Array, state: DecodeState) -> tuple[jax.Array, DecodeState]:
        """One embedded position [b, 1, e] at `state.index` -> normed output [b, 1, e] and the advanced state."""
        key_positions = jnp.arange(attention.cache_length(state.cache))
        # Bias of the single query position only: [1, h, 1, length] + the visible slots [b, 1, 1, length].
        self_bias = state.self_attention_bias()
        if self.relpos_bias is not None:
            self_bias = self.relpos_bias(state.index[None], key_positions) + self_bias

        def step(layer: DecoderLayer, carry, i):
            y, cache = carry
            return layer.decode_step(y, state, cache, i, self_bias), None

        (y, cache), _ = stacks.each_layer(self.layers, step, (y, state.cache), scan=self.scan_layers)
        return self.decoder_norm(y), state.advanced(cache)


class T5(EncoderDecoderNetwork):
    """The T5 encoder-decoder network: token ids in, float32 logits out.

    T5 has no absolute position embeddings: relative biases come from index differences, which
    within a contiguous packed segment equal the in-segment position differences, so packed rows
    need only segment ids (`*_positions` arguments are accepted for interface uniformity and unused).
    Dropout is applied iff `dropout_rngs` is given (e.g. `nnx.Rngs(dropout=key)`) and the rate is > 0.
    """

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        ops = kernels.resolve(config.kernels)
        self.token_embedder = layers.Embed(config.vocab_size, config.d_model, kernels=ops, dtype=config.dtype, rngs=rngs)
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        self.logits_dense = None if config.tie_word_embeddings else layers.Dense(
            (config.d_model,), (config.vocab_size,), ("embed", "vocab"),
            init=layers.variance_scaling("truncated_normal"), kernels=ops, dtype=config.dtype, rngs=rngs,
        )

    def _encoder_stack(
        self, tokens: jax.Array, positions: jax.Array, mask: jax.Array, dropout_rngs: nnx.Rngs | None
    ) -> jax.Array:
        return self.encoder(self.token_embedder(tokens), mask, dropout_rngs)

    def encoder_hidden_states(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> list[jax.Array]:
        """[embedding output, layer 1, ..., layer n] of the encoder, the last normed as `encode` returns it."""
        return self.encoder.hidden_states(self.token_embedder(tokens), layers.encoder_mask(tokens, segment_ids))

    def _decoder_stack(
        self, tokens: jax.Array, positions: jax.Array, encoded: jax.Array, self_mask: jax.Array,
        cross_mask: jax.Array, dropout_rngs: nnx.Rngs | None,
    ) -> jax.Array:
        return self.decoder(self.token_embedder(tokens), encoded, self_mask, cross_mask, dropout_rngs)

    def _logits(self, y: jax.Array) -> jax.Array:
        """Decoder output [b, t, e] -> float32 logits [b, t, vocab] (tied or untied)."""
        if self.logits_dense is None:
            return self.token_embedder.attend(y * self.config.d_model**-0.5)
        return partitioning.constrain(self.logits_dense(y, out_dtype=jnp.float32), "logits", layers.VOCAB_AXES)

    def init_decode_state(self, encoded: jax.Array, encoder_mask: jax.Array, max_decode_length: int) -> DecodeState:
        """Empty self-attention caches for `max_decode_length` positions plus every decoder layer's
        cross-attention keys and values, projected once from `encoded` [b, s, e]; `encoder_mask` [b, s]
        marks its real tokens."""
        return self._decode_state(
            self.decoder.layers, lambda layer: layer.encoder_decoder_attention, encoded, encoder_mask, max_decode_length
        )

    def decode_step(self, state: DecodeState, token_ids: jax.Array) -> tuple[jax.Array, DecodeState]:
        """Feeds one decoder token per row ([b] ids for position `state.index`; position 0 takes the
        decoder start id) and returns float32 next-token logits [b, vocab] and the advanced state.

        Equal to row `state.index` of `decode` over the same token prefix; the cost per call is one
        position through every layer plus attention over the fixed-size cache (no prefix recompute).
        """
        y, state = self.decoder.decode_step(self.token_embedder(token_ids[:, None]), state)
        return self._logits(y)[:, 0], state
