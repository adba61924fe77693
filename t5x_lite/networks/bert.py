"""BERT: an encoder-only transformer with masked-LM, next-sentence, classification and tagging heads.

The network follows Hugging Face's `BertFor*` layout, so its weights map one to one
(`params_from_hf` / `params_to_hf`; `t5x_lite.hf.bert` reads and writes whole directories): token +
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
For large models, `BertConfig.scan_layers` and `remat_policy` work as T5's (`t5x_lite.nn.stacks`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_lite import partitioning
from t5x_lite.networks.config_checks import ConfigError, check_config
from t5x_lite.nn import attention, kernels, layers, stacks

HEADS = ("mlm", "classification", "tagging", "none")
# Logical axes of the heads' own activations (the shared layers name the rest, see `layers.EMBED_AXES` etc.).
POOLED_AXES = ("batch", "mlp")  # the pooler's [b, d] output (its kernel is [embed, mlp])
CLASS_LOGITS_AXES = ("batch", "classes")  # classification and NSP logits
TAG_LOGITS_AXES = ("batch", "length", "classes")  # tagging logits


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
    kernels: str = "auto"  # KERNELS: "auto" (by backend), "xla" or "cpu_tuned" (see nn/kernels.py)

    def __post_init__(self):
        if self.activation not in ("gelu", "gelu_tanh"):
            raise ConfigError(f"BertConfig.activation={self.activation!r} is not supported; use 'gelu' or 'gelu_tanh'.")
        if self.num_labels < 1:
            raise ConfigError(f"BertConfig.num_labels={self.num_labels} must be at least 1.")
        check_config(self)


def layer_norm_of(config: BertConfig) -> layers.LayerNorm:
    """The post-norm LayerNorm of BERT-style encoders (BERT, ELECTRA, DeBERTa: the config's width and eps)."""
    return layers.LayerNorm(config.d_model, eps=config.layer_norm_eps, dtype=config.dtype)


def dense_of(config: BertConfig, features: int, axes: tuple[str, str], rngs: nnx.Rngs) -> layers.Dense:
    """A biased projection from the model width, truncated-normal initialised, as BERT-style heads use."""
    return layers.Dense(
        (config.d_model,), (features,), axes, init=layers.variance_scaling("truncated_normal"),
        kernels=kernels.resolve(config.kernels), use_bias=True, dtype=config.dtype, rngs=rngs,
    )


class Embeddings(nnx.Module):
    """Word + learned position + token-type embeddings, then layer norm and dropout."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        std, dtype = config.initializer_range, config.dtype
        self.kernels = kernels.resolve(config.kernels)
        self.word_embeddings = layers.Embed(
            config.vocab_size, config.d_model, kernels=self.kernels, stddev=std, dtype=dtype, rngs=rngs
        )
        self.position_embeddings = layers.PositionEmbed(
            config.max_position_embeddings, config.d_model, stddev=std, dtype=dtype, rngs=rngs
        )
        self.token_type_embeddings = layers.Embed(
            config.type_vocab_size, config.d_model, kernels=self.kernels, stddev=std, dtype=dtype, rngs=rngs
        )
        self.layer_norm = layer_norm_of(config)
        self.dropout_rate = config.dropout_rate

    def __call__(
        self, tokens: jax.Array, positions: jax.Array, token_type_ids: jax.Array, dropout_rngs: nnx.Rngs | None
    ) -> jax.Array:
        x = self.word_embeddings(tokens) + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)
        return self.kernels.dropout(self.layer_norm(x), self.dropout_rate, dropout_rngs)


class BertLayer(nnx.Module):
    """Post-norm block: x = LN(x + attention(x)); x = LN(x + mlp(x)), dropout on each branch."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.kernels = kernels.resolve(config.kernels)
        self.attention = attention.MultiHeadAttention(
            config.d_model, config.num_heads, config.head_dim, kernels=self.kernels, dropout_rate=config.dropout_rate,
            scale_logits=True, use_bias=True, implementation=config.attention_impl, dtype=config.dtype, rngs=rngs,
        )
        self.attention_norm = layer_norm_of(config)
        # BERT has no dropout inside the feed-forward block, only on its output.
        self.mlp = layers.MlpBlock(
            config.d_model, config.d_ff, kernels=self.kernels, activation=config.activation, use_bias=True,
            dtype=config.dtype, rngs=rngs,
        )
        self.mlp_norm = layer_norm_of(config)
        self.dropout_rate = config.dropout_rate

    def __call__(self, x: jax.Array, bias: jax.Array, dropout_rngs: nnx.Rngs | None) -> jax.Array:
        h = self.attention(x, x, bias, dropout_rngs=dropout_rngs)
        x = self.attention_norm(x + self.kernels.dropout(h, self.dropout_rate, dropout_rngs))
        h = self.mlp(x)
        return self.mlp_norm(x + self.kernels.dropout(h, self.dropout_rate, dropout_rngs))


class MlmHead(nnx.Module):
    """dense + GELU + layer norm, then logits through the (tied) word embeddings plus a bias."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.transform = dense_of(config, config.d_model, ("embed", "mlp"), rngs)
        self.layer_norm = layer_norm_of(config)
        self.bias = nnx.Param(jnp.zeros((config.vocab_size,), jnp.float32), logical_axes=("vocab",))
        self.activation = config.activation

    def __call__(self, hidden: jax.Array, word_embeddings: layers.Embed) -> jax.Array:
        # Named as the residual stream (the layer norm reads whole rows): named `mlp` (split over `tensor`),
        # XLA:CPU's partitioner took wrong gradients through the layer norm (jax 0.10.2; tests/test_partitioning.py).
        h = partitioning.constrain(self.transform(hidden), "mlm/transform", layers.EMBED_AXES)
        h = jax.nn.gelu(h, approximate=self.activation == "gelu_tanh")
        return word_embeddings.attend(self.layer_norm(h)) + self.bias[...]


class EncoderHeadLogits:
    """The classification and tagging logits of a BERT-shaped encoder (BERT, DeBERTa): the network has
    `pooled`, `classifier`, `tagger`, `kernels` and `config.dropout_rate`."""

    def classification_logits(self, hidden: jax.Array, dropout_rngs: nnx.Rngs | None = None) -> jax.Array:
        """float32 [b, num_labels] from the pooled [CLS] (dropout before the classifier, as BERT)."""
        pooled = self.kernels.dropout(self.pooled(hidden), self.config.dropout_rate, dropout_rngs)
        logits = self.classifier(pooled, out_dtype=jnp.float32)
        return partitioning.constrain(logits, "classification/logits", CLASS_LOGITS_AXES)

    def tagging_logits(self, hidden: jax.Array, dropout_rngs: nnx.Rngs | None = None) -> jax.Array:
        """float32 [b, s, num_labels] per-token logits."""
        hidden = self.kernels.dropout(hidden, self.config.dropout_rate, dropout_rngs)
        return partitioning.constrain(self.tagger(hidden, out_dtype=jnp.float32), "tagging/logits", TAG_LOGITS_AXES)


class Bert(EncoderHeadLogits, nnx.Module):
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
        self.kernels = kernels.resolve(config.kernels)
        self.embeddings = Embeddings(config, rngs=rngs)
        self.layers = stacks.make_layers(
            lambda rngs: BertLayer(config, rngs=rngs), config.num_layers, config.scan_layers, rngs
        )
        with_pooler = has_pooler(config, head)
        self.mlm = MlmHead(config, rngs=rngs) if head == "mlm" else None
        self.pooler = dense_of(config, config.d_model, ("embed", "mlp"), rngs) if with_pooler else None
        self.nsp = dense_of(config, 2, ("embed", "classes"), rngs) if head == "mlm" and with_pooler else None
        self.classifier = dense_of(config, config.num_labels, ("embed", "classes"), rngs) if head == "classification" else None
        self.tagger = dense_of(config, config.num_labels, ("embed", "classes"), rngs) if head == "tagging" else None

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
        bias = layers.mask_to_bias(layers.encoder_mask(tokens, segment_ids))
        x = self.embeddings(tokens, positions, token_type_ids, dropout_rngs)
        config = self.config
        if not return_hidden_states:
            return stacks.apply_layers(
                self.layers, x, (bias,), dropout_rngs, scan=config.scan_layers, remat_policy=config.remat_policy
            )
        def layer_output(layer: BertLayer, x: jax.Array, i) -> tuple[jax.Array, jax.Array]:
            x = layer(x, bias, dropout_rngs)
            return x, x

        last, outputs = stacks.each_layer(self.layers, layer_output, x, scan=config.scan_layers)
        return last, [x, *stacks.per_layer(outputs)]

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
        return jnp.tanh(partitioning.constrain(self.pooler(hidden[:, 0]), "pooled", POOLED_AXES))

    def nsp_logits(self, hidden: jax.Array) -> jax.Array:
        """float32 [b, 2] next-sentence logits: column 0 "B follows A", column 1 "B is random" (BERT's order)."""
        if self.nsp is None:
            raise ValueError(
                "The batch has next_sentence_labels but the network has no NSP head; set "
                "BertConfig.next_sentence_prediction = True (or drop NSP from the task)."
            )
        return partitioning.constrain(self.nsp(self.pooled(hidden), out_dtype=jnp.float32), "nsp/logits",
                                      CLASS_LOGITS_AXES)

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
