"""XLNet-style permutation language model on the decoder-only (GPT) family, in Flax NNX.

The network is GPT (`networks.gpt`: learned absolute positions, pre-layer-norm blocks, tied logits)
run with two-stream attention (`nn.two_stream`) under a factorization order given per position as a
rank. Its parameters are GPT's plus `query_embedding`, the learned vector w that starts every query
stream position (XLNet's g^(0) = w; here w + the position's embedding, since the family's positions
are absolute), so a GPT checkpoint's tensors keep their names and shapes here.

  content stream h^(0) = token embedding + position embedding (as GPT's input)
  query stream   g^(0) = w + position embedding (the position, never the token)

Every block updates both streams with GPT's block parameters; the logits are read from the query
stream: position i's logits are p(x_i | the tokens before i in the order, i's position). With the
identity order (rank = position) the content stream is exactly GPT's causal forward pass and each
query-stream position i predicts x_i from x_<i alone, i.e. left-to-right LM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_lite.networks.gpt import GPTBlock, GPTConfig
from t5x_lite.nn import kernels, layers, stacks, two_stream


class TwoStreamGPTBlock(GPTBlock):
    """GPT's block (same parameters) over both streams [b, 2s, e]: per-token layers on all rows, attention
    with queries from both streams and keys/values from the content stream."""

    def __call__(self, x: jax.Array, bias: jax.Array, dropout_rngs: nnx.Rngs | None) -> jax.Array:
        """[b, 2s, e] (content rows first) -> [b, 2s, e]; `bias` [b, 1, 2s, s] from `two_stream.permutation_masks`."""
        h = two_stream.two_stream_attention(
            self.attention, self.pre_attention_layer_norm(x), bias, dropout_rngs=dropout_rngs
        )
        x = x + self.kernels.dropout(h, self.dropout_rate, dropout_rngs)
        h = self.mlp(self.pre_mlp_layer_norm(x))
        return x + self.kernels.dropout(h, self.dropout_rate, dropout_rngs)


class XLNet(nnx.Module):
    """The permutation-LM network: token ids and factorization ranks in, float32 query-stream logits out.

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
            lambda rngs: TwoStreamGPTBlock(config, rngs=rngs), config.num_layers, config.scan_layers, rngs
        )
        self.final_layer_norm = layers.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=config.dtype)
        query = jax.nn.initializers.normal(stddev=0.02)(rngs.params(), (config.d_model,), jnp.float32)
        self.query_embedding = nnx.Param(query, logical_axes=("embed",))

    def streams(
        self,
        tokens: jax.Array,
        factorization_rank: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        dropout_rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Final-layer-normed (content stream, query stream), each [b, s, e], for [b, s] tokens and ranks.

        Unpacked rows need neither segment ids (token id 0 marks padding) nor positions (0..s-1).
        """
        length = tokens.shape[1]
        positions = jnp.arange(length)[None] if positions is None else positions
        segment_ids = (tokens > 0).astype(jnp.int32) if segment_ids is None else segment_ids
        position = self.position_embedder(positions)
        content = self.token_embedder(tokens) + position
        query = jnp.broadcast_to(self.query_embedding[...].astype(position.dtype) + position, content.shape)
        x = self.kernels.dropout(jnp.concatenate([content, query], axis=1), self.config.dropout_rate, dropout_rngs)
        bias = layers.mask_to_bias(two_stream.permutation_masks(factorization_rank, segment_ids))
        x = stacks.apply_layers(
            self.layers, x, (bias,), dropout_rngs, scan=self.config.scan_layers, remat_policy=self.config.remat_policy
        )
        return two_stream.split_streams(self.final_layer_norm(x))

    def __call__(
        self,
        tokens: jax.Array,
        factorization_rank: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        dropout_rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Query-stream logits [b, s, vocab] (float32): position i's prediction of its own token from the
        tokens ranked before it (see `streams`)."""
        _, query = self.streams(tokens, factorization_rank, segment_ids, positions, dropout_rngs=dropout_rngs)
        return self.token_embedder.attend(query)
