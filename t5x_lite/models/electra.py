"""ELECTRA replaced-token detection: a small MLM generator fills the masks, a discriminator spots its fills.

The trainer adapter of `t5x_lite.networks.electra`. It reads the MLM tasks' batches
(`MaskedLMFeatureConverter`: 15% of tokens chosen, the original id at each in `encoder_target_tokens`):

  1. the generator predicts the original at each chosen position (MLM loss, mean per chosen token);
  2. a sample from its softmax (the step's RNG; no gradient: the ids are integers and the logits are
     stopped) replaces each chosen token;
  3. the discriminator labels every real token of that sequence "replaced" or "original" (sigmoid
     loss, mean per token). A sample equal to the original counts as original.

loss = generator_weight x MLM loss + discriminator_weight x discriminator loss (ELECTRA: 1 and 50).
The trainer divides `loss_sum` by `weight_sum` (the chosen tokens), so the discriminator's mean enters
`loss_sum` times that count (as BERT's NSP term). Metrics besides loss and `accuracy` (the generator's
MLM accuracy): `generator_loss`, `discriminator_loss`, `discriminator_accuracy`, `replaced_rate` (the
fraction of real tokens the generator changed) and `replaced_recall` (of those, the fraction the
discriminator found). Fine-tune the discriminator with `EncoderClassificationModel` /
`EncoderTaggingModel` (its parameters are named as BERT's) or `ElectraClassificationModel`.

The loss runs over any `ReplacedTokenNetwork`: ELECTRA's BERT bodies (`ElectraModel`) and DeBERTa-v3's
(`DebertaRtdModel`, `t5x_lite.networks.deberta_rtd`: gradient-disentangled embedding sharing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5x_lite.decoding import GREEDY, DecodeConfig
from t5x_lite.models.encoder import EncoderClassificationModel, EncoderOnlyMLMModel, EncoderTaggingModel
from t5x_lite.networks.config_checks import ConfigError
from t5x_lite.networks.deberta_rtd import DebertaRtd, DebertaRtdConfig
from t5x_lite.networks.electra import Electra, ElectraConfig

gin.external_configurable(ElectraConfig, module="t5x_lite")
gin.external_configurable(DebertaRtdConfig, module="t5x_lite")

# The fixed sampling key of evaluation (no step RNG there), so validation losses compare across steps.
EVAL_SAMPLING_SEED = 0


def _features(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array | None]:
    return {
        "segment_ids": batch.get("encoder_segment_ids"),
        "positions": batch.get("encoder_positions"),
        "token_type_ids": batch.get("encoder_token_type_ids"),
    }


def real_tokens(batch: Mapping[str, jax.Array]) -> jax.Array:
    """[b, s] bool: positions holding a token (segment id > 0 when packed, else a nonzero id)."""
    segment_ids = batch.get("encoder_segment_ids")
    return segment_ids > 0 if segment_ids is not None else batch["encoder_input_tokens"] != 0


def replaced_token_labels(inputs: jax.Array, targets: jax.Array, samples: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(the discriminator's inputs, its 0/1 "replaced" labels): samples at the chosen positions
    (`targets > 0`), the inputs elsewhere; a position is replaced iff its token differs from the original."""
    chosen = targets > 0
    original = jnp.where(chosen, targets, inputs)
    corrupted = jnp.where(chosen, samples, inputs)
    return corrupted, (corrupted != original).astype(jnp.int32)


def sigmoid_loss_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
    """Summed binary cross entropy, correct predictions (logit > 0 <=> label 1) and weights."""
    logits, labels, weights = logits.astype(jnp.float32), labels.astype(jnp.float32), weights.astype(jnp.float32)
    loss = jax.nn.softplus(logits) - labels * logits
    correct = ((logits > 0) == (labels > 0)).astype(jnp.float32)
    return {
        "discriminator_loss_sum": jnp.sum(loss * weights),
        "discriminator_correct_sum": jnp.sum(correct * weights),
        "discriminator_weight_sum": jnp.sum(weights),
        "replaced_sum": jnp.sum(labels * weights),
        "replaced_found_sum": jnp.sum(labels * correct * weights),
    }


class ReplacedTokenNetwork(Protocol):
    """What replaced-token detection needs of a network (`Electra`, `DebertaRtd`): the generator's hidden
    states and vocabulary logits, the discriminator's hidden states (`encode`) and "replaced" logits."""

    def generator_hidden(self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
                         token_type_ids: jax.Array | None = None, *, dropout_rngs: nnx.Rngs | None = None) -> jax.Array: ...

    def generator_logits(self, hidden: jax.Array) -> jax.Array: ...

    def encode(self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, *, dropout_rngs: nnx.Rngs | None = None) -> jax.Array: ...

    def discriminator_logits(self, hidden: jax.Array) -> jax.Array: ...

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, *, dropout_rngs: nnx.Rngs | None = None) -> jax.Array: ...


class _ElectraHead:
    """A trainer model over the ELECTRA network of the class's `head` (HF `ElectraFor*` layouts)."""

    head: str

    def build_network(self, rngs: nnx.Rngs) -> Electra:
        return Electra(self.config, self.head, rngs=rngs)


@gin.configurable(module="t5x_lite")
class ElectraModel(_ElectraHead, EncoderOnlyMLMModel):
    """ELECTRA pre-training (see the module docstring). `config`: the discriminator's sizes (a
    `BertConfig`'s fields) with the embedding width and the generator's size (`ElectraConfig`).

    `max_prediction_fraction`: generator logits only at the chosen positions, gathered into a budget of
    this fraction of the batch's positions (as `EncoderOnlyMLMModel`); more chosen positions take the
    all-positions path, so loss and samples are exact either way.
    """

    head = "pretraining"
    trains_with_rng = True

    def __init__(
        self,
        config: ElectraConfig = gin.REQUIRED,
        generator_weight: float = 1.0,
        discriminator_weight: float = 50.0,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        max_prediction_fraction: float = 0.25,
    ):
        super().__init__(config, label_smoothing=label_smoothing, z_loss=z_loss, max_prediction_fraction=max_prediction_fraction)
        if generator_weight < 0 or discriminator_weight < 0:
            raise ConfigError(f"generator_weight={generator_weight} and discriminator_weight={discriminator_weight} must be >= 0.")
        self.generator_weight, self.discriminator_weight = generator_weight, discriminator_weight

    def network_logits(self, network: ReplacedTokenNetwork, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None) -> jax.Array:
        """The discriminator's "replaced" logits [b, s] on the batch's inputs as they are."""
        return network(batch["encoder_input_tokens"], **_features(batch), dropout_rngs=dropout_rngs)

    def loss_fn(
        self, network: ReplacedTokenNetwork, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """generator_weight x mean MLM loss + discriminator_weight x mean replaced-token loss, with the
        summed terms of both (`sum_metrics` turns them into metrics)."""
        inputs, targets = batch["encoder_input_tokens"], batch[self.targets_key]
        weights = batch[self.weights_key]
        key = dropout_rngs.dropout() if dropout_rngs is not None else jax.random.key(EVAL_SAMPLING_SEED)
        hidden = network.generator_hidden(inputs, **_features(batch), dropout_rngs=dropout_rngs)
        mlm, samples = self.generator_pass(network, hidden, targets, weights, key)
        corrupted, labels = replaced_token_labels(inputs, targets, samples)
        disc_hidden = network.encode(corrupted, **_features(batch), dropout_rngs=dropout_rngs)
        disc = sigmoid_loss_sums(network.discriminator_logits(disc_hidden), labels, real_tokens(batch))
        chosen = jnp.maximum(mlm["weight_sum"], 1.0)
        disc_mean = disc["discriminator_loss_sum"] / jnp.maximum(disc["discriminator_weight_sum"], 1.0)
        loss_sum = self.generator_weight * mlm["loss_sum"] + self.discriminator_weight * disc_mean * mlm["weight_sum"]
        sums = {**mlm, **disc, "generator_loss_sum": mlm["loss_sum"], "loss_sum": loss_sum}
        return loss_sum / chosen, sums

    def generator_pass(
        self, network: ReplacedTokenNetwork, hidden: jax.Array, targets: jax.Array, weights: jax.Array, key: jax.Array
    ) -> tuple[dict[str, jax.Array], jax.Array]:
        """(summed MLM terms, [b, s] ids sampled from the generator at the chosen positions, 0 elsewhere)."""
        shape, positions = targets.shape, targets.size
        flat_hidden = hidden.reshape(positions, hidden.shape[-1])
        flat_targets, flat_weights = targets.reshape(positions), weights.reshape(positions)
        chosen = flat_weights != 0

        def at(index: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
            logits = network.generator_logits(flat_hidden[index][None])[0]
            sums = self.loss_sums(logits[None], flat_targets[index][None], flat_weights[index][None])
            # Never sample padding (id 0): the discriminator would take it for the end of the sequence.
            stopped = jax.lax.stop_gradient(logits).at[:, 0].set(-jnp.inf)
            samples = jax.random.categorical(key, stopped, axis=-1).astype(jnp.int32)
            return sums, jnp.zeros((positions,), jnp.int32).at[index].set(samples)

        budget = min(positions, max(1, int(np.ceil(self.max_prediction_fraction * positions))))
        everywhere = jnp.arange(positions)
        if budget == positions:
            sums, samples = at(everywhere)
        else:
            # top_k of the 0/1 mask: every chosen position (the budget holds them all), then unchosen ones.
            sums, samples = jax.lax.cond(
                jnp.sum(chosen) <= budget,
                lambda: at(jax.lax.top_k(chosen.astype(jnp.float32), budget)[1]),
                lambda: at(everywhere),
            )
        return sums, (samples * chosen).reshape(shape)

    def sum_metrics(self, sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The generator's and discriminator's losses, the discriminator's accuracy, the replaced-token
        rate and the fraction of replaced tokens found, from the summed terms."""
        real = jnp.maximum(sums["discriminator_weight_sum"], 1.0)
        return {
            "generator_loss": sums["generator_loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0),
            "discriminator_loss": sums["discriminator_loss_sum"] / real,
            "discriminator_accuracy": sums["discriminator_correct_sum"] / real,
            "replaced_rate": sums["replaced_sum"] / real,
            "replaced_recall": sums["replaced_found_sum"] / jnp.maximum(sums["replaced_sum"], 1.0),
        }

    def predict_batch(
        self, network: ReplacedTokenNetwork, batch: Mapping[str, jax.Array], *, max_decode_length: int = 0,
        decode: DecodeConfig = GREEDY, rng: jax.Array | None = None,
    ) -> jax.Array:
        """[b, s] 1 where the discriminator takes the input token for a replaced one, else 0."""
        return (self.network_logits(network, batch, None) > 0).astype(jnp.int32)


@gin.configurable(module="t5x_lite")
class DebertaRtdModel(ElectraModel):
    """DeBERTa-v3 pre-training: `ElectraModel`'s loss (generator MLM + discriminator_weight x replaced-token
    detection, 1 and 50 as in the paper) over a `DebertaRtd` network (a `DebertaRtdConfig`: the discriminator's
    sizes, the generator's depth, the embedding sharing). Fine-tune the discriminator with
    `EncoderClassificationModel` / `EncoderTaggingModel` on its `DebertaConfig` (INITIAL_CHECKPOINT_PATH: the
    word table starts as E_G + E_delta)."""

    def build_network(self, rngs: nnx.Rngs) -> DebertaRtd:
        if not isinstance(self.config, DebertaRtdConfig):
            raise ConfigError(f"DebertaRtdModel.config must be a DebertaRtdConfig, not {type(self.config).__name__}.")
        return DebertaRtd(self.config, rngs=rngs)


@gin.configurable(module="t5x_lite")
class ElectraGeneratorModel(_ElectraHead, EncoderOnlyMLMModel):
    """The generator alone as a masked LM (HF `ElectraForMaskedLM`; its sizes are the config's own,
    with `generator_fraction` 1)."""

    head = "generator"


@gin.configurable(module="t5x_lite")
class ElectraDiscriminatorModel(ElectraModel):
    """The discriminator alone (HF `ElectraForPreTraining`): `predict_batch` flags the tokens it takes
    for replaced. It has no generator to train with: pre-train with `ElectraModel`, or fine-tune it."""

    head = "discriminator"

    def loss_fn(self, network: Electra, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None = None):
        raise ValueError(
            "An ElectraForPreTraining checkpoint holds the discriminator without its generator, so it cannot be "
            "pre-trained further: fine-tune it (ElectraClassificationModel, ElectraTaggingModel) or pre-train ElectraModel."
        )


@gin.configurable(module="t5x_lite")
class ElectraClassificationModel(_ElectraHead, EncoderClassificationModel):
    """`EncoderClassificationModel` with HF `ElectraForSequenceClassification`'s head (dense + GELU on
    [CLS], then the classes; no tanh pooler) and the embedding projection when `embedding_size` differs."""

    fresh_param_prefixes = ("classifier",)


@gin.configurable(module="t5x_lite")
class ElectraTaggingModel(_ElectraHead, EncoderTaggingModel):
    """`EncoderTaggingModel` on the ELECTRA network (HF `ElectraForTokenClassification`)."""

    fresh_param_prefixes = ("tagger",)
