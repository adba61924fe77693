"""The trainer's view of an encoder (BERT, or DeBERTa when configured by a `DebertaConfig`): masked LM (+ next-sentence prediction), sequence
classification and token tagging, each over its own feature converter."""

from __future__ import annotations

from collections.abc import Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5x_lite.decoding import GREEDY, DecodeConfig
from t5x_lite.models.base import BaseModel
from t5x_lite.networks.bert import Bert, BertConfig
from t5x_lite.networks.config_checks import ConfigError
from t5x_lite.networks.deberta import Deberta, DebertaConfig
from t5x_lite.networks.deberta_rtd import FINETUNE_DELTAS
from t5x_lite.training import losses

gin.external_configurable(BertConfig, module="t5x_lite")
gin.external_configurable(DebertaConfig, module="t5x_lite")


def network_class(config: BertConfig | DebertaConfig) -> type[Bert | Deberta]:
    """The encoder network a config builds: `Deberta` for a `DebertaConfig`, else `Bert`."""
    return Deberta if isinstance(config, DebertaConfig) else Bert


def _row_weights(tokens: jax.Array) -> jax.Array:
    """[b] float32: 1 for rows holding an example (the evaluator pads batches with all-zero rows)."""
    return (tokens[:, 0] != 0).astype(jnp.float32)


def _sequence_features(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array | None]:
    return {
        "segment_ids": batch.get("encoder_segment_ids"),
        "positions": batch.get("encoder_positions"),
        "token_type_ids": batch.get("encoder_token_type_ids"),
    }


class _EncoderModel(BaseModel):
    """What the three BERT models share: the config, the network's head, the input features."""

    head = "mlm"
    text_to_text = False
    # Parameter prefixes a fine-tuning run may start without (fresh heads on a pre-trained encoder).
    fresh_param_prefixes: tuple[str, ...] = ()
    converter_name: str

    def __init__(self, config: BertConfig = gin.REQUIRED, label_smoothing: float = 0.0, z_loss: float = 0.0):
        super().__init__(config, label_smoothing=label_smoothing, z_loss=z_loss)

    @property
    def feature_converter_cls(self) -> type:
        from t5x_lite.data import feature_converters

        return getattr(feature_converters, self.converter_name)

    def build_network(self, rngs: nnx.Rngs) -> Bert:
        return network_class(self.config)(self.config, self.head, rngs=rngs)

    @property
    def param_deltas(self) -> dict[str, str]:
        """Checkpoint deltas added onto params when this model starts from a checkpoint that holds them
        (`checkpoints.restore_params`): a DeBERTa reads a DeBERTa-v3 RTD discriminator's word table as E_G + E_delta."""
        return FINETUNE_DELTAS if isinstance(self.config, DebertaConfig) else {}

    def network_logits(self, network: Bert, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None) -> jax.Array:
        return network(batch["encoder_input_tokens"], **_sequence_features(batch), dropout_rngs=dropout_rngs)

    def predict_batch(
        self,
        network: Bert,
        batch: Mapping[str, jax.Array],
        *,
        max_decode_length: int = 0,
        decode: DecodeConfig = GREEDY,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """The head's most likely class at every position it predicts (one pass, no targets; nothing is decoded)."""
        logits = self.network_logits(network, batch, None)
        return self.prediction_ids(jnp.argmax(logits, axis=-1).astype(jnp.int32))

    def prediction_ids(self, best_columns: jax.Array) -> jax.Array:
        """The ids a prediction reports for the argmax logit columns (MLM: token ids at every position)."""
        return best_columns


@gin.configurable(module="t5x_lite")
class EncoderOnlyMLMModel(_EncoderModel):
    """BERT masked-LM pre-training: cross entropy on the chosen positions only (`encoder_loss_weights`);
    with `next_sentence_labels` in the batch (unpacked NSP data) the mean NSP loss is added, as BERT does.

    Features: `encoder_input_tokens`, `encoder_target_tokens` (the original ids at chosen positions),
    `encoder_loss_weights`, and optionally `encoder_segment_ids`/`encoder_positions` (packing),
    `encoder_token_type_ids` and `next_sentence_labels` ([b] or [b, 1]; as `t5x_lite.data` writes
    them, 1: B follows A, 0: B is random, i.e. NSP head column `1 - label`). Predictions are the most
    likely original token at every position (the masks filled in).

    `max_prediction_fraction`: the training loss computes vocabulary logits only at the chosen
    positions (as BERT's `max_predictions_per_seq`), gathered into a fixed budget of this fraction of
    the batch's positions; a batch with more chosen positions takes the all-positions path instead,
    so the loss is exact either way. 1.0 always computes every position's logits.
    """

    targets_key = "encoder_target_tokens"
    weights_key = "encoder_loss_weights"
    head = "mlm"
    # DeBERTa's enhanced mask decoder table starts fresh on a checkpoint without it (e.g. `hf:`, which has none).
    fresh_param_prefixes = ("emd_positions",)
    converter_name = "MaskedLMFeatureConverter"

    def __init__(
        self,
        config: BertConfig = gin.REQUIRED,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        max_prediction_fraction: float = 0.25,
    ):
        super().__init__(config, label_smoothing=label_smoothing, z_loss=z_loss)
        if not 0.0 < max_prediction_fraction <= 1.0:
            raise ConfigError(f"max_prediction_fraction={max_prediction_fraction} must be in (0, 1].")
        self.max_prediction_fraction = max_prediction_fraction

    def loss_fn(
        self, network: Bert, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean MLM loss per chosen token (+ mean NSP loss per row); accuracy is the MLM accuracy.

        The trainer divides `loss_sum` by `weight_sum` (the number of chosen tokens), so the NSP term
        enters `loss_sum` as its per-row mean times that count: after the division the two means add up.
        """
        tokens = batch["encoder_input_tokens"]
        # DeBERTa's MLM head reads `mlm_states` (its enhanced mask decoder, when configured).
        states = network.mlm_states if isinstance(network, Deberta) else network.encode
        hidden = states(tokens, **_sequence_features(batch), dropout_rngs=dropout_rngs)
        sums = self._mlm_sums(network, hidden, batch[self.targets_key], batch[self.weights_key])
        if "next_sentence_labels" in batch:
            columns = 1 - batch["next_sentence_labels"].reshape(tokens.shape[0], -1)[:, :1]
            nsp = losses.cross_entropy(network.nsp_logits(hidden)[:, None], columns, _row_weights(tokens)[:, None])
            nsp_mean = nsp["loss_sum"] / jnp.maximum(nsp["weight_sum"], 1.0)
            sums = dict(sums, loss_sum=sums["loss_sum"] + nsp_mean * sums["weight_sum"])
        return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0), sums

    def _mlm_sums(self, network: Bert, hidden: jax.Array, targets: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
        """Summed MLM loss terms, from logits at the chosen positions only when they fit the budget."""
        positions = targets.size
        budget = min(positions, max(1, int(np.ceil(self.max_prediction_fraction * positions))))
        if budget == positions:
            return self.loss_sums(network.mlm_logits(hidden), targets, weights)
        # The positions become the rows ([positions, 1, d]): the logits' batch axis stays the one the mesh splits.
        flat_hidden = hidden.reshape(positions, 1, hidden.shape[-1])
        flat_targets, flat_weights = targets.reshape(positions, 1), weights.reshape(positions, 1)
        chosen = flat_weights[:, 0] != 0

        def gathered():
            # top_k of the 0/1 mask: every chosen position (the budget holds them all), then unchosen
            # ones of weight 0, which add nothing.
            index = jax.lax.top_k(chosen.astype(jnp.float32), budget)[1]
            return self.loss_sums(network.mlm_logits(flat_hidden[index]), flat_targets[index], flat_weights[index])

        def everywhere():
            return self.loss_sums(network.mlm_logits(flat_hidden), flat_targets, flat_weights)

        return jax.lax.cond(jnp.sum(chosen) <= budget, gathered, everywhere)


@gin.configurable(module="t5x_lite")
class EncoderClassificationModel(_EncoderModel):
    """Sequence classification from the pooled [CLS]: single sentences `[CLS] A [SEP]` or pairs
    `[CLS] A [SEP] B [SEP]` (token type 1 on B). Features from `ClassificationFeatureConverter`:
    `encoder_input_tokens`, `encoder_token_type_ids` and `labels` ([b, 1] class ids).

    The loss is the mean cross entropy per example (`accuracy`: the fraction of rows classified
    right); `predict_batch` gives [b, 1] class ids, `score_batch` the log-probability of the gold label.
    Fine-tuning from a pre-trained (MLM) checkpoint starts the pooler and classifier afresh when the
    checkpoint lacks them (`fresh_param_prefixes`).
    """

    targets_key = "labels"
    head = "classification"
    fresh_param_prefixes = ("pooler", "classifier")
    converter_name = "ClassificationFeatureConverter"

    def scored_tokens(
        self, network: Bert, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One scored position per row: the [CLS] logits [b, 1, labels], the label and the row's weight."""
        logits = self.network_logits(network, batch, dropout_rngs)
        labels = batch[self.targets_key].reshape(logits.shape[0], -1)[:, :1]
        return logits[:, None], labels, _row_weights(batch["encoder_input_tokens"])[:, None]

    def prediction_ids(self, best_columns: jax.Array) -> jax.Array:
        """[b, 1] class ids."""
        return best_columns[:, None]


@gin.configurable(module="t5x_lite")
class EncoderTaggingModel(_EncoderModel):
    """Token tagging (NER-like): `num_labels` tags, given in the data as ids 1..num_labels; tag id 0
    marks positions without a label (padding, [CLS], [SEP], word pieces after a word's first), which
    the loss ignores and predictions never produce (logit column c scores tag id c + 1). Features from
    `TaggingFeatureConverter`: `encoder_input_tokens`, `encoder_target_tokens` (tag ids),
    `encoder_loss_weights`, and `encoder_segment_ids`/`encoder_positions` when packed.
    """

    targets_key = "encoder_target_tokens"
    weights_key = "encoder_loss_weights"
    head = "tagging"
    fresh_param_prefixes = ("tagger",)
    converter_name = "TaggingFeatureConverter"

    def scored_tokens(
        self, network: Bert, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Per-token logits, tag ids as logit columns (id - 1), weight 0 wherever the tag id is 0."""
        logits = self.network_logits(network, batch, dropout_rngs)
        tags = batch[self.targets_key]
        weights = batch[self.weights_key].astype(jnp.float32) * (tags > 0)
        return logits, jnp.maximum(tags - 1, 0), weights

    def prediction_ids(self, best_columns: jax.Array) -> jax.Array:
        """Tag ids 1..num_labels."""
        return best_columns + 1
