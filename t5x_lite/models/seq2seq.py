"""The trainer's view of an encoder-decoder (T5, BART, T5Gemma): packed EncDec batches, loss on the decoder."""

from __future__ import annotations

from collections.abc import Mapping

import gin
import jax
from flax import nnx

from t5x_lite import decoding
from t5x_lite.adapters import prompt
from t5x_lite.models.base import BaseModel
from t5x_lite.networks.bart import Bart, BartConfig
from t5x_lite.networks.config_checks import ConfigError
from t5x_lite.networks.t5 import T5, T5Config
from t5x_lite.networks.t5gemma import T5Gemma, T5GemmaConfig

NETWORKS = {T5Config: T5, BartConfig: Bart, T5GemmaConfig: T5Gemma}

gin.external_configurable(T5Config, module="t5x_lite")
gin.external_configurable(BartConfig, module="t5x_lite")
gin.external_configurable(T5GemmaConfig, module="t5x_lite")


@gin.configurable(module="t5x_lite")
class EncoderDecoderModel(BaseModel):
    """An encoder-decoder trained on seqio's EncDec features: the network (T5 for a `T5Config`, BART for
    a `BartConfig`, T5Gemma for a `T5GemmaConfig`) reads `encoder_input_tokens` and predicts
    `decoder_target_tokens` teacher-forced. `reading_orders` carries the objective space's reading orders (R)
    to the encoder: its batches get `encoder_attention_rank` (`RankedEncDecFeatureConverter`; all zeros,
    bidirectional, for ordinary tasks)."""

    def __init__(
        self, config: T5Config | BartConfig | T5GemmaConfig = gin.REQUIRED, label_smoothing: float = 0.0,
        z_loss: float = 0.0, reading_orders: bool = False,
    ):
        if type(config) not in NETWORKS:
            raise ConfigError(
                f"{type(self).__name__} takes a T5Config, BartConfig or T5GemmaConfig, got {type(config).__name__}."
            )
        super().__init__(config, label_smoothing=label_smoothing, z_loss=z_loss)
        self.reading_orders = reading_orders

    @property
    def feature_converter_cls(self) -> type:
        import seqio

        from t5x_lite.data import feature_converters

        return feature_converters.RankedEncDecFeatureConverter if self.reading_orders else seqio.EncDecFeatureConverter

    def build_network(self, rngs: nnx.Rngs) -> T5 | Bart | T5Gemma:
        return NETWORKS[type(self.config)](self.config, rngs=rngs)

    def network_logits(
        self, network: T5 | Bart | T5Gemma, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None
    ) -> jax.Array:
        batch = prompt.prompted_encoder_batch(network, batch)
        return network(
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            encoder_segment_ids=batch.get("encoder_segment_ids"),
            decoder_segment_ids=batch.get("decoder_segment_ids"),
            encoder_positions=batch.get("encoder_positions"),
            decoder_positions=batch.get("decoder_positions"),
            dropout_rngs=dropout_rngs,
            encoder_attention_rank=batch.get("encoder_attention_rank"),
        )

    def predict_batch(
        self,
        network: T5 | Bart | T5Gemma,
        batch: Mapping[str, jax.Array],
        *,
        max_decode_length: int,
        decode: decoding.DecodeConfig = decoding.GREEDY,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """Decodes [b, max_decode_length] tokens (0 after EOS) from unpacked `encoder_input_tokens`:
        encodes once, then runs the cached `decode_step` in one `lax.while_loop` (`decoding.decode`). A soft
        prompt (`t5x_lite.adapters.prompt`) is encoded before each row's inputs."""
        inputs = prompt.prompted_encoder_batch(network, batch)["encoder_input_tokens"]
        state = network.init_decode_state(network.encode(inputs), inputs > 0, max_decode_length)
        return decoding.decode(network.decode_step, state, inputs.shape[0], max_decode_length, decode, rng)


@gin.configurable(module="t5x_lite")
class BartModel(EncoderDecoderModel):
    """`EncoderDecoderModel` under BART's gin name (`bundled_bart_denoising`: the decoder reconstructs the
    original text from the noised inputs)."""

    # Its own signature, so gin bindings of `EncoderDecoderModel` do not reach it through the parent's __init__.
    def __init__(self, config: BartConfig = gin.REQUIRED, label_smoothing: float = 0.0, z_loss: float = 0.0):
        super().__init__(config, label_smoothing=label_smoothing, z_loss=z_loss)
