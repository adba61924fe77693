"""The contract between the trainer and a model family: build a network, score a batch.

A family subclass says which seqio feature converter shapes its batches, how to build
its NNX network, and which batch features feed it (`network_logits`). The loss, the
metrics and everything the trainer needs are shared here.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

import jax
import numpy as np
import seqio
from flax import nnx

from t5x_lite.training import losses


class BaseModel(abc.ABC):
    """A model family: network construction plus the loss over a feature-converted batch."""

    feature_converter_cls: type[seqio.FeatureConverter]
    # Whether inputs and targets are text (so `infer` can take a file of raw inputs); BERT's heads
    # predict masked pieces, labels or tags of a task's examples instead.
    text_to_text = True
    targets_key = "decoder_target_tokens"
    weights_key = "decoder_loss_weights"

    def __init__(self, label_smoothing: float = 0.0, z_loss: float = 0.0):
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss

    @abc.abstractmethod
    def build_network(self, rngs: nnx.Rngs) -> nnx.Module:
        """Creates the network with freshly initialised parameters."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """The number of rows of the output projection (>= the vocabulary's size)."""

    @property
    @abc.abstractmethod
    def dropout_rate(self) -> float:
        """Dropout probability used in training (0 disables the dropout RNG)."""

    @abc.abstractmethod
    def network_logits(
        self, network: nnx.Module, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None
    ) -> jax.Array:
        """Runs the network on a batch and returns float32 logits aligned with the targets."""

    def loss_fn(
        self, network: nnx.Module, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean token loss (normalised by the number of target tokens) and the summed terms."""
        logits = self.network_logits(network, batch, dropout_rngs)
        sums = losses.cross_entropy(
            logits,
            batch[self.targets_key],
            batch[self.weights_key],
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
        )
        return sums["loss_sum"] / jax.numpy.maximum(sums["weight_sum"], 1.0), sums

    def predict_features(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The features of an unpacked host batch that `predict_batch` may see: inputs, never targets."""
        return {k: v for k, v in batch.items() if k.startswith("encoder_")}

    def predict_batch(
        self,
        network: nnx.Module,
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
        """Decodes [b, max_decode_length] output tokens (0 after EOS) for an unpacked batch.

        `method`: "greedy", "sample" (needs `rng`; `temperature` 0 = argmax, `top_k` 0 = off,
        `top_p` 1 = off) or "beam" (`beam_size`, length penalty `alpha`; returns the best beam).
        Call it inside `jax.jit` with the keyword arguments fixed (they shape the computation).
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement predict_batch yet.")

    def score_batch(self, network: nnx.Module, batch: Mapping[str, jax.Array]) -> jax.Array:
        """[b] float32 per-row log-likelihood of the targets, weighted by the loss weights."""
        raise NotImplementedError(f"{type(self).__name__} does not implement score_batch yet.")
