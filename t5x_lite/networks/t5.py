"""T5 encoder-decoder network (v1.1 gated-GELU or v1.0 ReLU) in Flax NNX.

Pre-norm residual blocks, RMS norms, relative position biases (one table per stack, computed once
per forward pass and shared by that stack's layers), shared token embedding, tied or untied logits.
Token id 0 is padding; packed rows carry segment ids (0 = padding) that keep segments apart.

Two options for large configs (both off by default; neither changes the numbers):
- `T5Config.remat_policy`: recompute each layer's activations in the backward pass (`jax.checkpoint`
  per layer) instead of keeping them, trading FLOPs for activation memory.
- `T5Config.scan_layers`: each stack's layers are ONE module whose params carry a leading `layers`
  axis, applied with `jax.lax.scan`, so the program (and its compile time) does not grow with depth.
  `stacks.stack_layer_params` / `stacks.unstack_layer_params` convert params between the two layouts.
"""

import dataclasses
import functools
from collections.abc import Mapping
from typing import NamedTuple

import gin
import jax
import jax.numpy as jnp
import seqio
from flax import nnx

from t5x_lite import decoding
from t5x_lite.models import layers, stacks
from t5x_lite.models.base import BaseModel

FEED_FORWARDS = ("gated-gelu", "relu")



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
    feed_forward: str = "gated-gelu"  # "gated-gelu" (T5 v1.1) or "relu" (T5 v1.0)
    tie_word_embeddings: bool = False  # v1.0 True: logits = decoder_out * d_model**-0.5 @ embedding.T
    layer_norm_epsilon: float = 1e-6
    dtype: str = "float32"  # activation dtype name, e.g. "bfloat16"
    remat_policy: str = "none"  # per-layer jax.checkpoint: "none", "full" or "dots" (see stacks.REMAT_POLICIES)
    scan_layers: bool = False  # stacked layer params (leading "layers" axis) applied with lax.scan
    attention_impl: str = "auto"  # "auto" (cuDNN fused on GPU in bf16, else einsum), "einsum", "xla", "cudnn"

    def __post_init__(self):
        if self.feed_forward not in FEED_FORWARDS:
            raise ValueError(
                f"T5Config.feed_forward={self.feed_forward!r} is not supported; "
                "use 'gated-gelu' (T5 v1.1) or 'relu' (T5 v1.0)."
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"T5Config.dropout_rate={self.dropout_rate} must be in [0, 1).")
        if self.scan_layers and min(self.num_encoder_layers, self.num_decoder_layers) < 1:
            raise ValueError(
                f"T5Config.scan_layers=True needs at least one layer per stack, got "
                f"{self.num_encoder_layers} encoder / {self.num_decoder_layers} decoder layers."
            )
        if self.attention_impl not in layers.ATTENTION_IMPLS:
            raise ValueError(
                f"T5Config.attention_impl={self.attention_impl!r} is not supported; use one of "
                f"{list(layers.ATTENTION_IMPLS)}."
            )
        stacks.check_remat_policy("T5Config", self.remat_policy)
        try:
            jnp.dtype(self.dtype)
        except TypeError as e:
            raise ValueError(
                f"T5Config.dtype={self.dtype!r} is not a dtype name; use e.g. 'float32' or 'bfloat16'."
            ) from e


def _attention(config: T5Config, rngs: nnx.Rngs) -> layers.MultiHeadAttention:
    return layers.MultiHeadAttention(
        config.d_model, config.num_heads, config.head_dim,
        dropout_rate=config.dropout_rate, implementation=config.attention_impl, dtype=config.dtype, rngs=rngs,
    )


def _mlp(config: T5Config, rngs: nnx.Rngs) -> layers.MlpBlock:
    return layers.MlpBlock(
        config.d_model, config.d_ff,
        activation=config.feed_forward, dropout_rate=config.dropout_rate, dtype=config.dtype, rngs=rngs,
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


class EncoderLayer(nnx.Module):
    """Pre-norm self-attention then pre-norm feed-forward, each with dropout and a residual."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.pre_attention_layer_norm = _norm(config)
        self.attention = _attention(config, rngs)
        self.pre_mlp_layer_norm = _norm(config)
        self.mlp = _mlp(config, rngs)
        self.dropout_rate = config.dropout_rate

    def __call__(self, x: jax.Array, bias: jax.Array, dropout_rngs: nnx.Rngs | None) -> jax.Array:
        h = self.pre_attention_layer_norm(x)
        h = self.attention(h, h, bias, dropout_rngs=dropout_rngs)
        x = x + layers.dropout(h, self.dropout_rate, dropout_rngs)
        h = self.mlp(self.pre_mlp_layer_norm(x), dropout_rngs=dropout_rngs)
        return x + layers.dropout(h, self.dropout_rate, dropout_rngs)


class DecoderLayer(nnx.Module):
    """Pre-norm causal self-attention, cross-attention to the encoder, and feed-forward."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.pre_self_attention_layer_norm = _norm(config)
        self.self_attention = _attention(config, rngs)
        self.pre_cross_attention_layer_norm = _norm(config)
        self.encoder_decoder_attention = _attention(config, rngs)
        self.pre_mlp_layer_norm = _norm(config)
        self.mlp = _mlp(config, rngs)
        self.dropout_rate = config.dropout_rate

    def __call__(
        self,
        y: jax.Array,
        encoded: jax.Array,
        self_bias: jax.Array,
        cross_bias: jax.Array,
        dropout_rngs: nnx.Rngs | None,
    ) -> jax.Array:
        h = self.pre_self_attention_layer_norm(y)
        h = self.self_attention(h, h, self_bias, dropout_rngs=dropout_rngs)
        y = y + layers.dropout(h, self.dropout_rate, dropout_rngs)
        h = self.pre_cross_attention_layer_norm(y)
        h = self.encoder_decoder_attention(h, encoded, cross_bias, dropout_rngs=dropout_rngs)
        y = y + layers.dropout(h, self.dropout_rate, dropout_rngs)
        h = self.mlp(self.pre_mlp_layer_norm(y), dropout_rngs=dropout_rngs)
        return y + layers.dropout(h, self.dropout_rate, dropout_rngs)

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
        h = self.pre_self_attention_layer_norm(y)
        h, self_key, self_value = self.self_attention.decode_step(h, self_key, self_value, index, self_bias)
        return self._decode_cross_and_mlp(y + h, cross_key, cross_value, cross_bias), self_key, self_value

    def decode_step_stacked(
        self,
        y: jax.Array,
        caches: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
        layer: jax.Array,
        index: jax.Array,
        self_bias: jax.Array,
        cross_bias: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`decode_step` as layer `layer` of stacked [b, layers, h, len, d] caches (scan_layers): writes
        the new key/value slot straight into the stacked self-attention buffers (in place inside a
        scan), then reads this layer's slices; returns (output, new self keys, new self values)."""
        self_keys, self_values, cross_keys, cross_values = caches
        att = self.self_attention
        h = self.pre_self_attention_layer_norm(y)
        q, (k, v) = att.query(h), att.project_kv(h)  # k, v: [b, h, 1, d]
        start = (0, layer, 0, index, 0)
        self_keys = jax.lax.dynamic_update_slice(self_keys, k[:, None].astype(self_keys.dtype), start)
        self_values = jax.lax.dynamic_update_slice(self_values, v[:, None].astype(self_values.dtype), start)
        take = functools.partial(jax.lax.dynamic_index_in_dim, index=layer, axis=1, keepdims=False)
        y = y + att.attend_cached(q, take(self_keys), take(self_values), self_bias)
        return self._decode_cross_and_mlp(y, take(cross_keys), take(cross_values), cross_bias), self_keys, self_values

    def _decode_cross_and_mlp(
        self, y: jax.Array, cross_key: jax.Array, cross_value: jax.Array, cross_bias: jax.Array
    ) -> jax.Array:
        h = self.pre_cross_attention_layer_norm(y)
        att = self.encoder_decoder_attention
        y = y + att.attend_cached(att.query(h), cross_key, cross_value, cross_bias)
        return y + self.mlp(self.pre_mlp_layer_norm(y))


class DecodeState(NamedTuple):
    """Everything `T5.decode_step` needs besides the parameters (a pytree; every non-scalar leaf has
    the batch as its leading axis, so beam search can repeat and gather it row-wise).

    self_keys/self_values: per decoder layer, [b, heads, max_decode_length, head_dim] buffers in the
        activation dtype; slot t holds the self-attention key/value of decoder position t (t < index).
        Head-major, so the attention dots read the cache in place: a [b, length, heads, head_dim] cache
        made XLA transpose (copy) every buffer at every step (tiny model, 1024 slots: 208 -> 73 us/token).
    cross_keys/cross_values: per decoder layer, [b, heads, encoder_length, head_dim], projected once
        from the encoder output.
    With `scan_layers` each of these four is ONE array with the layers stacked on axis 1 (batch stays
        leading, as the decoding algorithms require), e.g. self_keys [b, layers, heads, max_len, head_dim].
    encoder_mask: [b, encoder_length] bool, True for real (non-padding) encoder tokens.
    index: int32 scalar, the decoder position the next `decode_step` call fills.
    """

    self_keys: tuple[jax.Array, ...] | jax.Array
    self_values: tuple[jax.Array, ...] | jax.Array
    cross_keys: tuple[jax.Array, ...] | jax.Array
    cross_values: tuple[jax.Array, ...] | jax.Array
    encoder_mask: jax.Array
    index: jax.Array


class Encoder(nnx.Module):
    """Stack of encoder layers sharing one bidirectional relative-position bias, then a final norm."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.relpos_bias = _relpos_bias(config, bidirectional=True, rngs=rngs)
        self.layers = stacks.make_layers(
            lambda rngs: EncoderLayer(config, rngs=rngs), config.num_encoder_layers, config.scan_layers, rngs
        )
        self.encoder_norm = _norm(config)
        self.dropout_rate = config.dropout_rate
        self.scan_layers = config.scan_layers
        self.remat_policy = config.remat_policy

    def __call__(self, x: jax.Array, mask: jax.Array, dropout_rngs: nnx.Rngs | None) -> jax.Array:
        positions = jnp.arange(x.shape[1])
        bias = layers.broadcast_add(self.relpos_bias(positions, positions), layers.mask_to_bias(mask))
        x = layers.dropout(x, self.dropout_rate, dropout_rngs)
        x = stacks.apply_layers(
            self.layers, x, (bias,), dropout_rngs, scan=self.scan_layers, remat_policy=self.remat_policy
        )
        return layers.dropout(self.encoder_norm(x), self.dropout_rate, dropout_rngs)


class Decoder(nnx.Module):
    """Stack of decoder layers sharing one causal relative-position bias, then a final norm."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.relpos_bias = _relpos_bias(config, bidirectional=False, rngs=rngs)
        self.layers = stacks.make_layers(
            lambda rngs: DecoderLayer(config, rngs=rngs), config.num_decoder_layers, config.scan_layers, rngs
        )
        self.decoder_norm = _norm(config)
        self.dropout_rate = config.dropout_rate
        self.num_layers = config.num_decoder_layers
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
        positions = jnp.arange(y.shape[1])
        self_bias = layers.broadcast_add(self.relpos_bias(positions, positions), layers.mask_to_bias(self_mask))
        cross_bias = layers.mask_to_bias(cross_mask)
        y = layers.dropout(y, self.dropout_rate, dropout_rngs)
        y = stacks.apply_layers(
            self.layers, y, (encoded, self_bias, cross_bias), dropout_rngs,
            scan=self.scan_layers, remat_policy=self.remat_policy,
        )
        return layers.dropout(self.decoder_norm(y), self.dropout_rate, dropout_rngs)

    def decode_step(self, y: jax.Array, state: DecodeState) -> tuple[jax.Array, DecodeState]:
        """One embedded position [b, 1, e] at `state.index` -> normed output [b, 1, e] and updated caches."""
        index = state.index
        key_positions = jnp.arange(state.self_keys.shape[3] if self.scan_layers else state.self_keys[0].shape[2])
        # Bias of the single query position only: [1, h, 1, max_len], future slots masked.
        self_bias = self.relpos_bias(index[None], key_positions)
        self_bias = self_bias + layers.mask_to_bias(key_positions <= index)[None, None, None, :]
        cross_bias = layers.mask_to_bias(state.encoder_mask[:, None, None, :])
        if self.scan_layers:
            return self._scanned_decode_step(y, state, self_bias, cross_bias)
        self_keys, self_values = [], []
        for i, layer in enumerate(self.layers):
            cache = (state.self_keys[i], state.self_values[i], state.cross_keys[i], state.cross_values[i])
            y, key, value = layer.decode_step(y, cache, index, self_bias, cross_bias)
            self_keys.append(key)
            self_values.append(value)
        new_state = state._replace(self_keys=tuple(self_keys), self_values=tuple(self_values), index=index + 1)
        return self.decoder_norm(y), new_state

    def _scanned_decode_step(
        self, y: jax.Array, state: DecodeState, self_bias: jax.Array, cross_bias: jax.Array
    ) -> tuple[jax.Array, DecodeState]:
        """`decode_step` over stacked layers: one `lax.scan` over (layer params, layer index) carrying
        the stacked [b, layers, h, len, d] self-attention caches (see `DecoderLayer.decode_step_stacked`)."""
        index = state.index
        graphdef, stacked = nnx.split(self.layers)

        def body(carry, xs):
            y, keys, values = carry
            layer_state, i = xs
            caches = (keys, values, state.cross_keys, state.cross_values)
            y, keys, values = nnx.merge(graphdef, layer_state).decode_step_stacked(
                y, caches, i, index, self_bias, cross_bias
            )
            return (y, keys, values), None

        xs = (stacked, jnp.arange(self.num_layers, dtype=jnp.int32))
        (y, keys, values), _ = jax.lax.scan(body, (y, state.self_keys, state.self_values), xs)
        return self.decoder_norm(y), state._replace(self_keys=keys, self_values=values, index=index + 1)


class T5(nnx.Module):
    """The T5 encoder-decoder network: token ids in, float32 logits out.

    T5 has no absolute position embeddings: relative biases come from index differences, which
    within a contiguous packed segment equal the in-segment position differences, so packed rows
    need only segment ids (`*_positions` arguments are accepted for interface uniformity and unused).
    Dropout is applied iff `dropout_rngs` is given (e.g. `nnx.Rngs(dropout=key)`) and the rate is > 0.
    """

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.token_embedder = layers.Embed(config.vocab_size, config.d_model, dtype=config.dtype, rngs=rngs)
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        self.logits_dense = None if config.tie_word_embeddings else layers.Dense(
            (config.d_model,), (config.vocab_size,), ("embed", "vocab"),
            init=layers.variance_scaling("truncated_normal"), dtype=config.dtype, rngs=rngs,
        )

    def encode(
        self,
        encoder_input_tokens: jax.Array,
        encoder_segment_ids: jax.Array | None = None,
        *,
        dropout_rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """[b, s] tokens -> [b, s, d_model] encoded sequence (in the activation dtype)."""
        if encoder_segment_ids is None:
            mask = layers.padding_mask(encoder_input_tokens)
        else:
            same_segment = layers.segment_mask(encoder_segment_ids, encoder_segment_ids)
            mask = layers.padding_mask(encoder_segment_ids) & same_segment
        return self.encoder(self.token_embedder(encoder_input_tokens), mask, dropout_rngs)

    def decode(
        self,
        encoded: jax.Array,
        encoder_input_tokens: jax.Array,
        decoder_input_tokens: jax.Array,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        *,
        dropout_rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Teacher-forced decoder over [b, t] inputs -> float32 logits [b, t, vocab].

        Decoder inputs start with token 0 (BOS = pad id), so unpacked self-attention is only causal;
        padded tail positions are garbage and must be masked in the loss.
        """
        if (encoder_segment_ids is None) != (decoder_segment_ids is None):
            raise ValueError(
                "Pass both encoder_segment_ids and decoder_segment_ids (packed) or neither (unpacked)."
            )
        self_mask = layers.causal_mask(decoder_input_tokens.shape[1])
        if decoder_segment_ids is None:
            cross_mask = layers.padding_mask(encoder_input_tokens)
        else:
            self_mask = self_mask & layers.padding_mask(decoder_segment_ids)
            self_mask = self_mask & layers.segment_mask(decoder_segment_ids, decoder_segment_ids)
            same_segment = layers.segment_mask(decoder_segment_ids, encoder_segment_ids)
            cross_mask = layers.padding_mask(encoder_segment_ids) & same_segment
        y = self.decoder(self.token_embedder(decoder_input_tokens), encoded, self_mask, cross_mask, dropout_rngs)
        return self._logits(y)

    def _logits(self, y: jax.Array) -> jax.Array:
        """Decoder output [b, t, e] -> float32 logits [b, t, vocab] (tied or untied)."""
        if self.logits_dense is None:
            return self.token_embedder.attend(y * self.config.d_model**-0.5)
        return self.logits_dense(y, out_dtype=jnp.float32)

    def init_decode_state(
        self,
        encoded: jax.Array,
        encoder_input_tokens: jax.Array,
        max_decode_length: int,
        encoder_segment_ids: jax.Array | None = None,
    ) -> DecodeState:
        """Empty self-attention caches for `max_decode_length` positions plus the cross-attention keys and
        values of every decoder layer, computed once from `encoded` [b, s, e] (unpacked rows; with
        segment ids, segment id 0 marks padding)."""
        batch = encoded.shape[0]
        shape = (batch, self.config.num_heads, max_decode_length, self.config.head_dim)
        dtype = jnp.dtype(self.config.dtype)
        mask_ids = encoder_input_tokens if encoder_segment_ids is None else encoder_segment_ids
        if self.config.scan_layers:  # stacked caches [b, layers, ...]: see DecodeState
            graphdef, stacked = nnx.split(self.decoder.layers)
            cross_keys, cross_values = jax.vmap(
                lambda s: nnx.merge(graphdef, s).encoder_decoder_attention.project_kv(encoded), out_axes=1
            )(stacked)
            stacked_shape = (batch, self.config.num_decoder_layers, *shape[1:])
            return DecodeState(
                self_keys=jnp.zeros(stacked_shape, dtype),
                self_values=jnp.zeros(stacked_shape, dtype),
                cross_keys=cross_keys,
                cross_values=cross_values,
                encoder_mask=mask_ids > 0,
                index=jnp.zeros((), jnp.int32),
            )
        cross = [layer.encoder_decoder_attention.project_kv(encoded) for layer in self.decoder.layers]
        n = len(self.decoder.layers)
        return DecodeState(
            self_keys=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
            self_values=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
            cross_keys=tuple(k for k, _ in cross),
            cross_values=tuple(v for _, v in cross),
            encoder_mask=mask_ids > 0,
            index=jnp.zeros((), jnp.int32),
        )

    def decode_step(self, state: DecodeState, token_ids: jax.Array) -> tuple[jax.Array, DecodeState]:
        """Feeds one decoder token per row ([b] ids for position `state.index`; position 0 takes the
        BOS id 0) and returns float32 next-token logits [b, vocab] and the advanced state.

        Equal to row `state.index` of `decode` over the same token prefix; the cost per call is one
        position through every layer plus attention over the fixed-size cache (no prefix recompute).
        """
        y, state = self.decoder.decode_step(self.token_embedder(token_ids[:, None]), state)
        return self._logits(y)[:, 0], state

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
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, dropout_rngs=dropout_rngs)
        return self.decode(
            encoded, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids, decoder_segment_ids,
            dropout_rngs=dropout_rngs,
        )


def param_count(model: nnx.Module) -> int:
    """Total number of parameter elements in `model`."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


gin.external_configurable(T5Config, module="t5x_lite")


@gin.configurable(module="t5x_lite")
class EncoderDecoderModel(BaseModel):
    """The trainer's view of a T5 encoder-decoder: packed EncDec batches, loss on the decoder."""

    feature_converter_cls = seqio.EncDecFeatureConverter

    def __init__(self, config: T5Config = gin.REQUIRED, label_smoothing: float = 0.0, z_loss: float = 0.0):
        super().__init__(label_smoothing=label_smoothing, z_loss=z_loss)
        self.config = config

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dropout_rate(self) -> float:
        return self.config.dropout_rate

    def build_network(self, rngs: nnx.Rngs) -> T5:
        return T5(self.config, rngs=rngs)

    def network_logits(
        self, network: T5, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None
    ) -> jax.Array:
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
        network: T5,
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
        """Decodes [b, max_decode_length] tokens (0 after EOS) from unpacked `encoder_input_tokens`.

        Encodes once, then runs the cached `decode_step` inside one `lax.while_loop`. `method` is
        "greedy", "sample" (needs `rng`; temperature, top_k, top_p) or "beam" (returns the best beam).
        """
        inputs = batch["encoder_input_tokens"]
        batch_size = inputs.shape[0]
        state = network.init_decode_state(network.encode(inputs), inputs, max_decode_length)
        step_fn = network.decode_step
        if method == "greedy":
            return decoding.greedy_decode(step_fn, state, batch_size, max_decode_length, eos_id=eos_id)
        if method == "sample":
            if rng is None:
                raise ValueError("predict_batch(method='sample') needs rng=jax.random.key(...).")
            return decoding.temperature_sample(
                step_fn, state, rng, batch_size, max_decode_length,
                temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
            )
        if method == "beam":
            tokens, _ = decoding.beam_search(
                step_fn, state, batch_size, beam_size, max_decode_length, alpha=alpha, eos_id=eos_id
            )
            return tokens[:, 0]
        raise ValueError(f"predict_batch: unknown method={method!r}; use 'greedy', 'sample' or 'beam'.")

    def score_batch(self, network: T5, batch: Mapping[str, jax.Array]) -> jax.Array:
        """[b] float32 log-likelihood of each row's `decoder_target_tokens`: the sum of the target
        tokens' log-probabilities weighted by `decoder_loss_weights` (teacher-forced, one pass).

        For rank classification, score each option as its own (unpacked) row and take the max.
        """
        logits = self.network_logits(network, batch, None)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        targets = batch[self.targets_key]
        token_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(token_log_probs * batch[self.weights_key].astype(jnp.float32), axis=-1)
