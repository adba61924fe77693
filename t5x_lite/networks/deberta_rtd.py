"""DeBERTa-v3 pre-training: a DeBERTa masked-LM generator and a DeBERTa discriminator that spots its replacements.

He, Gao, Chen (2023), "DeBERTaV3": ELECTRA's replaced-token detection on DeBERTa bodies, with the generator
as wide as the discriminator and half as deep, and gradient-disentangled embedding sharing (GDES): the
discriminator's word table is E_D = stop_gradient(E_G) + E_delta, where E_G is the generator's table (updated
by the MLM loss only) and E_delta starts at zeros (updated by the replaced-token loss only).

`DebertaRtd` is a `Deberta` (the discriminator, parameters named as `Deberta`'s) plus
  generator                  a `Deberta` with the MLM head (`Deberta.encode` + `Deberta.mlm_logits`)
  discriminator_predictions  dense, activation, dense -> 1 (ELECTRA's head: a "replaced" logit per token)
and, by `embedding_sharing`, the discriminator's `embeddings/word_embeddings`:
  "gdes"  E_G itself at `.../embedding` (one parameter with the generator's) and E_delta at `.../delta/embedding`
  "es"    E_G itself (ELECTRA's sharing: both losses update it)
  "nes"   its own table (no sharing)
Only the word table is shared; each model keeps its embedding layer norm (and absolute positions, if any).
A fine-tuning `Deberta` reads the discriminator from such a checkpoint with the tables merged
(`FINETUNE_DELTAS`: E_G + E_delta at `embeddings/word_embeddings/embedding`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from t5x_lite.networks.config_checks import ConfigError
from t5x_lite.networks.deberta import Deberta, DebertaConfig
from t5x_lite.networks.electra import DiscriminatorHead
from t5x_lite.nn import layers

SHARING = ("gdes", "es", "nes")
# A fine-tuning network's parameter -> the checkpoint parameter added to it (GDES's E_delta onto E_G).
FINETUNE_DELTAS = {"embeddings/word_embeddings/embedding": "embeddings/word_embeddings/delta/embedding"}


@dataclasses.dataclass(frozen=True)
class DebertaRtdConfig(DebertaConfig):
    """A `DebertaConfig` (the discriminator's) plus the generator's depth and the embedding sharing.

    `generator_num_layers` 0 means half the discriminator's layers (at least 1); the generator has the
    discriminator's width, heads and feed-forward size. `embedding_sharing`: one of `SHARING`.
    """

    generator_num_layers: int = 0
    embedding_sharing: str = "gdes"

    def __post_init__(self):
        super().__post_init__()
        if self.embedding_sharing not in SHARING:
            raise ConfigError(f"DebertaRtdConfig.embedding_sharing={self.embedding_sharing!r} is not one of {list(SHARING)}.")
        if self.generator_num_layers < 0:
            raise ConfigError(f"DebertaRtdConfig.generator_num_layers={self.generator_num_layers} must be >= 0 (0: half).")

    def discriminator_config(self) -> DebertaConfig:
        """The plain `DebertaConfig` of the discriminator."""
        return DebertaConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DebertaConfig)})

    def generator_config(self) -> DebertaConfig:
        """The generator: the discriminator's sizes with `generator_num_layers` layers."""
        layers_ = self.generator_num_layers or max(1, self.num_layers // 2)
        return dataclasses.replace(self.discriminator_config(), num_layers=layers_)


class GdesEmbed(nnx.Module):
    """The discriminator's word table under GDES: stop_gradient(E_G) + E_delta (E_delta zeros at init)."""

    def __init__(self, shared: layers.Embed, *, rngs: nnx.Rngs):
        vocab, width = shared.embedding.shape
        self.embedding = shared.embedding  # the generator's Param: one parameter, E_G
        self.delta = layers.Embed(vocab, width, kernels=shared.kernels, stddev=0.0, dtype=shared.dtype, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """[b, s, d] discriminator embeddings: the gradient reaches E_delta only."""
        shared = jax.lax.stop_gradient(jnp.take(self.embedding[...], ids, axis=0))
        return self.delta(ids) + shared.astype(self.delta.dtype)


class DebertaRtd(Deberta):
    """The DeBERTa-v3 pre-training network (see the module docstring); `encode` is the discriminator's."""

    def __init__(self, config: DebertaRtdConfig, *, rngs: nnx.Rngs):
        super().__init__(config.discriminator_config(), "none", rngs=rngs)
        self.generator = Deberta(config.generator_config(), "mlm", rngs=rngs)
        self.discriminator_predictions = DiscriminatorHead(self.config, rngs=rngs)
        shared = self.generator.embeddings.word_embeddings
        if config.embedding_sharing == "gdes":
            self.embeddings.word_embeddings = GdesEmbed(shared, rngs=rngs)
        elif config.embedding_sharing == "es":
            self.embeddings.word_embeddings = shared

    def generator_hidden(
        self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
        token_type_ids: jax.Array | None = None, *, dropout_rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """[b, s] tokens -> the states the generator's MLM head reads [b, s, d_model] (its enhanced mask
        decoder's output when the config turns EMD on)."""
        return self.generator.mlm_states(tokens, segment_ids, positions, token_type_ids, dropout_rngs=dropout_rngs)

    def generator_logits(self, hidden: jax.Array) -> jax.Array:
        """Generator hidden states -> float32 vocabulary logits (tied to E_G)."""
        return self.generator.mlm_logits(hidden)

    def discriminator_logits(self, hidden: jax.Array) -> jax.Array:
        """[b, s, d] discriminator hidden states -> float32 [b, s] "replaced" logits."""
        return self.discriminator_predictions(hidden)

    def __call__(
        self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
        token_type_ids: jax.Array | None = None, *, dropout_rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """The discriminator's [b, s] "replaced" logits of `tokens` as they are."""
        return self.discriminator_logits(self.encode(tokens, segment_ids, positions, token_type_ids, dropout_rngs=dropout_rngs))


def merge_embedding_delta(params: dict) -> dict:
    """Nested params with each `FINETUNE_DELTAS` delta they hold added onto its target and dropped: the
    discriminator as a plain `Deberta` reads it (E_G + E_delta). Params without a delta come back as they are."""
    flat = traverse_util.flatten_dict(params)
    for target, delta in FINETUNE_DELTAS.items():
        target_key, delta_key = tuple(target.split("/")), tuple(delta.split("/"))
        if delta_key in flat:
            flat[target_key] = flat[target_key] + flat.pop(delta_key)
    return traverse_util.unflatten_dict(flat)
