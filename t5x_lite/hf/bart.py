"""BART <-> Hugging Face `BartForConditionalGeneration` (shared, tied embedding; `final_logits_bias`).

The tensor mapping lives beside the network (`t5x_lite.models.bart.params_from_hf` / `params_to_hf`);
this module adds `config.json` both ways. Our BART has one head count and one feed-forward width for
both stacks and ties the output layer, so checkpoints that differ (or that use mBART's pre-norm
layers) are refused by name.

Token ids: t5x_lite pads with 0 and starts decoding from 0 (seqio's conventions). With a BART
tokenizer, id 0 is `<s>`, which the vocabulary never produces for text, so `<pad>` (1) goes unused
and decoding starts from `<s>` where HF's BART starts from `decoder_start_token_id` (`</s>`, 2): the
logits of the same tokens agree exactly, but a checkpoint fine-tuned by HF expects its own start, so
fine-tune it here before decoding with it. Export writes t5x_lite's ids (see `write_pretrained`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from t5x_lite.hf import registry
from t5x_lite.models import bart, stacks
from t5x_lite.models.bart import BartConfig, BartModel

# HF `activation_function` -> ours, and ours -> the name written on export.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
# Keys of older (fairseq-converted) config.json files that would change the network.
_UNSUPPORTED = {"normalize_before": False, "add_final_layer_norm": False, "normalize_embedding": True}


def _same_in_both_stacks(hf_config: Mapping, encoder_key: str, decoder_key: str, default: int) -> int:
    encoder, decoder = hf_config.get(encoder_key, default), hf_config.get(decoder_key, default)
    if encoder != decoder:
        raise ValueError(
            f"config.json has {encoder_key}={encoder} but {decoder_key}={decoder}; t5x_lite's BART uses one value "
            "for both stacks."
        )
    return encoder


def _has_untied_head(weights: Mapping[str, np.ndarray]) -> bool:
    shared = next((n for n in ("model.shared.weight", "shared.weight") if n in weights), None)
    return "lm_head.weight" in weights and shared is not None and not np.array_equal(
        weights["lm_head.weight"], weights[shared]
    )


def config_from_hf(hf_config: Mapping, weights: Mapping[str, np.ndarray]) -> BartConfig:
    """Our `BartConfig` for a HF BART `config.json` (HF's defaults for absent keys)."""
    for key, supported in _UNSUPPORTED.items():
        if hf_config.get(key, supported) != supported:
            raise ValueError(f"config.json has {key}={hf_config[key]!r}; t5x_lite's BART supports only {supported!r}.")
    activation = hf_config.get("activation_function", "gelu")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"config.json has activation_function={activation!r}; t5x_lite's BART supports {sorted(ACTIVATIONS)}."
        )
    heads = _same_in_both_stacks(hf_config, "encoder_attention_heads", "decoder_attention_heads", 16)
    d_ff = _same_in_both_stacks(hf_config, "encoder_ffn_dim", "decoder_ffn_dim", 4096)
    d_model = hf_config.get("d_model", 1024)
    if d_model % heads:
        raise ValueError(f"config.json has d_model={d_model}, not a multiple of the {heads} attention heads.")
    if _has_untied_head(weights):
        raise ValueError(
            "The checkpoint has an lm_head.weight that differs from model.shared.weight; t5x_lite's BART ties its "
            "output layer to the shared embedding, so it cannot load an untied head."
        )
    return BartConfig(
        vocab_size=hf_config.get("vocab_size", 50265),
        d_model=d_model,
        num_heads=heads,
        head_dim=d_model // heads,
        d_ff=d_ff,
        num_encoder_layers=hf_config.get("encoder_layers", 12),
        num_decoder_layers=hf_config.get("decoder_layers", 12),
        max_position_embeddings=hf_config.get("max_position_embeddings", 1024),
        dropout_rate=float(hf_config.get("dropout", 0.1)),
        attention_dropout_rate=float(hf_config.get("attention_dropout", 0.0)),
        activation_dropout_rate=float(hf_config.get("activation_dropout", 0.0)),
        activation=ACTIVATIONS[activation],
        scale_embedding=bool(hf_config.get("scale_embedding", False)),
    )


def config_to_hf(config: BartConfig) -> dict:
    """A `config.json` that transformers reads as this `BartForConditionalGeneration` (ids: see
    `write_pretrained`; no forced EOS, which t5x_lite's decoding does not do either)."""
    if config.num_heads * config.head_dim != config.d_model:
        raise ValueError(
            f"Hugging Face BART needs num_heads * head_dim == d_model; this BartConfig has {config.num_heads} * "
            f"{config.head_dim} != {config.d_model}."
        )
    if config.layer_norm_epsilon != 1e-5:
        raise ValueError(
            f"Hugging Face BART's layer norms use epsilon 1e-5; this BartConfig has {config.layer_norm_epsilon}."
        )
    return {
        "architectures": ["BartForConditionalGeneration"],
        "model_type": "bart",
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "encoder_layers": config.num_encoder_layers,
        "decoder_layers": config.num_decoder_layers,
        "encoder_attention_heads": config.num_heads,
        "decoder_attention_heads": config.num_heads,
        "encoder_ffn_dim": config.d_ff,
        "decoder_ffn_dim": config.d_ff,
        "max_position_embeddings": config.max_position_embeddings,
        "activation_function": EXPORT_ACTIVATIONS[config.activation],
        "dropout": config.dropout_rate,
        "attention_dropout": config.attention_dropout_rate,
        "activation_dropout": config.activation_dropout_rate,
        "scale_embedding": config.scale_embedding,
        "tie_word_embeddings": True,
        "is_encoder_decoder": True,
        "pad_token_id": 0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "forced_eos_token_id": None,
    }


FAMILY = registry.register(
    registry.Family(
        name="bart",
        model_types=("bart",),
        config_class=BartConfig,
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        params_from_hf=lambda weights, hf_config, config: bart.params_from_hf(weights, config),
        params_to_hf=bart.params_to_hf,
        build_model=BartModel,
        checkpoint_fields=(
            "vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_encoder_layers", "num_decoder_layers",
            "max_position_embeddings", "activation", "scale_embedding", "layer_norm_epsilon",
        ),
        stack_layers=stacks.stack_layer_params,
        unstack_layers=stacks.unstack_layer_params,
        model_names=("BartModel",),
    )
)
