"""The trainer's view of a decoder-only network (GPT) over seqio's decoder features: causal LM and prefix LM."""

from __future__ import annotations

from collections.abc import Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5x_lite import decoding
from t5x_lite.adapters import prompt
from t5x_lite.models.base import BaseModel
from t5x_lite.networks.gpt import GPT, GPTConfig

gin.external_configurable(GPTConfig, module="t5x_lite")


@gin.configurable(module="t5x_lite")
class DecoderOnlyModel(BaseModel):
    """Causal LM (GPT): next-token loss over packed text (`bundled_lm`); on an inputs/targets task the
    seqio converter concatenates the two with loss on the targets only, and attention stays causal."""

    bidirectional_inputs = False

    def __init__(self, config: GPTConfig = gin.REQUIRED, label_smoothing: float = 0.0, z_loss: float = 0.0):
        super().__init__(config, label_smoothing=label_smoothing, z_loss=z_loss)

    @property
    def feature_converter_cls(self) -> type:
        import seqio

        return seqio.DecoderFeatureConverter

    def build_network(self, rngs: nnx.Rngs) -> GPT:
        return GPT(self.config, rngs=rngs)

    def network_logits(self, network: GPT, batch: Mapping[str, jax.Array], dropout_rngs: nnx.Rngs | None) -> jax.Array:
        """Logits aligned with `decoder_target_tokens`; a soft prompt's positions (before the row) are dropped."""
        batch, prompt_length = prompt.prompted_decoder_batch(network, batch)
        logits = network(
            batch["decoder_input_tokens"],
            decoder_segment_ids=batch.get("decoder_segment_ids"),
            decoder_positions=batch.get("decoder_positions"),
            decoder_causal_attention=batch.get("decoder_causal_attention") if self.bidirectional_inputs else None,
            dropout_rngs=dropout_rngs,
        )
        return logits[:, prompt_length:]

    def predict_features(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The prompt of each row: the decoder inputs marked by `decoder_causal_attention` (BOS + inputs),
        with the targets zeroed; a targets-only batch (no inputs) gets the BOS alone."""
        causal = batch.get("decoder_causal_attention")
        if causal is None:
            rows = len(batch["decoder_input_tokens"])
            return {"decoder_input_tokens": np.zeros((rows, 1), np.int32),
                    "decoder_causal_attention": np.ones((rows, 1), np.int32)}
        return {"decoder_input_tokens": np.where(causal > 0, batch["decoder_input_tokens"], 0),
                "decoder_causal_attention": causal}

    def predict_batch(
        self,
        network: GPT,
        batch: Mapping[str, jax.Array],
        *,
        max_decode_length: int,
        decode: decoding.DecodeConfig = decoding.GREEDY,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """Decodes the continuation [b, max_decode_length] (0 after EOS) of each row's prompt: the
        `decoder_input_tokens` where `decoder_causal_attention` is 1 (see `predict_features`).
        Prefills the prompts in one pass, then runs the cached `decode_step` in one `lax.while_loop`. A soft
        prompt (`t5x_lite.adapters.prompt`) is prefilled before each row's prompt."""
        batch, _ = prompt.prompted_decoder_batch(network, batch)
        prompts = batch["decoder_input_tokens"]
        lengths = jnp.sum(batch["decoder_causal_attention"] > 0, axis=-1)
        state = network.prefill(prompts, lengths, max_decode_length, bidirectional=self.bidirectional_inputs)
        return decoding.decode(network.decode_step, state, prompts.shape[0], max_decode_length, decode, rng)


@gin.configurable(module="t5x_lite")
class PrefixLMModel(DecoderOnlyModel):
    """Prefix-LM: the same network and parameters, with bidirectional attention over the inputs part
    (`bundled_prefix_lm`, or fine-tuning a GPT on a text-to-text task with loss on the targets only)."""

    bidirectional_inputs = True

    # Its own signature, so gin bindings of `DecoderOnlyModel` do not reach it through the parent's __init__.
    def __init__(self, config: GPTConfig = gin.REQUIRED, label_smoothing: float = 0.0, z_loss: float = 0.0):
        super().__init__(config, label_smoothing=label_smoothing, z_loss=z_loss)
