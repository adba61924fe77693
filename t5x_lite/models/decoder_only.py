"""GPT-2-style decoder-only transformer in Flax NNX: causal language model and prefix-LM.

Learned absolute positions, pre-layer-norm blocks with biases, GELU (GPT-2's tanh form), a final
layer norm and logits tied to the token embedding. Attention is causal; in prefix-LM mode the
positions seqio's PrefixLM converter marks with `decoder_causal_attention` (the inputs plus the
position that reads the last input) also attend to each other bidirectionally. Packed rows carry
segment ids (0 = padding) and in-segment positions.

The parameters map one to one onto Hugging Face's `GPT2LMHeadModel` (`t5x_lite.hf.gpt2`), so its
checkpoints import directly. Decoding prefills the prompt in one pass and
then runs the cached `decode_step` inside `t5x_lite.decoding`'s while loops. For large models,
`GPTConfig.scan_layers` and `remat_policy` work as T5's (see `t5x_lite.models.stacks`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio
from flax import nnx

from t5x_lite import decoding
from t5x_lite.models import layers, stacks
from t5x_lite.models.base import BaseModel

ACTIVATIONS = ("gelu_tanh", "gelu", "relu")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of a GPT-2-style network; defaults are GPT-2 small (124M)."""

    vocab_size: int = 50257
    d_model: int = 768
    num_heads: int = 12
    head_dim: int = 64
    d_ff: int = 3072
    num_layers: int = 12
    max_position_embeddings: int = 1024
    dropout_rate: float = 0.0  # embeddings, attention probabilities and residual branches (GPT-2's *_pdrop)
    activation: str = "gelu_tanh"  # GPT-2's "gelu_new"; "gelu" (erf) or "relu" also work
    layer_norm_epsilon: float = 1e-5
    dtype: str = "float32"  # activation dtype name, e.g. "bfloat16"
    remat_policy: str = "none"  # per-layer jax.checkpoint in training: "none", "full" or "dots" (stacks.REMAT_POLICIES)
    scan_layers: bool = False  # stacked layer params (leading "layers" axis), trained with lax.scan

    def __post_init__(self):
        stacks.check_remat_policy("GPTConfig", self.remat_policy)
        for name in ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_layers", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)} must be a positive integer.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation={self.activation!r} is not supported; use one of {ACTIVATIONS}.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"GPTConfig.dropout_rate={self.dropout_rate} must be in [0, 1).")
        try:
            jnp.dtype(self.dtype)
        except TypeError as e:
            raise ValueError(
                f"GPTConfig.dtype={self.dtype!r} is not a dtype name; use e.g. 'float32' or 'bfloat16'."
            ) from e


def decoder_mask(
    length: int, segment_ids: jax.Array | None = None, causal_attention: jax.Array | None = None
) -> jax.Array:
    """[b or 1, 1, q, k] bool self-attention mask: causal, plus bidirectional among positions whose
    `causal_attention` is 1 (prefix-LM inputs), within one packed segment (segment id 0 = padding)."""
    mask = layers.causal_mask(length)
    if causal_attention is not None:
        prefix = causal_attention > 0
        mask = mask | (prefix[:, None, :, None] & prefix[:, None, None, :])
    if segment_ids is not None:
        mask = mask & layers.segment_mask(segment_ids, segment_ids) & layers.padding_mask(segment_ids)
    return mask


class GPTBlock(nnx.Module):
    """Pre-norm self-attention then pre-norm MLP, each added to the residual stream after dropout."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        norm = {"eps": config.layer_norm_epsilon, "dtype": config.dtype}
        self.pre_attention_layer_norm = layers.LayerNorm(config.d_model, **norm)
        self.attention = layers.MultiHeadAttention(
            config.d_model, config.num_heads, config.head_dim, dropout_rate=config.dropout_rate,
            scale_logits=True, use_bias=True, dtype=config.dtype, rngs=rngs,
        )
        self.pre_mlp_layer_norm = layers.LayerNorm(config.d_model, **norm)
        # GPT-2 drops out only the MLP's output (below), not its hidden activations.
        self.mlp = layers.MlpBlock(
            config.d_model, config.d_ff, activation=config.activation, use_bias=True, dtype=config.dtype, rngs=rngs
        )
        self.dropout_rate = config.dropout_rate

    def __call__(self, x: jax.Array, bias: jax.Array, dropout_rngs: nnx.Rngs | None) -> jax.Array:
        """[b, s, e] -> [b, s, e] (training: no cache)."""
        return self.with_keys_values(x, bias, dropout_rngs)[0]

    def with_keys_values(
        self, x: jax.Array, bias: jax.Array, dropout_rngs: nnx.Rngs | None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """[b, s, e] -> (output [b, s, e], this layer's keys and values [b, s, h, d] for a cache)."""
        h = self.pre_attention_layer_norm(x)
        att = self.attention
        k, v = att.key(h), att.value(h)
        h = att.attend(att.project_query(h), k, v, bias, dropout_rngs=dropout_rngs)
        x = x + layers.dropout(h, self.dropout_rate, dropout_rngs)
        h = self.mlp(self.pre_mlp_layer_norm(x))
        return x + layers.dropout(h, self.dropout_rate, dropout_rngs), k, v

    def decode_step(
        self, x: jax.Array, key: jax.Array, value: jax.Array, index: jax.Array, bias: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One position [b, 1, e] with this layer's [b, h, len, d] cache; returns (output, keys, values)."""
        h, key, value = self.attention.decode_step(self.pre_attention_layer_norm(x), key, value, index, bias)
        x = x + h
        return x + self.mlp(self.pre_mlp_layer_norm(x)), key, value


class DecodeState(NamedTuple):
    """Everything `GPT.decode_step` needs besides the parameters (batch-leading leaves; see decoding.py).

    Prompts sit right-aligned (left-padded) in the cache so that every row fills the same slot per step.
    keys/values: per layer, [b, heads, cache_length, head_dim] buffers in the activation dtype.
    first_slot: [b] int32, the slot of each row's first prompt token (position 0 of the row).
    forced_token: [b] int32, the prompt's last token, fed at the first step in place of the loop's
        start id (its logits predict the first new token); -1 afterwards.
    index: int32 scalar, the slot the next `decode_step` call fills.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    first_slot: jax.Array
    forced_token: jax.Array
    index: jax.Array


class GPT(nnx.Module):
    """The decoder-only network: token ids in, float32 next-token logits out.

    Dropout is applied iff `dropout_rngs` is given (e.g. `nnx.Rngs(dropout=key)`) and the rate is > 0.
    """

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.token_embedder = layers.Embed(
            config.vocab_size, config.d_model, stddev=0.02, dtype=config.dtype, rngs=rngs
        )
        self.position_embedder = layers.PositionEmbed(
            config.max_position_embeddings, config.d_model, stddev=0.01, dtype=config.dtype, rngs=rngs
        )
        self.layers = stacks.make_layers(
            lambda rngs: GPTBlock(config, rngs=rngs), config.num_layers, config.scan_layers, rngs
        )
        self.final_layer_norm = layers.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=config.dtype)

    def _embed(self, tokens: jax.Array, positions: jax.Array, dropout_rngs: nnx.Rngs | None) -> jax.Array:
        x = self.token_embedder(tokens) + self.position_embedder(positions)
        return layers.dropout(x, self.config.dropout_rate, dropout_rngs)

    def __call__(
        self,
        decoder_input_tokens: jax.Array,
        decoder_segment_ids: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        decoder_causal_attention: jax.Array | None = None,
        *,
        dropout_rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Teacher-forced logits [b, s, vocab] (float32) for [b, s] input tokens.

        Unpacked rows need neither segment ids nor positions (padding sits after the real tokens, where
        causal attention never reaches it); `decoder_causal_attention` turns on prefix-LM attention.
        """
        length = decoder_input_tokens.shape[1]
        positions = jnp.arange(length)[None] if decoder_positions is None else decoder_positions
        bias = layers.mask_to_bias(decoder_mask(length, decoder_segment_ids, decoder_causal_attention))
        x = self._embed(decoder_input_tokens, positions, dropout_rngs)
        x = stacks.apply_layers(
            self.layers, x, (bias,), dropout_rngs, scan=self.config.scan_layers, remat_policy=self.config.remat_policy
        )
        return self.token_embedder.attend(self.final_layer_norm(x))

    def prefill(
        self, prompts: jax.Array, prompt_lengths: jax.Array, max_decode_length: int, *, bidirectional: bool = False
    ) -> DecodeState:
        """Runs the prompts once and returns the cache for generating `max_decode_length` tokens after them.

        `prompts` [b, p] hold each row's prompt in its first `prompt_lengths` [b] positions (a row of
        seqio's decoder inputs starts with the BOS id 0, so every prompt has at least that token; a length
        below 1 counts as 1). With `bidirectional`, prompt tokens attend to each other (prefix-LM).
        A row whose prompt plus continuation outruns `max_position_embeddings` reuses the last position.
        """
        p = prompts.shape[1]
        lengths = jnp.clip(prompt_lengths.astype(jnp.int32), 1, p)
        first_slot = p - lengths
        source = jnp.arange(p)[None] - first_slot[:, None]  # [b, p] prompt index held by each slot (< 0: empty)
        tokens = jnp.where(source >= 0, jnp.take_along_axis(prompts, jnp.maximum(source, 0), axis=1), 0)
        mask = (source >= 0)[:, None, None, :]
        if not bidirectional:
            mask = mask & layers.causal_mask(p)
        x, bias = self._embed(tokens, jnp.maximum(source, 0), None), layers.mask_to_bias(mask)
        keys, values = [], []
        for layer in stacks.layer_views(self.layers, self.config.scan_layers):
            x, key, value = layer.with_keys_values(x, bias, None)
            keys.append(key)
            values.append(value)
        cache_length = p + max_decode_length - 1  # the last generated token is never fed back

        def cache(x: jax.Array) -> jax.Array:
            return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, cache_length - p), (0, 0)))

        return DecodeState(
            keys=tuple(cache(k) for k in keys),
            values=tuple(cache(v) for v in values),
            first_slot=first_slot,
            forced_token=tokens[:, -1],
            index=jnp.asarray(p - 1, jnp.int32),
        )

    def decode_step(self, state: DecodeState, token_ids: jax.Array) -> tuple[jax.Array, DecodeState]:
        """Feeds one token per row ([b] ids, slot `state.index`) and returns float32 next-token logits
        [b, vocab] and the advanced state: one position through every layer plus attention over the
        fixed-size cache. The first call re-feeds the prompt's last token (`state.forced_token`), whose
        cache entries it rewrites with the same values, and so yields the first new token's logits."""
        tokens = jnp.where(state.forced_token >= 0, state.forced_token, token_ids)
        index = state.index
        positions = jnp.minimum(index - state.first_slot, self.config.max_position_embeddings - 1)
        x = self.token_embedder(tokens[:, None]) + self.position_embedder(positions[:, None])
        slots = jnp.arange(state.keys[0].shape[2])
        visible = (slots[None] >= state.first_slot[:, None]) & (slots[None] <= index)
        bias = layers.mask_to_bias(visible)[:, None, None, :]
        keys, values = [], []
        for layer, key, value in zip(stacks.layer_views(self.layers, self.config.scan_layers), state.keys, state.values):
            x, key, value = layer.decode_step(x, key, value, index, bias)
            keys.append(key)
            values.append(value)
        logits = self.token_embedder.attend(self.final_layer_norm(x))[:, 0]
        new_state = DecodeState(
            keys=tuple(keys), values=tuple(values), first_slot=state.first_slot,
            forced_token=jnp.full_like(state.forced_token, -1), index=index + 1,
        )
        return logits, new_state


gin.external_configurable(GPTConfig, module="t5x_lite")


class _DecoderOnlyBase(BaseModel):
    """The trainer's view of a GPT network over seqio's decoder features (see the two subclasses)."""

    feature_converter_cls = seqio.DecoderFeatureConverter
    bidirectional_inputs: bool

    def __init__(self, config: GPTConfig, label_smoothing: float = 0.0, z_loss: float = 0.0):
        super().__init__(label_smoothing=label_smoothing, z_loss=z_loss)
        self.config = config

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dropout_rate(self) -> float:
        return self.config.dropout_rate

    def build_network(self, rngs: nnx.Rngs) -> GPT:
        return GPT(self.config, rngs=rngs)

    def network_logits(self, network: GPT, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None) -> jax.Array:
        return network(
            batch["decoder_input_tokens"],
            decoder_segment_ids=batch.get("decoder_segment_ids"),
            decoder_positions=batch.get("decoder_positions"),
            decoder_causal_attention=batch.get("decoder_causal_attention") if self.bidirectional_inputs else None,
            dropout_rngs=dropout_rngs,
        )

    def predict_features(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The prompt of each row: the decoder inputs marked by `decoder_causal_attention` (BOS + inputs),
        with the targets zeroed; a targets-only batch (no inputs) gets the BOS alone."""
        causal = batch.get("decoder_causal_attention")
        if causal is None:
            rows = len(batch["decoder_input_tokens"])
            return {"decoder_input_tokens": np.zeros((rows, 1), np.int32),
                    "decoder_causal_attention": np.ones((rows, 1), np.int32)}
        return {"decoder_input_tokens": np.where(causal > 0, batch["decoder_input_tokens"], 0),
                "decoder_causal_attention": causal}

    def predict_batch(
        self,
        network: GPT,
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
        """Decodes the continuation [b, max_decode_length] (0 after EOS) of each row's prompt: the
        `decoder_input_tokens` where `decoder_causal_attention` is 1 (see `predict_features`).

        Prefills the prompts in one pass, then runs the cached `decode_step` in one `lax.while_loop`.
        """
        prompts = batch["decoder_input_tokens"]
        lengths = jnp.sum(batch["decoder_causal_attention"] > 0, axis=-1)
        state = network.prefill(prompts, lengths, max_decode_length, bidirectional=self.bidirectional_inputs)
        return decoding.decode(
            network.decode_step, state, prompts.shape[0], max_decode_length, method=method, rng=rng,
            beam_size=beam_size, alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
        )

    def score_batch(self, network: GPT, batch: Mapping[str, jax.Array]) -> jax.Array:
        """[b] float32 log-likelihood of each row's targets: target-token log-probabilities summed with
        `decoder_loss_weights` (with the PrefixLM converter's default, the targets part only)."""
        log_probs = jax.nn.log_softmax(self.network_logits(network, batch, None), axis=-1)
        token_log_probs = jnp.take_along_axis(log_probs, batch[self.targets_key][..., None], axis=-1)[..., 0]
        return jnp.sum(token_log_probs * batch[self.weights_key].astype(jnp.float32), axis=-1)


@gin.configurable(module="t5x_lite")
class DecoderOnlyModel(_DecoderOnlyBase):
    """Causal LM (GPT): next-token loss over packed text (`bundled_lm`); on an inputs/targets task the
    seqio converter concatenates the two with loss on the targets only, and attention stays causal."""

    bidirectional_inputs = False

    def __init__(self, config: GPTConfig = gin.REQUIRED, label_smoothing: float = 0.0, z_loss: float = 0.0):
        super().__init__(config, label_smoothing=label_smoothing, z_loss=z_loss)


@gin.configurable(module="t5x_lite")
class PrefixLMModel(_DecoderOnlyBase):
    """Prefix-LM: the same network and parameters, with bidirectional attention over the inputs part
    (`bundled_prefix_lm`, or fine-tuning a GPT on a text-to-text task with loss on the targets only)."""

    bidirectional_inputs = True

    def __init__(self, config: GPTConfig = gin.REQUIRED, label_smoothing: float = 0.0, z_loss: float = 0.0):
        super().__init__(config, label_smoothing=label_smoothing, z_loss=z_loss)
