"""The contract between the trainer and a model family: build a network, score a batch, decode.

A trainer model (gin-configurable) wraps a network config: it says which seqio feature converter
shapes its batches, how to build its NNX network, and which batch features feed it. The loss,
scoring and everything else the trainer needs are shared here; families override only what differs.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5x_lite.decoding import GREEDY, DecodeConfig
from t5x_lite.networks.config_checks import max_dropout_rate
from t5x_lite.training import losses


class BaseModel(abc.ABC):
    """A model family: network construction plus the loss over a feature-converted batch."""

    # Whether inputs and targets are text (so `infer` can take a file of raw inputs); BERT's heads
    # predict masked pieces, labels or tags of a task's examples instead.
    text_to_text = True
    targets_key = "decoder_target_tokens"
    weights_key = "decoder_loss_weights"
    # Whether the loss draws random numbers in training even without dropout (ELECTRA samples its
    # generator): the train step then passes `dropout_rngs` whatever the dropout rate.
    trains_with_rng = False

    def __init__(self, config: Any, label_smoothing: float = 0.0, z_loss: float = 0.0):
        self.config = config
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss

    @property
    @abc.abstractmethod
    def feature_converter_cls(self) -> type:
        """The seqio `FeatureConverter` class that shapes this model's batches (imported on use:
        seqio brings TensorFlow, which only the processes that read data need)."""

    @abc.abstractmethod
    def build_network(self, rngs: nnx.Rngs) -> nnx.Module:
        """Creates the network with freshly initialised parameters."""

    @abc.abstractmethod
    def network_logits(
        self, network: nnx.Module, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None
    ) -> jax.Array:
        """Runs the network on a batch and returns float32 logits aligned with the targets."""

    @property
    def vocab_size(self) -> int:
        """The number of rows of the output projection (>= the vocabulary's size)."""
        return self.config.vocab_size

    @property
    def dropout_rate(self) -> float:
        """The largest dropout probability of training (0 disables the dropout RNG)."""
        return max_dropout_rate(self.config)

    def scored_tokens(
        self, network: nnx.Module, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(float32 logits [.., classes], target ids [..], weights [..]) over which the loss and the
        scores are computed: by default the network's logits, `targets_key` and `weights_key`."""
        logits = self.network_logits(network, batch, dropout_rngs)
        return logits, batch[self.targets_key], batch[self.weights_key].astype(jnp.float32)

    def loss_fn(
        self, network: nnx.Module, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean token loss (normalised by the summed weights) and the summed terms."""
        sums = self.loss_sums(*self.scored_tokens(network, batch, dropout_rngs))
        return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0), sums

    def loss_sums(self, logits: jax.Array, targets: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
        """The summed cross-entropy terms (`losses.cross_entropy`) with this model's smoothing and z-loss."""
        return losses.cross_entropy(logits, targets, weights, label_smoothing=self.label_smoothing, z_loss=self.z_loss)

    def sum_metrics(self, sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Metrics beyond loss and accuracy, from the summed terms of `loss_fn` (summed over microbatches
        and evaluation batches first, so they are exact ratios); none by default."""
        return {}

    def score_batch(self, network: nnx.Module, batch: Mapping[str, jax.Array]) -> jax.Array:
        """[b] float32 log-likelihood of each row's targets (teacher-forced, one pass): the targets'
        log-probabilities summed with their weights. For rank classification, score each option as its
        own (unpacked) row and take the max."""
        logits, targets, weights = self.scored_tokens(network, batch)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        token_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(token_log_probs * weights, axis=-1)

    def predict_features(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The features of an unpacked host batch that `predict_batch` may see: inputs, never targets."""
        return {k: v for k, v in batch.items() if k.startswith("encoder_")}

    @abc.abstractmethod
    def predict_batch(
        self,
        network: nnx.Module,
        batch: Mapping[str, jax.Array],
        *,
        max_decode_length: int,
        decode: DecodeConfig = GREEDY,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """Predicted output ids for an unpacked batch: decoded tokens [b, max_decode_length] (0 after
        EOS) by `decode` for generative models, labels or tags for encoder heads. Call it inside
        `jax.jit` with `max_decode_length` and `decode` static (they shape the computation)."""
