"""DeBERTa-v2/v3: an encoder-only transformer with disentangled attention over relative positions.

The layout is Hugging Face's `DebertaV2*`, so its weights map one to one (`t5x_lite.hf.deberta`): word
embeddings (+ learned absolute positions when `position_biased_input`, + token types when
`type_vocab_size` > 0), layer norm; post-layer-norm blocks whose attention adds content-to-position and
position-to-content scores from one shared relative-embedding table (`t5x_lite.nn.disentangled`,
layer-normed when `norm_rel_ebd`); heads: masked LM (dense, GELU, layer norm, tied logits + bias),
classification (DeBERTa's context pooler: dense + GELU on [CLS], then a classifier), tagging.
With `enhanced_mask_decoder` the masked-LM head reads the paper's enhanced mask decoder instead of the last
layer (`Deberta.mlm_states`); the other heads always read the plain encoder output.
Not supported: the convolution layer of some v2 checkpoints and a factorised `embedding_size`.

Packed rows work as in BERT: segment ids keep segments apart and `positions` restart in each segment
(relative distances are taken between positions). Token id 0 is padding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_lite import partitioning
from t5x_lite.networks.bert import POOLED_AXES, EncoderHeadLogits, MlmHead, dense_of, layer_norm_of
from t5x_lite.networks.config_checks import check_config
from t5x_lite.nn import disentangled, kernels, layers, stacks

HEADS = ("mlm", "classification", "tagging", "none")


@dataclasses.dataclass(frozen=True)
class DebertaConfig:
    """Hyperparameters of a DeBERTa network; defaults are DeBERTa-v3-base."""

    vocab_size: int = 128100
    d_model: int = 768
    num_heads: int = 12
    head_dim: int = 64
    d_ff: int = 3072
    num_layers: int = 12
    max_position_embeddings: int = 512
    type_vocab_size: int = 0  # 0: no token-type embeddings (v3)
    position_biased_input: bool = False  # add learned absolute positions to the embeddings (v3: no)
    position_buckets: int = 256  # log-bucketed relative distances; <= 0: raw distances
    max_relative_positions: int = -1  # < 1: max_position_embeddings
    share_att_key: bool = True  # relative embeddings go through the content key/query projections
    pos_att_type: tuple[str, ...] = ("p2c", "c2p")
    norm_rel_ebd: bool = True  # layer norm on the relative-embedding table ("layer_norm" in HF)
    # The paper's enhanced mask decoder for masked-LM pre-training (absolute positions added just before the MLM
    # head, the last layer reapplied `emd_steps` times); off: transformers' DebertaV2ForMaskedLM, which has none.
    enhanced_mask_decoder: bool = False
    emd_steps: int = 2
    dropout_rate: float = 0.0
    layer_norm_eps: float = 1e-7
    activation: str = "gelu"  # "gelu" (erf) or "gelu_tanh"; the pooler uses it too
    initializer_range: float = 0.02
    num_labels: int = 2
    dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = False
    attention_impl: str = "auto"
    kernels: str = "auto"

    def __post_init__(self):
        if self.activation not in ("gelu", "gelu_tanh"):
            raise ValueError(f"DebertaConfig.activation={self.activation!r} is not supported; use 'gelu' or 'gelu_tanh'.")
        object.__setattr__(self, "pos_att_type", tuple(self.pos_att_type))  # a gin list compares as the tuple
        unknown = [t for t in self.pos_att_type if t not in disentangled.POSITION_TERMS]
        if unknown:
            raise ValueError(f"DebertaConfig.pos_att_type has {unknown}; use terms of {list(disentangled.POSITION_TERMS)}.")
        check_config(self, positive=("num_labels", "num_layers", "num_heads", "emd_steps"))

    @property
    def relative_span(self) -> int:
        """Half the rows of the relative-embedding table (HF's `pos_ebd_size`)."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative

    @property
    def max_relative(self) -> int:
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings


class Embeddings(nnx.Module):
    """Word (+ absolute position, + token-type) embeddings, layer norm, padding zeroed, dropout."""

    def __init__(self, config: DebertaConfig, *, rngs: nnx.Rngs):
        std, dtype = config.initializer_range, config.dtype
        self.kernels = kernels.resolve(config.kernels)
        self.word_embeddings = layers.Embed(
            config.vocab_size, config.d_model, kernels=self.kernels, stddev=std, dtype=dtype, rngs=rngs
        )
        self.position_embeddings = layers.PositionEmbed(
            config.max_position_embeddings, config.d_model, stddev=std, dtype=dtype, rngs=rngs
        ) if config.position_biased_input else None
        self.token_type_embeddings = layers.Embed(
            config.type_vocab_size, config.d_model, kernels=self.kernels, stddev=std, dtype=dtype, rngs=rngs
        ) if config.type_vocab_size > 0 else None
        self.layer_norm = layer_norm_of(config)
        self.dropout_rate = config.dropout_rate

    def __call__(self, tokens: jax.Array, positions: jax.Array, token_type_ids: jax.Array, real: jax.Array,
                 dropout_rngs: nnx.Rngs | None) -> jax.Array:
        x = self.word_embeddings(tokens)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(positions)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings(token_type_ids)
        x = self.layer_norm(x) * real[..., None].astype(x.dtype)
        return self.kernels.dropout(x, self.dropout_rate, dropout_rngs)


class DebertaLayer(nnx.Module):
    """Post-norm block: x = LN(x + disentangled attention(x)); x = LN(x + mlp(x))."""

    def __init__(self, config: DebertaConfig, *, rngs: nnx.Rngs):
        self.kernels = kernels.resolve(config.kernels)
        self.attention = disentangled.DisentangledSelfAttention(
            config.d_model, config.num_heads, config.head_dim, pos_att_type=config.pos_att_type,
            share_att_key=config.share_att_key, kernels=self.kernels, dropout_rate=config.dropout_rate,
            implementation=config.attention_impl, dtype=config.dtype, rngs=rngs,
        )
        self.attention_norm = layer_norm_of(config)
        self.mlp = layers.MlpBlock(
            config.d_model, config.d_ff, kernels=self.kernels, activation=config.activation, use_bias=True,
            dtype=config.dtype, rngs=rngs,
        )
        self.mlp_norm = layer_norm_of(config)
        self.dropout_rate = config.dropout_rate

    def __call__(self, x: jax.Array, bias: jax.Array, rel_index: jax.Array, rel_embeddings: jax.Array,
                 dropout_rngs: nnx.Rngs | None, query_states: jax.Array | None = None) -> jax.Array:
        """[b, s, d_model] -> [b, s, d_model]; with `query_states` the attention's queries and its residual come
        from them and only its keys and values from `x` (the enhanced mask decoder)."""
        query = x if query_states is None else query_states
        h = self.attention(x, bias, rel_index, rel_embeddings, query_states=query_states, dropout_rngs=dropout_rngs)
        x = self.attention_norm(query + self.kernels.dropout(h, self.dropout_rate, dropout_rngs))
        h = self.mlp(x)
        return self.mlp_norm(x + self.kernels.dropout(h, self.dropout_rate, dropout_rngs))


class Deberta(EncoderHeadLogits, nnx.Module):
    """The DeBERTa network; `head` as `Bert`'s: "mlm", "classification", "tagging" or "none"."""

    def __init__(self, config: DebertaConfig, head: str = "mlm", *, rngs: nnx.Rngs):
        if head not in HEADS:
            raise ValueError(f"Unknown DeBERTa head {head!r}; use one of {list(HEADS)}.")
        self.config = config
        self.head = head
        self.kernels = kernels.resolve(config.kernels)
        self.embeddings = Embeddings(config, rngs=rngs)
        self.rel_embeddings = layers.PositionEmbed(
            2 * config.relative_span, config.d_model, stddev=config.initializer_range, dtype=config.dtype, rngs=rngs
        )
        self.rel_norm = layer_norm_of(config) if config.norm_rel_ebd else None
        self.layers = stacks.make_layers(
            lambda rngs: DebertaLayer(config, rngs=rngs), config.num_layers, config.scan_layers, rngs
        )
        self.mlm = MlmHead(config, rngs=rngs) if head == "mlm" else None
        self.pooler = dense_of(config, config.d_model, ("embed", "mlp"), rngs) if head == "classification" else None
        self.classifier = dense_of(config, config.num_labels, ("embed", "classes"), rngs) if head == "classification" else None
        self.tagger = dense_of(config, config.num_labels, ("embed", "classes"), rngs) if head == "tagging" else None
        # The enhanced mask decoder's absolute positions: MLM only, so a fine-tuned head starts without them.
        self.emd_positions = layers.PositionEmbed(
            config.max_position_embeddings, config.d_model, stddev=config.initializer_range, dtype=config.dtype,
            rngs=rngs,
        ) if head == "mlm" and config.enhanced_mask_decoder else None

    def relative_table(self, dropout_rngs: nnx.Rngs | None) -> jax.Array:
        """The [2 * span, d_model] relative-embedding table every layer reads (normed, dropped out)."""
        table = self.rel_embeddings.embedding[...].astype(self.rel_embeddings.dtype)
        if self.rel_norm is not None:
            table = self.rel_norm(table)
        return self.kernels.dropout(table, self.config.dropout_rate, dropout_rngs)

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
        """[b, s] tokens -> [b, s, d_model] last hidden states (+ every layer's with `return_hidden_states`),
        as `Bert.encode`."""
        config = self.config
        x, _, (bias, rel_index, table) = self._embed(tokens, segment_ids, positions, token_type_ids, dropout_rngs)
        if not return_hidden_states:
            return stacks.apply_layers(self.layers, x, (bias, rel_index, table), dropout_rngs,
                                       scan=config.scan_layers, remat_policy=config.remat_policy)

        def layer_output(layer: DebertaLayer, x: jax.Array, i) -> tuple[jax.Array, jax.Array]:
            x = layer(x, bias, rel_index, table, dropout_rngs)
            return x, x

        last, outputs = stacks.each_layer(self.layers, layer_output, x, scan=config.scan_layers)
        return last, [x, *stacks.per_layer(outputs)]

    def _embed(
        self, tokens: jax.Array, segment_ids: jax.Array | None, positions: jax.Array | None,
        token_type_ids: jax.Array | None, dropout_rngs: nnx.Rngs | None,
    ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
        """(embeddings [b, s, d_model], positions [b, s], the arguments every layer takes after its input:
        mask bias, relative index, relative table)."""
        config = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(tokens)
        real = tokens != 0 if segment_ids is None else segment_ids > 0
        bias = layers.mask_to_bias(layers.encoder_mask(tokens, segment_ids))
        rel_index = disentangled.relative_index(positions, config.relative_span, config.position_buckets,
                                                config.max_relative)
        x = self.embeddings(tokens, positions, token_type_ids, real, dropout_rngs)
        return x, positions, (bias, rel_index, self.relative_table(dropout_rngs))

    def mlm_states(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        dropout_rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """[b, s, d_model] states the masked-LM head reads: the enhanced mask decoder's output when the config
        turns it on, else `encode`'s last hidden states."""
        if self.emd_positions is None:
            return self.encode(tokens, segment_ids, positions, token_type_ids, dropout_rngs=dropout_rngs)
        config = self.config
        x, positions, args = self._embed(tokens, segment_ids, positions, token_type_ids, dropout_rngs)
        below, last = self._split_last_layer()
        hidden = stacks.apply_layers(below, x, args, dropout_rngs, scan=config.scan_layers,
                                     remat_policy=config.remat_policy)
        return self.enhanced_mask_decoder(hidden, positions, last, args, dropout_rngs)

    def enhanced_mask_decoder(
        self, hidden: jax.Array, positions: jax.Array, last_layer: DebertaLayer, layer_args: tuple,
        dropout_rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """DeBERTa's EMD (He et al., 2021, section 3.3): the queries start as `hidden` (the last layer's input)
        plus absolute position embeddings; `last_layer` then runs `emd_steps` times with its keys and values from
        `hidden`, each output the next queries. The encoder sees relative positions only, so this is where the MLM
        head learns absolute ones."""
        query = hidden + self.emd_positions(positions)
        for _ in range(self.config.emd_steps):
            query = last_layer(hidden, *layer_args, dropout_rngs, query_states=query)
        return query

    def _split_last_layer(self) -> tuple[nnx.Module | list[DebertaLayer], DebertaLayer]:
        """(the layers below the last, the last layer), sharing the stack's parameters, in its layout."""
        if not self.config.scan_layers:
            *below, last = self.layers
            return below, last
        graphdef, state = nnx.split(self.layers)
        below = nnx.merge(graphdef, jax.tree.map(lambda p: p[:-1], state))
        return below, nnx.merge(graphdef, jax.tree.map(lambda p: p[-1], state))

    def mlm_logits(self, hidden: jax.Array) -> jax.Array:
        """[b, s, d] -> float32 [b, s, vocab] masked-LM logits."""
        if self.mlm is None:
            raise ValueError(f"This DeBERTa network has the {self.head!r} head, not the masked-LM head.")
        return self.mlm(hidden, self.embeddings.word_embeddings)

    def pooled(self, hidden: jax.Array) -> jax.Array:
        """DeBERTa's context pooler: activation(dense(hidden at position 0)), [b, d]."""
        if self.pooler is None:
            raise ValueError(f"This DeBERTa network ({self.head!r} head) has no pooler.")
        h = partitioning.constrain(self.pooler(hidden[:, 0]), "pooled", POOLED_AXES)
        return jax.nn.gelu(h, approximate=self.config.activation == "gelu_tanh")

    def __call__(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        dropout_rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """The logits of the network's head (the "none" head returns the last hidden states); the masked-LM
        head reads `mlm_states`."""
        if self.head == "mlm":
            return self.mlm_logits(
                self.mlm_states(tokens, segment_ids, positions, token_type_ids, dropout_rngs=dropout_rngs))
        hidden = self.encode(tokens, segment_ids, positions, token_type_ids, dropout_rngs=dropout_rngs)
        if self.head == "classification":
            return self.classification_logits(hidden, dropout_rngs)
        if self.head == "tagging":
            return self.tagging_logits(hidden, dropout_rngs)
        return hidden
