"""BART-style encoder-decoder transformer in Flax NNX (denoising pre-training, text-to-text fine-tuning).

Learned absolute positions, a layer norm on the embeddings, post-layer-norm blocks with biases, GELU,
and one token embedding shared by the encoder, the decoder and the (tied) output layer, plus a
`final_logits_bias`. Token id 0 is padding; packed rows carry segment ids (0 = padding) and
in-segment positions, which the learned position embeddings need.

The parameters map one to one onto Hugging Face's `BartForConditionalGeneration` (`t5x_lite.hf.bart`),
but for HF's 2 extra leading rows of the position tables (ours start at position 0). Decoding encodes once,
projects every layer's cross-attention keys/values once, then runs the cached `decode_step` inside
`t5x_lite.decoding`'s while loops. For large models, `BartConfig.scan_layers` and `remat_policy` work
as T5's (see `t5x_lite.models.stacks`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import gin
import jax
import jax.numpy as jnp
import seqio
from flax import nnx

from t5x_lite import decoding
from t5x_lite.models import layers, stacks
from t5x_lite.models.base import BaseModel
from t5x_lite.models.encoder_decoder import DecodeState

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
    scan_layers: bool = False  # stacked layer params (leading "layers" axis), trained with lax.scan

    def __post_init__(self):
        stacks.check_remat_policy("BartConfig", self.remat_policy)
        positive = ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_encoder_layers",
                    "num_decoder_layers", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"BartConfig.{name}={getattr(self, name)} must be a positive integer.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"BartConfig.activation={self.activation!r} is not supported; use one of {ACTIVATIONS}.")
        for name in ("dropout_rate", "attention_dropout_rate", "activation_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"BartConfig.{name}={getattr(self, name)} must be in [0, 1).")
        try:
            jnp.dtype(self.dtype)
        except TypeError as e:
            raise ValueError(
                f"BartConfig.dtype={self.dtype!r} is not a dtype name; use e.g. 'float32' or 'bfloat16'."
            ) from e


def _attention(config: BartConfig, rngs: nnx.Rngs) -> layers.MultiHeadAttention:
    return layers.MultiHeadAttention(
        config.d_model, config.num_heads, config.head_dim, dropout_rate=config.attention_dropout_rate,
        scale_logits=True, use_bias=True, dtype=config.dtype, rngs=rngs,
    )


def _mlp(config: BartConfig, rngs: nnx.Rngs) -> layers.MlpBlock:
    return layers.MlpBlock(
        config.d_model, config.d_ff, activation=config.activation, dropout_rate=config.activation_dropout_rate,
        use_bias=True, dtype=config.dtype, rngs=rngs,
    )


def _norm(config: BartConfig) -> layers.LayerNorm:
    return layers.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=config.dtype)


class EncoderLayer(nnx.Module):
    """Post-norm: x <- norm(x + attention(x)), then x <- norm(x + mlp(x)), with residual dropout."""

    def __init__(self, config: BartConfig, *, rngs: nnx.Rngs):
        self.self_attention = _attention(config, rngs)
        self.self_attention_layer_norm = _norm(config)
        self.mlp = _mlp(config, rngs)
        self.mlp_layer_norm = _norm(config)
        self.dropout_rate = config.dropout_rate

    def __call__(self, x: jax.Array, bias: jax.Array, dropout_rngs: nnx.Rngs | None) -> jax.Array:
        h = self.self_attention(x, x, bias, dropout_rngs=dropout_rngs)
        x = self.self_attention_layer_norm(x + layers.dropout(h, self.dropout_rate, dropout_rngs))
        h = self.mlp(x, dropout_rngs=dropout_rngs)
        return self.mlp_layer_norm(x + layers.dropout(h, self.dropout_rate, dropout_rngs))


class DecoderLayer(nnx.Module):
    """Post-norm causal self-attention, cross-attention to the encoder, and MLP."""

    def __init__(self, config: BartConfig, *, rngs: nnx.Rngs):
        self.self_attention = _attention(config, rngs)
        self.self_attention_layer_norm = _norm(config)
        self.cross_attention = _attention(config, rngs)
        self.cross_attention_layer_norm = _norm(config)
        self.mlp = _mlp(config, rngs)
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
        drop = functools.partial(layers.dropout, rate=self.dropout_rate, rngs=dropout_rngs)
        y = self.self_attention_layer_norm(y + drop(self.self_attention(y, y, self_bias, dropout_rngs=dropout_rngs)))
        h = self.cross_attention(y, encoded, cross_bias, dropout_rngs=dropout_rngs)
        y = self.cross_attention_layer_norm(y + drop(h))
        return self.mlp_layer_norm(y + drop(self.mlp(y, dropout_rngs=dropout_rngs)))

    def decode_step(
        self,
        y: jax.Array,
        cache: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
        index: jax.Array,
        self_bias: jax.Array,
        cross_bias: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One position [b, 1, e] with this layer's (self key, self value, cross key, cross value) cache;
        returns (output, new self key cache, new self value cache). No dropout (inference)."""
        self_key, self_value, cross_key, cross_value = cache
        h, self_key, self_value = self.self_attention.decode_step(y, self_key, self_value, index, self_bias)
        y = self.self_attention_layer_norm(y + h)
        att = self.cross_attention
        y = self.cross_attention_layer_norm(y + att.attend_cached(att.project_query(y), cross_key, cross_value, cross_bias))
        return self.mlp_layer_norm(y + self.mlp(y)), self_key, self_value


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

    def __call__(
        self, token_embeddings: jax.Array, positions: jax.Array, dropout_rngs: nnx.Rngs | None
    ) -> jax.Array:
        x = token_embeddings if self.scale is None else token_embeddings * jnp.asarray(self.scale, token_embeddings.dtype)
        x = self.embedding_layer_norm(x + self.position_embedder(positions))
        return layers.dropout(x, self.dropout_rate, dropout_rngs)


class Bart(nnx.Module):
    """The BART encoder-decoder network: token ids in, float32 logits out.

    Dropout is applied iff `dropout_rngs` is given (e.g. `nnx.Rngs(dropout=key)`) and a rate is > 0.
    """

    def __init__(self, config: BartConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.token_embedder = layers.Embed(config.vocab_size, config.d_model, stddev=0.02, dtype=config.dtype, rngs=rngs)
        self.encoder_embedder = Embedder(config, rngs=rngs)
        self.encoder_layers = stacks.make_layers(
            lambda rngs: EncoderLayer(config, rngs=rngs), config.num_encoder_layers, config.scan_layers, rngs
        )
        self.decoder_embedder = Embedder(config, rngs=rngs)
        self.decoder_layers = stacks.make_layers(
            lambda rngs: DecoderLayer(config, rngs=rngs), config.num_decoder_layers, config.scan_layers, rngs
        )
        self.final_logits_bias = nnx.Param(jnp.zeros((config.vocab_size,), jnp.float32), logical_axes=("vocab",))

    def encode(
        self,
        encoder_input_tokens: jax.Array,
        encoder_segment_ids: jax.Array | None = None,
        encoder_positions: jax.Array | None = None,
        *,
        dropout_rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """[b, s] tokens -> [b, s, d_model] encoded sequence (in the activation dtype)."""
        if encoder_segment_ids is None:
            mask = layers.padding_mask(encoder_input_tokens)
        else:
            mask = layers.padding_mask(encoder_segment_ids) & layers.segment_mask(encoder_segment_ids, encoder_segment_ids)
        positions = jnp.arange(encoder_input_tokens.shape[1])[None] if encoder_positions is None else encoder_positions
        x = self.encoder_embedder(self.token_embedder(encoder_input_tokens), positions, dropout_rngs)
        bias = layers.mask_to_bias(mask)
        return stacks.apply_layers(
            self.encoder_layers, x, (bias,), dropout_rngs,
            scan=self.config.scan_layers, remat_policy=self.config.remat_policy,
        )

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
        """Teacher-forced decoder over [b, t] inputs (starting with the BOS id 0) -> float32 logits
        [b, t, vocab]; padded tail positions are garbage and must be masked in the loss."""
        if (encoder_segment_ids is None) != (decoder_segment_ids is None):
            raise ValueError("Pass both encoder_segment_ids and decoder_segment_ids (packed) or neither (unpacked).")
        self_mask = layers.causal_mask(decoder_input_tokens.shape[1])
        if decoder_segment_ids is None:
            cross_mask = layers.padding_mask(encoder_input_tokens)
        else:
            self_mask = self_mask & layers.padding_mask(decoder_segment_ids)
            self_mask = self_mask & layers.segment_mask(decoder_segment_ids, decoder_segment_ids)
            cross_mask = layers.padding_mask(encoder_segment_ids)
            cross_mask = cross_mask & layers.segment_mask(decoder_segment_ids, encoder_segment_ids)
        positions = jnp.arange(decoder_input_tokens.shape[1])[None] if decoder_positions is None else decoder_positions
        y = self.decoder_embedder(self.token_embedder(decoder_input_tokens), positions, dropout_rngs)
        self_bias, cross_bias = layers.mask_to_bias(self_mask), layers.mask_to_bias(cross_mask)
        y = stacks.apply_layers(
            self.decoder_layers, y, (encoded, self_bias, cross_bias), dropout_rngs,
            scan=self.config.scan_layers, remat_policy=self.config.remat_policy,
        )
        return self._logits(y)

    def _logits(self, y: jax.Array) -> jax.Array:
        return self.token_embedder.attend(y) + self.final_logits_bias[...]

    def init_decode_state(
        self, encoded: jax.Array, encoder_input_tokens: jax.Array, max_decode_length: int
    ) -> DecodeState:
        """Empty self-attention caches for `max_decode_length` positions plus every decoder layer's
        cross-attention keys and values, projected once from `encoded` [b, s, e] (unpacked rows)."""
        if max_decode_length > self.config.max_position_embeddings:
            raise ValueError(
                f"max_decode_length {max_decode_length} exceeds the decoder's {self.config.max_position_embeddings} "
                "learned positions; decode fewer tokens (TASK_FEATURE_LENGTHS['targets'])."
            )
        shape = (encoded.shape[0], self.config.num_heads, max_decode_length, self.config.head_dim)
        dtype = jnp.dtype(self.config.dtype)
        cross = [layer.cross_attention.project_kv(encoded) for layer in stacks.layer_views(self.decoder_layers, self.config.scan_layers)]
        n = self.config.num_decoder_layers
        return DecodeState(
            self_keys=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
            self_values=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
            cross_keys=tuple(k for k, _ in cross),
            cross_values=tuple(v for _, v in cross),
            encoder_mask=encoder_input_tokens > 0,
            index=jnp.zeros((), jnp.int32),
        )

    def decode_step(self, state: DecodeState, token_ids: jax.Array) -> tuple[jax.Array, DecodeState]:
        """Feeds one decoder token per row ([b] ids for position `state.index`; position 0 takes the BOS
        id 0) and returns float32 next-token logits [b, vocab] and the advanced state; equal to row
        `state.index` of `decode` over the same prefix, at the cost of one position per call."""
        index = state.index
        y = self.decoder_embedder(self.token_embedder(token_ids[:, None]), index[None, None], None)
        key_positions = jnp.arange(state.self_keys[0].shape[2])
        self_bias = layers.mask_to_bias(key_positions <= index)[None, None, None, :]
        cross_bias = layers.mask_to_bias(state.encoder_mask[:, None, None, :])
        self_keys, self_values = [], []
        for i, layer in enumerate(stacks.layer_views(self.decoder_layers, self.config.scan_layers)):
            cache = (state.self_keys[i], state.self_values[i], state.cross_keys[i], state.cross_values[i])
            y, key, value = layer.decode_step(y, cache, index, self_bias, cross_bias)
            self_keys.append(key)
            self_values.append(value)
        new_state = state._replace(self_keys=tuple(self_keys), self_values=tuple(self_values), index=index + 1)
        return self._logits(y)[:, 0], new_state

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


gin.external_configurable(BartConfig, module="t5x_lite")


@gin.configurable(module="t5x_lite")
class BartModel(BaseModel):
    """The trainer's view of BART: packed EncDec batches (`bundled_bart_denoising`: the decoder
    reconstructs the original text from the noised inputs), loss on the decoder."""

    feature_converter_cls = seqio.EncDecFeatureConverter

    def __init__(self, config: BartConfig = gin.REQUIRED, label_smoothing: float = 0.0, z_loss: float = 0.0):
        super().__init__(label_smoothing=label_smoothing, z_loss=z_loss)
        self.config = config

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dropout_rate(self) -> float:
        c = self.config
        return max(c.dropout_rate, c.attention_dropout_rate, c.activation_dropout_rate)

    def build_network(self, rngs: nnx.Rngs) -> Bart:
        return Bart(self.config, rngs=rngs)

    def network_logits(self, network: Bart, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None) -> jax.Array:
        return network(
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            encoder_segment_ids=batch.get("encoder_segment_ids"),
            decoder_segment_ids=batch.get("decoder_segment_ids"),
            encoder_positions=batch.get("encoder_positions"),
            decoder_positions=batch.get("decoder_positions"),
            dropout_rngs=dropout_rngs,
        )

    def predict_batch(
        self,
        network: Bart,
        batch: Mapping[str, jax.Array],
        *,
        max_decode_length: int,
        method: str = "greedy",
        rng: jax.Array | None = None,
        beam_size: int = 4,
        alpha: float = 0.6,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_id: int = 1,
    ) -> jax.Array:
        """Decodes [b, max_decode_length] tokens (0 after EOS) from unpacked `encoder_input_tokens`:
        encodes once, then runs the cached `decode_step` in one `lax.while_loop` (see `decoding.decode`)."""
        inputs = batch["encoder_input_tokens"]
        state = network.init_decode_state(network.encode(inputs), inputs, max_decode_length)
        return decoding.decode(
            network.decode_step, state, inputs.shape[0], max_decode_length, method=method, rng=rng,
            beam_size=beam_size, alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
        )

    def score_batch(self, network: Bart, batch: Mapping[str, jax.Array]) -> jax.Array:
        """[b] float32 log-likelihood of each row's `decoder_target_tokens`, weighted by the loss weights."""
        log_probs = jax.nn.log_softmax(self.network_logits(network, batch, None), axis=-1)
        token_log_probs = jnp.take_along_axis(log_probs, batch[self.targets_key][..., None], axis=-1)[..., 0]
        return jnp.sum(token_log_probs * batch[self.weights_key].astype(jnp.float32), axis=-1)
