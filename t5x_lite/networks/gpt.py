"""GPT-2-style decoder-only transformer in Flax NNX: causal language model and prefix-LM.

Learned absolute positions, pre-layer-norm blocks with biases, GELU (GPT-2's tanh form), a final
layer norm and logits tied to the token embedding. Attention is causal; in prefix-LM mode the
positions seqio's PrefixLM converter marks with `decoder_causal_attention` (the inputs plus the
position that reads the last input) also attend to each other bidirectionally. Packed rows carry
segment ids (0 = padding) and in-segment positions.

The parameters map one to one onto Hugging Face's `GPT2LMHeadModel` (`t5x_lite.hf.gpt2`), so its
checkpoints import directly. Decoding prefills the prompt in one pass and then runs the cached
`decode_step` inside `t5x_lite.decoding`'s while loops. For large models, `GPTConfig.scan_layers`
and `remat_policy` work as T5's (see `t5x_lite.nn.stacks`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_lite.networks.config_checks import check_config
from t5x_lite.nn import attention, kernels, layers, stacks
from t5x_lite.nn.attention import DecodeState, KVCache, StackCache

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
    scan_layers: bool = False  # stacked layer params (leading "layers" axis), applied with lax.scan
    kernels: str = "auto"  # KERNELS: "auto" (by backend), "xla" or "cpu_tuned" (see nn/kernels.py)

    def __post_init__(self):
        positive = ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_layers", "max_position_embeddings")
        check_config(self, positive, {"activation": ACTIVATIONS})


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
        self.kernels = kernels.resolve(config.kernels)
        norm = {"eps": config.layer_norm_epsilon, "dtype": config.dtype}
        self.pre_attention_layer_norm = layers.LayerNorm(config.d_model, **norm)
        self.attention = attention.MultiHeadAttention(
            config.d_model, config.num_heads, config.head_dim, kernels=self.kernels, dropout_rate=config.dropout_rate,
            scale_logits=True, use_bias=True, dtype=config.dtype, rngs=rngs,
        )
        self.pre_mlp_layer_norm = layers.LayerNorm(config.d_model, **norm)
        # GPT-2 drops out only the MLP's output (below), not its hidden activations.
        self.mlp = layers.MlpBlock(
            config.d_model, config.d_ff, kernels=self.kernels, activation=config.activation, use_bias=True,
            dtype=config.dtype, rngs=rngs,
        )
        self.dropout_rate = config.dropout_rate

    def __call__(self, x: jax.Array, bias: jax.Array, dropout_rngs: nnx.Rngs | None) -> jax.Array:
        """[b, s, e] -> [b, s, e] (training: no cache)."""
        return self.with_keys_values(x, bias, dropout_rngs)[0]

    def with_keys_values(
        self, x: jax.Array, bias: jax.Array, dropout_rngs: nnx.Rngs | None
    ) -> tuple[jax.Array, KVCache]:
        """[b, s, e] -> (output [b, s, e], this layer's keys and values in the cache layout [b, h, s, d])."""
        h = self.pre_attention_layer_norm(x)
        att = self.attention
        k, v = att.project_key_value(h)
        h = att.attend(att.project_query(h), k, v, bias, dropout_rngs=dropout_rngs)
        x = x + self.kernels.dropout(h, self.dropout_rate, dropout_rngs)
        h = self.mlp(self.pre_mlp_layer_norm(x))
        return x + self.kernels.dropout(h, self.dropout_rate, dropout_rngs), KVCache(
            jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        )

    def decode_step(
        self, x: jax.Array, cache: StackCache, layer: int | jax.Array, slot: jax.Array, bias: jax.Array
    ) -> tuple[jax.Array, StackCache]:
        """One position [b, 1, e] as layer `layer` of the stack's `cache`; returns (output, updated cache)."""
        h, cache = self.attention.decode_step(self.pre_attention_layer_norm(x), cache, layer, slot, bias)
        x = x + h
        return x + self.mlp(self.pre_mlp_layer_norm(x)), cache


class GPT(nnx.Module):
    """The decoder-only network: token ids in, float32 next-token logits out.

    Dropout is applied iff `dropout_rngs` is given (e.g. `nnx.Rngs(dropout=key)`) and the rate is > 0.
    """

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.kernels = kernels.resolve(config.kernels)
        self.token_embedder = layers.Embed(
            config.vocab_size, config.d_model, kernels=self.kernels, stddev=0.02, dtype=config.dtype, rngs=rngs
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
        return self.kernels.dropout(x, self.config.dropout_rate, dropout_rngs)

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
        below 1 counts as 1). Prompts sit right-aligned (left-padded) in the cache, so every row fills the
        same slot per step. With `bidirectional`, prompt tokens attend to each other (prefix-LM). A row
        whose prompt plus continuation outruns `max_position_embeddings` reuses the last position.
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
        _, cache = stacks.each_layer(
            self.layers, lambda layer, x, i: layer.with_keys_values(x, bias, None), x, scan=self.config.scan_layers
        )
        free_slots = max_decode_length - 1  # after the prompt; the last generated token is never fed back
        return DecodeState(
            cache=jax.tree.map(lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, free_slots), (0, 0)]), cache),
            cross=None,
            cross_mask=None,
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
        positions = jnp.minimum(state.index - state.first_slot, self.config.max_position_embeddings - 1)
        x = self.token_embedder(tokens[:, None]) + self.position_embedder(positions[:, None])
        bias = state.self_attention_bias()

        def step(layer: GPTBlock, carry, i):
            x, cache = carry
            return layer.decode_step(x, cache, i, state.index, bias), None

        (x, cache), _ = stacks.each_layer(self.layers, step, (x, state.cache), scan=self.config.scan_layers)
        return self.token_embedder.attend(self.final_layer_norm(x))[:, 0], state.advanced(cache)
