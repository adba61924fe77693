"""The trainer's view of an encoder-decoder (T5, BART, T5Gemma): packed EncDec batches, loss on the decoder."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

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
    bidirectional, for ordinary tasks). `decoder_start_id` is the id the decoder reads first, in training
    batches (the feature converter's `bos_id`) and in every decoding method alike: 0 (seqio's, = the pad id)
    unless the checkpoint was trained from another (T5Gemma's BOS 2; `t5x_lite.hf` imports it)."""

    def __init__(
        self, config: T5Config | BartConfig | T5GemmaConfig = gin.REQUIRED, label_smoothing: float = 0.0,
        z_loss: float = 0.0, reading_orders: bool = False, decoder_start_id: int = 0,
    ):
        if type(config) not in NETWORKS:
            raise ConfigError(
                f"{type(self).__name__} takes a T5Config, BartConfig or T5GemmaConfig, got {type(config).__name__}."
            )
        super().__init__(config, label_smoothing=label_smoothing, z_loss=z_loss)
        self.reading_orders = reading_orders
        self.decoder_start_id = checked_start_id(type(self).__name__, decoder_start_id, config)

    @property
    def feature_converter_cls(self) -> Callable[..., object]:
        """seqio's encoder-decoder converter (ranked with `reading_orders`) whose decoder inputs start with
        `decoder_start_id`; called like the class (`feature_converter_cls(pack=False)`)."""
        import seqio

        from t5x_lite.data import feature_converters

        cls = feature_converters.RankedEncDecFeatureConverter if self.reading_orders else seqio.EncDecFeatureConverter
        return functools.partial(cls, bos_id=self.decoder_start_id)

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
        prompt (`t5x_lite.adapters.prompt`) is encoded before each row's inputs. Every method starts from
        `decoder_start_id` (it replaces `decode.start_id`), as the training batches do."""
        inputs = prompt.prompted_encoder_batch(network, batch)["encoder_input_tokens"]
        state = network.init_decode_state(network.encode(inputs), inputs > 0, max_decode_length)
        decode = dataclasses.replace(decode, start_id=self.decoder_start_id)
        return decoding.decode(network.decode_step, state, inputs.shape[0], max_decode_length, decode, rng)


@gin.configurable(module="t5x_lite")
class BartModel(EncoderDecoderModel):
    """`EncoderDecoderModel` under BART's gin name (`bundled_bart_denoising`: the decoder reconstructs the
    original text from the noised inputs)."""

    # Its own signature, so gin bindings of `EncoderDecoderModel` do not reach it through the parent's __init__.
    def __init__(
        self, config: BartConfig = gin.REQUIRED, label_smoothing: float = 0.0, z_loss: float = 0.0,
        decoder_start_id: int = 0,
    ):
        super().__init__(config, label_smoothing=label_smoothing, z_loss=z_loss, decoder_start_id=decoder_start_id)


def checked_start_id(model_name: str, start_id: int, config: T5Config | BartConfig | T5GemmaConfig) -> int:
    """`start_id` if it is a token id of `config`'s vocabulary; else a ConfigError naming the setting."""
    if isinstance(start_id, bool) or not isinstance(start_id, int) or not 0 <= start_id < config.vocab_size:
        raise ConfigError(
            f"{model_name}.decoder_start_id={start_id!r} must be a token id in [0, {config.vocab_size}) "
            f"({type(config).__name__}.vocab_size={config.vocab_size})."
        )
    return start_id
