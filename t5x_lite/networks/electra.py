"""ELECTRA: a small masked-LM generator and a discriminator that spots the tokens it replaced.

Built from BERT's pieces (`t5x_lite.networks.bert`: embeddings, post-norm layers) in Hugging Face's
`Electra*` layout, so weights map one to one (`t5x_lite.hf.electra`):

  embeddings      word + position + token-type embeddings at `embedding_size`, layer norm (shared
                  by the generator and the discriminator, as ELECTRA does)
  embeddings_project   Dense embedding_size -> d_model, only when they differ (ELECTRA-small)
  layers          the discriminator's BERT layers
  discriminator_predictions   dense d_model -> d_model, activation, dense -> 1 (a logit per token:
                  "replaced")
  generator       its own projection, BERT layers of width `generator_fraction` x d_model, and the
                  MLM head: dense -> embedding_size, GELU, layer norm, logits through the shared word
                  embeddings plus a bias

With `embedding_size == d_model` (the default) the discriminator's parameters are named exactly as
`Bert`'s (`embeddings/*`, `layers/*`), so an ELECTRA checkpoint loads into `EncoderClassificationModel`
or `EncoderTaggingModel` (INITIAL_CHECKPOINT_PATH) with fresh heads.

Heads (`Electra(config, head)`): "pretraining" (both models), "discriminator" (HF
`ElectraForPreTraining`), "generator" (HF `ElectraForMaskedLM`: embeddings + generator only),
"classification" (HF `ElectraForSequenceClassification`: dense + GELU on [CLS], then the classes)
and "tagging" (HF `ElectraForTokenClassification`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_lite.networks import bert
from t5x_lite.networks.bert import BertConfig
from t5x_lite.networks.config_checks import ConfigError
from t5x_lite.nn import kernels, layers, stacks

HEADS = ("pretraining", "discriminator", "generator", "classification", "tagging")


@dataclasses.dataclass(frozen=True)
class ElectraConfig(BertConfig):
    """A `BertConfig` (the discriminator's) plus the shared embedding width and the generator's size.

    `embedding_size` 0 means d_model. The generator has `generator_fraction` of the discriminator's
    width, heads and feed-forward size (ELECTRA's default 1/4) and `generator_num_layers` layers (0:
    as many as the discriminator). A network of the "generator" head alone (HF `ElectraForMaskedLM`)
    is configured with the generator's own sizes and `generator_fraction` 1.
    """

    embedding_size: int = 0
    generator_fraction: float = 0.25
    generator_num_layers: int = 0

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.generator_fraction <= 1.0:
            raise ConfigError(f"ElectraConfig.generator_fraction={self.generator_fraction} must be in (0, 1].")
        if self.embedding_size < 0 or self.generator_num_layers < 0:
            raise ConfigError("ElectraConfig.embedding_size and generator_num_layers must be >= 0 (0: the default).")

    @property
    def embedding_width(self) -> int:
        """The width of the shared embeddings."""
        return self.embedding_size or self.d_model

    def embedding_config(self) -> BertConfig:
        """The config of the shared embeddings (BERT's embeddings at `embedding_width`)."""
        return bert_config(self, d_model=self.embedding_width)

    def generator_config(self) -> BertConfig:
        """The generator's layers: `generator_fraction` of the width (heads of the discriminator's head
        size where they divide it), of the feed-forward size, and `generator_num_layers` layers."""
        d_model = max(1, round(self.generator_fraction * self.d_model))
        num_heads = max(1, d_model // self.head_dim) if d_model % self.head_dim == 0 else 1
        return bert_config(
            self, d_model=d_model, num_heads=num_heads, head_dim=d_model // num_heads,
            d_ff=max(1, round(self.generator_fraction * self.d_ff)), num_layers=self.generator_num_layers or self.num_layers,
        )


def bert_config(config: BertConfig, **changes) -> BertConfig:
    """The plain `BertConfig` of `config`'s BERT fields, with `changes`."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(BertConfig)}
    return BertConfig(**{**fields, **changes})


def _dense(config: BertConfig, d_in: int, d_out: int, axes: tuple[str, str], rngs: nnx.Rngs) -> layers.Dense:
    return layers.Dense(
        (d_in,), (d_out,), axes, init=layers.variance_scaling("truncated_normal"),
        kernels=kernels.resolve(config.kernels), use_bias=True, dtype=config.dtype, rngs=rngs,
    )


def _gelu(x: jax.Array, activation: str) -> jax.Array:
    return jax.nn.gelu(x, approximate=activation == "gelu_tanh")


class Body(nnx.Module):
    """The optional projection from the embeddings' width and a stack of BERT layers."""

    def __init__(self, config: BertConfig, embedding_width: int, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings_project = (
            _dense(config, embedding_width, config.d_model, ("embed", "mlp"), rngs) if embedding_width != config.d_model else None
        )
        self.layers = stacks.make_layers(lambda rngs: bert.BertLayer(config, rngs=rngs), config.num_layers, config.scan_layers, rngs)

    def __call__(self, embedded: jax.Array, bias: jax.Array, dropout_rngs: nnx.Rngs | None) -> jax.Array:
        return apply_body(self.embeddings_project, self.layers, self.config, embedded, bias, dropout_rngs)


def apply_body(
    project: layers.Dense | None, stack, config: BertConfig, embedded: jax.Array, bias: jax.Array,
    dropout_rngs: nnx.Rngs | None,
) -> jax.Array:
    """The embeddings through the projection (if any) and the layer stack: [b, s, d_model]."""
    x = embedded if project is None else project(embedded)
    return stacks.apply_layers(stack, x, (bias,), dropout_rngs, scan=config.scan_layers, remat_policy=config.remat_policy)


class GeneratorHead(nnx.Module):
    """dense (generator width -> embedding width), GELU, layer norm; vocabulary logits through the
    shared word embeddings plus a bias (HF `generator_predictions` + `generator_lm_head`)."""

    def __init__(self, config: BertConfig, embedding_width: int, vocab_size: int, *, rngs: nnx.Rngs):
        self.dense = _dense(config, config.d_model, embedding_width, ("mlp", "embed"), rngs)
        self.layer_norm = layers.LayerNorm(embedding_width, eps=config.layer_norm_eps, dtype=config.dtype)
        self.bias = nnx.Param(jnp.zeros((vocab_size,), jnp.float32), logical_axes=("vocab",))

    def __call__(self, hidden: jax.Array, word_embeddings: layers.Embed) -> jax.Array:
        h = self.layer_norm(jax.nn.gelu(self.dense(hidden), approximate=False))
        return word_embeddings.attend(h) + self.bias[...]


class Generator(nnx.Module):
    """The small masked-LM encoder over the shared embeddings."""

    def __init__(self, config: ElectraConfig, *, rngs: nnx.Rngs):
        generator = config.generator_config()
        self.body = Body(generator, config.embedding_width, rngs=rngs)
        self.head = GeneratorHead(generator, config.embedding_width, config.vocab_size, rngs=rngs)


class DiscriminatorHead(nnx.Module):
    """dense, activation, dense -> one float32 logit per token (HF `discriminator_predictions`)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.dense = _dense(config, config.d_model, config.d_model, ("embed", "mlp"), rngs)
        self.dense_prediction = _dense(config, config.d_model, 1, ("mlp", "classes"), rngs)
        self.activation = config.activation

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return self.dense_prediction(_gelu(self.dense(hidden), self.activation), out_dtype=jnp.float32)[..., 0]


class ClassificationHead(nnx.Module):
    """HF `ElectraClassificationHead`: dropout, dense + GELU on the [CLS] position, dropout, dense -> classes."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.dense = _dense(config, config.d_model, config.d_model, ("embed", "mlp"), rngs)
        self.out_proj = _dense(config, config.d_model, config.num_labels, ("mlp", "classes"), rngs)
        self.kernels = kernels.resolve(config.kernels)
        self.dropout_rate = config.dropout_rate

    def __call__(self, hidden: jax.Array, dropout_rngs: nnx.Rngs | None) -> jax.Array:
        x = self.kernels.dropout(hidden[:, 0], self.dropout_rate, dropout_rngs)
        x = self.kernels.dropout(jax.nn.gelu(self.dense(x), approximate=False), self.dropout_rate, dropout_rngs)
        return self.out_proj(x, out_dtype=jnp.float32)


class Electra(nnx.Module):
    """The ELECTRA network; `head` picks the parts it owns (see the module docstring)."""

    def __init__(self, config: ElectraConfig, head: str = "pretraining", *, rngs: nnx.Rngs):
        if head not in HEADS:
            raise ValueError(f"Unknown ELECTRA head {head!r}; use one of {list(HEADS)}.")
        disc = bert_config(config)
        self.config, self.head = config, head
        self.kernels = kernels.resolve(disc.kernels)
        self.embeddings = bert.Embeddings(config.embedding_config(), rngs=rngs)
        with_discriminator = head != "generator"
        body = Body(disc, config.embedding_width, rngs=rngs) if with_discriminator else None
        # The discriminator's layers sit at the top level, named as BERT's.
        self.embeddings_project = body.embeddings_project if body is not None else None
        self.layers = body.layers if body is not None else None
        self.discriminator_predictions = DiscriminatorHead(disc, rngs=rngs) if head in ("pretraining", "discriminator") else None
        self.generator = Generator(config, rngs=rngs) if head in ("pretraining", "generator") else None
        self.classifier = ClassificationHead(disc, rngs=rngs) if head == "classification" else None
        self.tagger = _dense(disc, disc.d_model, disc.num_labels, ("embed", "classes"), rngs) if head == "tagging" else None

    def embed(
        self, tokens: jax.Array, segment_ids: jax.Array | None, positions: jax.Array | None,
        token_type_ids: jax.Array | None, dropout_rngs: nnx.Rngs | None,
    ) -> tuple[jax.Array, jax.Array]:
        """The shared embeddings [b, s, embedding_width] and the attention bias (padding, segments)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(tokens)
        bias = layers.mask_to_bias(layers.encoder_mask(tokens, segment_ids))
        return self.embeddings(tokens, positions, token_type_ids, dropout_rngs), bias

    def encode(
        self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
        token_type_ids: jax.Array | None = None, *, dropout_rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """[b, s] tokens -> the discriminator's last hidden states [b, s, d_model] (the generator's, for
        the "generator" head alone: so `EncoderOnlyMLMModel` trains it as any masked LM)."""
        if self.layers is None:
            return self.generator_hidden(tokens, segment_ids, positions, token_type_ids, dropout_rngs=dropout_rngs)
        embedded, bias = self.embed(tokens, segment_ids, positions, token_type_ids, dropout_rngs)
        return apply_body(self.embeddings_project, self.layers, self.config, embedded, bias, dropout_rngs)

    def discriminator_hidden_states(
        self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> list[jax.Array]:
        """[embedding output (projected to d_model), layer 1, ..., layer n] of the discriminator without
        dropout: Hugging Face's `output_hidden_states`, for frozen features."""
        if self.layers is None:
            raise ValueError(f"This ELECTRA network ({self.head!r} head) has no discriminator.")
        embedded, bias = self.embed(tokens, segment_ids, positions, token_type_ids, None)
        x = embedded if self.embeddings_project is None else self.embeddings_project(embedded)

        def layer_output(layer: bert.BertLayer, x: jax.Array, i) -> tuple[jax.Array, jax.Array]:
            x = layer(x, bias, None)
            return x, x

        _, outputs = stacks.each_layer(self.layers, layer_output, x, scan=self.config.scan_layers)
        return [x, *stacks.per_layer(outputs)]

    def generator_hidden(
        self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
        token_type_ids: jax.Array | None = None, *, dropout_rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """[b, s] tokens -> the generator's last hidden states [b, s, generator width]."""
        if self.generator is None:
            raise ValueError(f"This ELECTRA network ({self.head!r} head) has no generator.")
        embedded, bias = self.embed(tokens, segment_ids, positions, token_type_ids, dropout_rngs)
        return self.generator.body(embedded, bias, dropout_rngs)

    def generator_logits(self, hidden: jax.Array) -> jax.Array:
        """Generator hidden states [.., width] -> float32 vocabulary logits [.., vocab]."""
        return self.generator.head(hidden, self.embeddings.word_embeddings)

    def mlm_logits(self, hidden: jax.Array) -> jax.Array:
        """`generator_logits`, under the name `EncoderOnlyMLMModel` calls."""
        return self.generator_logits(hidden)

    def discriminator_logits(self, hidden: jax.Array) -> jax.Array:
        """[b, s, d] -> float32 [b, s] "replaced" logits."""
        return self.discriminator_predictions(hidden)

    def __call__(
        self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
        token_type_ids: jax.Array | None = None, *, dropout_rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """The head's logits: discriminator [b, s] ("pretraining" and "discriminator"), generator
        [b, s, vocab], classification [b, labels], tagging [b, s, labels]."""
        hidden = self.encode(tokens, segment_ids, positions, token_type_ids, dropout_rngs=dropout_rngs)
        if self.head == "generator":
            return self.generator_logits(hidden)
        if self.head == "classification":
            return self.classifier(hidden, dropout_rngs)
        if self.head == "tagging":
            return self.tagger(self.kernels.dropout(hidden, self.config.dropout_rate, dropout_rngs), out_dtype=jnp.float32)
        return self.discriminator_logits(hidden)
