"""The trainer's view of the XLNet-style permutation LM (`networks.xlnet`) over `PermutationLMFeatureConverter`'s
batches (`bundled_permutation_lm`): cross entropy at the predicted positions only (the last ~1/K of each order)."""

from __future__ import annotations

from collections.abc import Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5x_lite.decoding import GREEDY, DecodeConfig
from t5x_lite.models.base import BaseModel
from t5x_lite.networks.gpt import GPTConfig
from t5x_lite.networks.xlnet import XLNet


@gin.configurable(module="t5x_lite")
class PermutationLMModel(BaseModel):
    """Permutation LM: each predicted token's loss from the query stream, which sees only the tokens before it
    in the factorization order (`decoder_factorization_rank`); loss weights mark the predicted positions.
    The network is GPT's (`GPTConfig`) plus a query-stream start vector."""

    # It predicts tokens of a task's own sequences in a random order; there is no text to continue.
    text_to_text = False

    def __init__(self, config: GPTConfig = gin.REQUIRED, label_smoothing: float = 0.0, z_loss: float = 0.0):
        super().__init__(config, label_smoothing=label_smoothing, z_loss=z_loss)

    @property
    def feature_converter_cls(self) -> type:
        from t5x_lite.data import feature_converters

        return feature_converters.PermutationLMFeatureConverter

    def build_network(self, rngs: nnx.Rngs) -> XLNet:
        return XLNet(self.config, rngs=rngs)

    def network_logits(self, network: XLNet, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None) -> jax.Array:
        return network(
            batch["decoder_input_tokens"],
            batch["decoder_factorization_rank"],
            segment_ids=batch.get("decoder_segment_ids"),
            positions=batch.get("decoder_positions"),
            dropout_rngs=dropout_rngs,
        )

    def predict_features(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The tokens, ranks and packing features: the query stream never reads a position's own token, so
        the tokens it predicts may stay in the batch."""
        keys = ("decoder_input_tokens", "decoder_factorization_rank", "decoder_segment_ids", "decoder_positions")
        return {k: batch[k] for k in keys if k in batch}

    def predict_batch(
        self,
        network: XLNet,
        batch: Mapping[str, jax.Array],
        *,
        max_decode_length: int = 0,
        decode: DecodeConfig = GREEDY,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """The most likely token at every position from what its order lets it see (one pass; nothing is decoded)."""
        return jnp.argmax(self.network_logits(network, batch, None), axis=-1).astype(jnp.int32)
