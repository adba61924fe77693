"""BERT: an encoder-only transformer with masked-LM, next-sentence, classification and tagging heads.

The network follows Hugging Face's `BertFor*` layout, so its weights map one to one
(`t5x_lite.hf.bert` reads and writes them): token +
learned position + token-type embeddings summed and layer-normed; post-layer-norm blocks with biases
and (erf) GELU; an MLM head (dense, GELU, layer norm, then logits
tied to the input embeddings plus an output bias); a pooler (dense + tanh on the [CLS] position)
feeding the next-sentence and sequence-classification heads; a per-token tagging head.

Packed rows (several examples per row) are supported: segment ids keep segments apart in attention
and `encoder_positions` restart the learned positions in every segment. Token id 0 is padding.

The trainer-facing models (gin-configurable, module "t5x_lite"):
  * `EncoderOnlyMLMModel`: masked-LM loss on the chosen positions only (+ NSP when the batch has
    `next_sentence_labels`);
  * `EncoderClassificationModel`: one label per row from the pooled [CLS] (single sentences or
    pairs `[CLS] A [SEP] B [SEP]` with token types);
  * `EncoderTaggingModel`: one tag per token.
For large models, `BertConfig.scan_layers` and `remat_policy` work as T5's (`t5x_lite.models.stacks`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio
from flax import nnx

from t5x_lite.models import layers, stacks
from t5x_lite.models.base import BaseModel
from t5x_lite.training import losses

HEADS = ("mlm", "classification", "tagging", "none")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyperparameters of a BERT network; defaults are BERT-base (uncased vocabulary)."""

    vocab_size: int = 30522
    d_model: int = 768
    num_heads: int = 12
    head_dim: int = 64
    d_ff: int = 3072
    num_layers: int = 12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    dropout_rate: float = 0.0  # hidden and attention-probability dropout (BERT used 0.1 for both)
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"  # "gelu" (erf, BERT) or "gelu_tanh"
    initializer_range: float = 0.02  # stddev of the embedding tables
    num_labels: int = 2  # classes of the classification head, or tags of the tagging head
    next_sentence_prediction: bool = False  # the MLM network also gets the pooler and NSP head
    dtype: str = "float32"  # activation dtype name, e.g. "bfloat16"
    remat_policy: str = "none"  # per-layer jax.checkpoint: "none", "full" or "dots" (see stacks.REMAT_POLICIES)
    scan_layers: bool = False  # stacked layer params (leading "layers" axis), applied with lax.scan
    attention_impl: str = "auto"  # "auto" (cuDNN fused on GPU in bf16, else einsum), "einsum", "xla", "cudnn"

    def __post_init__(self):
        if self.activation not in ("gelu", "gelu_tanh"):
            raise ValueError(f"BertConfig.activation={self.activation!r} is not supported; use 'gelu' or 'gelu_tanh'.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"BertConfig.dropout_rate={self.dropout_rate} must be in [0, 1).")
        if self.num_labels < 1:
            raise ValueError(f"BertConfig.num_labels={self.num_labels} must be at least 1.")
        stacks.check_remat_policy("BertConfig", self.remat_policy)
        if self.attention_impl not in layers.ATTENTION_IMPLS:
            raise ValueError(
                f"BertConfig.attention_impl={self.attention_impl!r} is not supported; use one of {list(layers.ATTENTION_IMPLS)}."
            )
        try:
            jnp.dtype(self.dtype)
        except TypeError as e:
            raise ValueError(f"BertConfig.dtype={self.dtype!r} is not a dtype name; use e.g. 'float32' or 'bfloat16'.") from e


gin.external_configurable(BertConfig, module="t5x_lite")


def _norm(config: BertConfig) -> layers.LayerNorm:
    return layers.LayerNorm(config.d_model, eps=config.layer_norm_eps, dtype=config.dtype)


def _dense(config: BertConfig, features: int, axes: tuple[str, str], rngs: nnx.Rngs) -> layers.Dense:
    return layers.Dense(
        (config.d_model,), (features,), axes, init=layers.variance_scaling("truncated_normal"),
        use_bias=True, dtype=config.dtype, rngs=rngs,
    )


class Embeddings(nnx.Module):
    """Word + learned position + token-type embeddings, then layer norm and dropout."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        std, dtype = config.initializer_range, config.dtype
        self.word_embeddings = layers.Embed(config.vocab_size, config.d_model, stddev=std, dtype=dtype, rngs=rngs)
        self.position_embeddings = layers.PositionEmbed(
            config.max_position_embeddings, config.d_model, stddev=std, dtype=dtype, rngs=rngs
        )
        self.token_type_embeddings = layers.Embed(
            config.type_vocab_size, config.d_model, stddev=std, dtype=dtype, rngs=rngs
        )
        self.layer_norm = _norm(config)
        self.dropout_rate = config.dropout_rate

    def __call__(
        self, tokens: jax.Array, positions: jax.Array, token_type_ids: jax.Array, dropout_rngs: nnx.Rngs | None
    ) -> jax.Array:
        x = self.word_embeddings(tokens) + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)
        return layers.dropout(self.layer_norm(x), self.dropout_rate, dropout_rngs)


class BertLayer(nnx.Module):
    """Post-norm block: x = LN(x + attention(x)); x = LN(x + mlp(x)), dropout on each branch."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.attention = layers.MultiHeadAttention(
            config.d_model, config.num_heads, config.head_dim, dropout_rate=config.dropout_rate,
            scale_logits=True, use_bias=True, implementation=config.attention_impl, dtype=config.dtype, rngs=rngs,
        )
        self.attention_norm = _norm(config)
        # BERT has no dropout inside the feed-forward block, only on its output.
        self.mlp = layers.MlpBlock(
            config.d_model, config.d_ff, activation=config.activation, use_bias=True, dtype=config.dtype, rngs=rngs
        )
        self.mlp_norm = _norm(config)
        self.dropout_rate = config.dropout_rate

    def __call__(self, x: jax.Array, bias: jax.Array, dropout_rngs: nnx.Rngs | None) -> jax.Array:
        h = self.attention(x, x, bias, dropout_rngs=dropout_rngs)
        x = self.attention_norm(x + layers.dropout(h, self.dropout_rate, dropout_rngs))
        h = self.mlp(x)
        return self.mlp_norm(x + layers.dropout(h, self.dropout_rate, dropout_rngs))


class MlmHead(nnx.Module):
    """dense + GELU + layer norm, then logits through the (tied) word embeddings plus a bias."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.transform = _dense(config, config.d_model, ("embed", "mlp"), rngs)
        self.layer_norm = _norm(config)
        self.bias = nnx.Param(jnp.zeros((config.vocab_size,), jnp.float32), logical_axes=("vocab",))
        self.activation = config.activation

    def __call__(self, hidden: jax.Array, word_embeddings: layers.Embed) -> jax.Array:
        h = jax.nn.gelu(self.transform(hidden), approximate=self.activation == "gelu_tanh")
        return word_embeddings.attend(self.layer_norm(h)) + self.bias[...]


class Bert(nnx.Module):
    """The BERT network. `head` picks the output layers it owns:

    * "mlm": the masked-LM head (+ pooler and NSP head when `config.next_sentence_prediction`);
    * "classification": pooler + a `num_labels`-way classifier on the pooled [CLS];
    * "tagging": a `num_labels`-way classifier on every position;
    * "none": the encoder alone (frozen features).

    Dropout is applied iff `dropout_rngs` is given and the rate is > 0.
    """

    def __init__(self, config: BertConfig, head: str = "mlm", *, rngs: nnx.Rngs):
        if head not in HEADS:
            raise ValueError(f"Unknown BERT head {head!r}; use one of {list(HEADS)}.")
        self.config = config
        self.head = head
        self.embeddings = Embeddings(config, rngs=rngs)
        self.layers = stacks.make_layers(
            lambda rngs: BertLayer(config, rngs=rngs), config.num_layers, config.scan_layers, rngs
        )
        with_pooler = has_pooler(config, head)
        self.mlm = MlmHead(config, rngs=rngs) if head == "mlm" else None
        self.pooler = _dense(config, config.d_model, ("embed", "mlp"), rngs) if with_pooler else None
        self.nsp = _dense(config, 2, ("embed", "classes"), rngs) if head == "mlm" and with_pooler else None
        self.classifier = _dense(config, config.num_labels, ("embed", "classes"), rngs) if head == "classification" else None
        self.tagger = _dense(config, config.num_labels, ("embed", "classes"), rngs) if head == "tagging" else None

    def encode(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        dropout_rngs: nnx.Rngs | None = None,
        return_hidden_states: bool = False,
    ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
        """[b, s] tokens -> [b, s, d_model] hidden states of the last layer (activation dtype).

        `segment_ids` (packed rows; 0 = padding) restrict attention to each segment, otherwise token
        id 0 marks padding. `positions` default to 0..s-1, `token_type_ids` to 0. With
        `return_hidden_states` also returns the list [embedding output, layer 1, ..., layer n]
        (Hugging Face's `hidden_states` order).
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(tokens)
        if segment_ids is None:
            mask = layers.padding_mask(tokens)
        else:
            mask = layers.padding_mask(segment_ids) & layers.segment_mask(segment_ids, segment_ids)
        bias = layers.mask_to_bias(mask)
        x = self.embeddings(tokens, positions, token_type_ids, dropout_rngs)
        config = self.config
        if not return_hidden_states:
            return stacks.apply_layers(
                self.layers, x, (bias,), dropout_rngs, scan=config.scan_layers, remat_policy=config.remat_policy
            )
        hidden_states = [x]
        for layer in stacks.layer_views(self.layers, config.scan_layers):
            x = stacks.apply_layers([layer], x, (bias,), dropout_rngs, scan=False, remat_policy=config.remat_policy)
            hidden_states.append(x)
        return x, hidden_states

    def mlm_logits(self, hidden: jax.Array) -> jax.Array:
        """[b, s, d] -> float32 [b, s, vocab] masked-LM logits."""
        if self.mlm is None:
            raise ValueError(f"This BERT network has the {self.head!r} head, not the masked-LM head.")
        return self.mlm(hidden, self.embeddings.word_embeddings)

    def pooled(self, hidden: jax.Array) -> jax.Array:
        """tanh(dense(hidden at position 0)): the [CLS] summary of each row, [b, d]."""
        if self.pooler is None:
            raise ValueError(
                f"This BERT network ({self.head!r} head, next_sentence_prediction="
                f"{self.config.next_sentence_prediction}) has no pooler."
            )
        return jnp.tanh(self.pooler(hidden[:, 0]))

    def nsp_logits(self, hidden: jax.Array) -> jax.Array:
        """float32 [b, 2] next-sentence logits: column 0 "B follows A", column 1 "B is random" (BERT's order)."""
        if self.nsp is None:
            raise ValueError(
                "The batch has next_sentence_labels but the network has no NSP head; set "
                "BertConfig.next_sentence_prediction = True (or drop NSP from the task)."
            )
        return self.nsp(self.pooled(hidden), out_dtype=jnp.float32)

    def classification_logits(self, hidden: jax.Array, dropout_rngs: nnx.Rngs | None = None) -> jax.Array:
        """float32 [b, num_labels] from the pooled [CLS] (dropout before the classifier, as BERT)."""
        pooled = layers.dropout(self.pooled(hidden), self.config.dropout_rate, dropout_rngs)
        return self.classifier(pooled, out_dtype=jnp.float32)

    def tagging_logits(self, hidden: jax.Array, dropout_rngs: nnx.Rngs | None = None) -> jax.Array:
        """float32 [b, s, num_labels] per-token logits."""
        return self.tagger(layers.dropout(hidden, self.config.dropout_rate, dropout_rngs), out_dtype=jnp.float32)

    def __call__(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        dropout_rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """The logits of the network's head: MLM [b, s, vocab], classification [b, labels], tagging
        [b, s, labels]; the "none" head returns the last hidden states."""
        hidden = self.encode(tokens, segment_ids, positions, token_type_ids, dropout_rngs=dropout_rngs)
        if self.head == "mlm":
            return self.mlm_logits(hidden)
        if self.head == "classification":
            return self.classification_logits(hidden, dropout_rngs)
        if self.head == "tagging":
            return self.tagging_logits(hidden, dropout_rngs)
        return hidden


def has_pooler(config: BertConfig, head: str) -> bool:
    """Whether the network of `head` has the pooler (as `Bert.__init__` decides)."""
    return head == "classification" or (head == "mlm" and config.next_sentence_prediction)


# ---------------------------------------------------------------------------------------------
# The trainer's models


def _row_weights(tokens: jax.Array) -> jax.Array:
    """[b] float32: 1 for rows holding an example (the evaluator pads batches with all-zero rows)."""
    return (tokens[:, 0] != 0).astype(jnp.float32)


def _sequence_features(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array | None]:
    return {
        "segment_ids": batch.get("encoder_segment_ids"),
        "positions": batch.get("encoder_positions"),
        "token_type_ids": batch.get("encoder_token_type_ids"),
    }


class _BertModel(BaseModel):
    """What the three BERT models share: the config, the network's head, the input features."""

    head = "mlm"
    text_to_text = False
    # Parameter prefixes a fine-tuning run may start without (fresh heads on a pre-trained encoder).
    fresh_param_prefixes: tuple[str, ...] = ()

    def __init__(self, config: BertConfig = gin.REQUIRED, label_smoothing: float = 0.0, z_loss: float = 0.0):
        super().__init__(label_smoothing=label_smoothing, z_loss=z_loss)
        self.config = config

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dropout_rate(self) -> float:
        return self.config.dropout_rate

    def build_network(self, rngs: nnx.Rngs) -> Bert:
        return Bert(self.config, self.head, rngs=rngs)

    def network_logits(self, network: Bert, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None) -> jax.Array:
        return network(batch["encoder_input_tokens"], **_sequence_features(batch), dropout_rngs=dropout_rngs)

    def _sums(self, logits: jax.Array, targets: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
        return losses.cross_entropy(
            logits, targets, weights, label_smoothing=self.label_smoothing, z_loss=self.z_loss
        )


@gin.configurable(module="t5x_lite")
class EncoderOnlyMLMModel(_BertModel):
    """BERT masked-LM pre-training: cross entropy on the chosen positions only (`encoder_loss_weights`);
    with `next_sentence_labels` in the batch (unpacked NSP data) the mean NSP loss is added, as BERT does.

    Features: `encoder_input_tokens`, `encoder_target_tokens` (the original ids at chosen positions),
    `encoder_loss_weights`, and optionally `encoder_segment_ids`/`encoder_positions` (packing),
    `encoder_token_type_ids` and `next_sentence_labels` ([b] or [b, 1]; as `t5x_lite.data.mlm` writes
    them, 1: B follows A, 0: B is random, i.e. NSP head column `1 - label`).

    `max_prediction_fraction`: the training loss computes vocabulary logits only at the chosen
    positions (as BERT's `max_predictions_per_seq`), gathered into a fixed budget of this fraction of
    the batch's positions; a batch with more chosen positions takes the all-positions path instead,
    so the loss is exact either way. 1.0 always computes every position's logits.
    """

    targets_key = "encoder_target_tokens"
    weights_key = "encoder_loss_weights"
    head = "mlm"

    def __init__(
        self,
        config: BertConfig = gin.REQUIRED,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        max_prediction_fraction: float = 0.25,
    ):
        super().__init__(config, label_smoothing=label_smoothing, z_loss=z_loss)
        if not 0.0 < max_prediction_fraction <= 1.0:
            raise ValueError(f"max_prediction_fraction={max_prediction_fraction} must be in (0, 1].")
        self.max_prediction_fraction = max_prediction_fraction

    @property
    def feature_converter_cls(self) -> type[seqio.FeatureConverter]:
        from t5x_lite.data.feature_converters import MaskedLMFeatureConverter

        return MaskedLMFeatureConverter

    def loss_fn(
        self, network: Bert, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean MLM loss per chosen token (+ mean NSP loss per row); accuracy is the MLM accuracy.

        The trainer divides `loss_sum` by `weight_sum` (the number of chosen tokens), so the NSP term
        enters `loss_sum` as its per-row mean times that count: after the division the two means add up.
        """
        tokens = batch["encoder_input_tokens"]
        hidden = network.encode(tokens, **_sequence_features(batch), dropout_rngs=dropout_rngs)
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
            return self._sums(network.mlm_logits(hidden), targets, weights)
        flat_hidden = hidden.reshape(1, positions, hidden.shape[-1])
        flat_targets, flat_weights = targets.reshape(1, positions), weights.reshape(1, positions)
        chosen = flat_weights[0] != 0

        def gathered():
            # top_k of the 0/1 mask: every chosen position (the budget holds them all), then unchosen
            # ones of weight 0, which add nothing.
            index = jax.lax.top_k(chosen.astype(jnp.float32), budget)[1]
            return self._sums(network.mlm_logits(flat_hidden[:, index]), flat_targets[:, index], flat_weights[:, index])

        def everywhere():
            return self._sums(network.mlm_logits(flat_hidden), flat_targets, flat_weights)

        return jax.lax.cond(jnp.sum(chosen) <= budget, gathered, everywhere)

    def predict_batch(self, network: Bert, batch: Mapping[str, jax.Array], **unused) -> jax.Array:
        """[b, s] int32: the most likely original token at every position (fills in the masks)."""
        del unused
        return jnp.argmax(self.network_logits(network, batch, None), axis=-1).astype(jnp.int32)

    def score_batch(self, network: Bert, batch: Mapping[str, jax.Array]) -> jax.Array:
        """[b] float32: the log-likelihood of the original tokens at the chosen positions."""
        log_probs = jax.nn.log_softmax(self.network_logits(network, batch, None), axis=-1)
        token = jnp.take_along_axis(log_probs, batch[self.targets_key][..., None], axis=-1)[..., 0]
        return jnp.sum(token * batch[self.weights_key].astype(jnp.float32), axis=-1)


@gin.configurable(module="t5x_lite")
class EncoderClassificationModel(_BertModel):
    """Sequence classification from the pooled [CLS]: single sentences `[CLS] A [SEP]` or pairs
    `[CLS] A [SEP] B [SEP]` (token type 1 on B). Features from `ClassificationFeatureConverter`:
    `encoder_input_tokens`, `encoder_token_type_ids` and `labels` ([b, 1] class ids).

    `predict_batch` gives [b, 1] class ids, `score_batch` the log-probability of the gold label.
    Fine-tuning from a pre-trained (MLM) checkpoint starts the pooler and classifier afresh when the
    checkpoint lacks them (`fresh_param_prefixes`).
    """

    targets_key = "labels"
    head = "classification"
    fresh_param_prefixes = ("pooler", "classifier")

    @property
    def feature_converter_cls(self) -> type[seqio.FeatureConverter]:
        from t5x_lite.data.classification_tasks import ClassificationFeatureConverter

        return ClassificationFeatureConverter

    def loss_fn(
        self, network: Bert, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean cross entropy per example; `accuracy` is the fraction of rows classified right."""
        logits = self.network_logits(network, batch, dropout_rngs)
        labels = batch[self.targets_key].reshape(logits.shape[0], -1)[:, :1]
        sums = self._sums(logits[:, None], labels, _row_weights(batch["encoder_input_tokens"])[:, None])
        return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0), sums

    def predict_batch(self, network: Bert, batch: Mapping[str, jax.Array], **unused) -> jax.Array:
        """[b, 1] int32 predicted class ids."""
        del unused
        return jnp.argmax(self.network_logits(network, batch, None), axis=-1).astype(jnp.int32)[:, None]

    def score_batch(self, network: Bert, batch: Mapping[str, jax.Array]) -> jax.Array:
        """[b] float32 log-probability of each row's gold label."""
        log_probs = jax.nn.log_softmax(self.network_logits(network, batch, None), axis=-1)
        labels = batch[self.targets_key].reshape(log_probs.shape[0], -1)[:, :1]
        return jnp.take_along_axis(log_probs, labels, axis=-1)[:, 0]


@gin.configurable(module="t5x_lite")
class EncoderTaggingModel(_BertModel):
    """Token tagging (NER-like): `num_labels` tags, given in the data as ids 1..num_labels; tag id 0
    marks positions without a label (padding, [CLS], [SEP], word pieces after a word's first), which
    the loss ignores and predictions never produce. Features from `TaggingFeatureConverter`:
    `encoder_input_tokens`, `encoder_target_tokens` (tag ids), `encoder_loss_weights`, and
    `encoder_segment_ids`/`encoder_positions` when packed.
    """

    targets_key = "encoder_target_tokens"
    weights_key = "encoder_loss_weights"
    head = "tagging"
    fresh_param_prefixes = ("tagger",)

    @property
    def feature_converter_cls(self) -> type[seqio.FeatureConverter]:
        from t5x_lite.data.classification_tasks import TaggingFeatureConverter

        return TaggingFeatureConverter

    def loss_fn(
        self, network: Bert, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean cross entropy per labelled token; logit column c scores tag id c + 1."""
        logits = self.network_logits(network, batch, dropout_rngs)
        targets, weights = self._columns(batch)
        sums = self._sums(logits, targets, weights)
        return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0), sums

    def _columns(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Tag ids -> logit columns (id - 1), with weight 0 wherever the tag id is 0 (no label)."""
        tags = batch[self.targets_key]
        weights = batch[self.weights_key].astype(jnp.float32) * (tags > 0)
        return jnp.maximum(tags - 1, 0), weights

    def predict_batch(self, network: Bert, batch: Mapping[str, jax.Array], **unused) -> jax.Array:
        """[b, s] int32 predicted tag ids (1..num_labels) at every position."""
        del unused
        return jnp.argmax(self.network_logits(network, batch, None), axis=-1).astype(jnp.int32) + 1

    def score_batch(self, network: Bert, batch: Mapping[str, jax.Array]) -> jax.Array:
        """[b] float32 log-likelihood of the gold tags at the labelled positions."""
        log_probs = jax.nn.log_softmax(self.network_logits(network, batch, None), axis=-1)
        targets, weights = self._columns(batch)
        token = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(token * weights, axis=-1)
