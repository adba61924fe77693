"""GPT-2 <-> Hugging Face `GPT2LMHeadModel` (tied output layer).

The tensor mapping lives beside the network (`t5x_lite.models.decoder_only.params_from_hf` /
`params_to_hf`); this module adds `config.json` both ways. GPT-2 options that change the function
and that our network lacks (unscaled or layer-scaled attention, cross-attention, an untied head) are
refused by name. `GPTConfig.dropout_rate` takes `resid_pdrop` (GPT-2 uses one rate for all three).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from t5x_lite.hf import registry
from t5x_lite.models import decoder_only, stacks
from t5x_lite.models.decoder_only import DecoderOnlyModel, GPTConfig

# HF `activation_function` -> ours, and ours -> the name written on export.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
EXPORT_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
# config.json keys that would make a GPT-2 compute something else than our network.
_UNSUPPORTED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}


def _has_untied_head(weights: Mapping[str, np.ndarray]) -> bool:
    wte = next((n for n in ("transformer.wte.weight", "wte.weight") if n in weights), None)
    return "lm_head.weight" in weights and wte is not None and not np.array_equal(weights["lm_head.weight"], weights[wte])


def config_from_hf(hf_config: Mapping, weights: Mapping[str, np.ndarray]) -> GPTConfig:
    """Our `GPTConfig` for a HF GPT-2 `config.json` (HF's defaults for absent keys)."""
    for key, supported in _UNSUPPORTED.items():
        if hf_config.get(key, supported) != supported:
            raise ValueError(f"config.json has {key}={hf_config[key]!r}; t5x_lite's GPT supports only {supported!r}.")
    activation = hf_config.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"config.json has activation_function={activation!r}; t5x_lite's GPT supports {sorted(ACTIVATIONS)}."
        )
    d_model, heads = hf_config.get("n_embd", 768), hf_config.get("n_head", 12)
    if d_model % heads:
        raise ValueError(f"config.json has n_embd={d_model}, not a multiple of n_head={heads}.")
    if _has_untied_head(weights):
        raise ValueError(
            "The checkpoint has an lm_head.weight that differs from transformer.wte.weight; t5x_lite's GPT ties "
            "its output layer to the token embedding, so it cannot load an untied head."
        )
    return GPTConfig(
        vocab_size=hf_config.get("vocab_size", 50257),
        d_model=d_model,
        num_heads=heads,
        head_dim=d_model // heads,
        d_ff=hf_config.get("n_inner") or 4 * d_model,
        num_layers=hf_config.get("n_layer", 12),
        max_position_embeddings=hf_config.get("n_positions", 1024),
        dropout_rate=float(hf_config.get("resid_pdrop", 0.1)),
        activation=ACTIVATIONS[activation],
        layer_norm_epsilon=float(hf_config.get("layer_norm_epsilon", 1e-5)),
    )


def config_to_hf(config: GPTConfig) -> dict:
    """A `config.json` that transformers reads as this `GPT2LMHeadModel` (ids: see `write_pretrained`)."""
    if config.num_heads * config.head_dim != config.d_model:
        raise ValueError(
            f"Hugging Face GPT-2 needs num_heads * head_dim == d_model; this GPTConfig has {config.num_heads} * "
            f"{config.head_dim} != {config.d_model}."
        )
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_embd": config.d_model,
        "n_head": config.num_heads,
        "n_inner": config.d_ff,
        "n_layer": config.num_layers,
        "n_positions": config.max_position_embeddings,
        "activation_function": EXPORT_ACTIVATIONS[config.activation],
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "resid_pdrop": config.dropout_rate,
        "embd_pdrop": config.dropout_rate,
        "attn_pdrop": config.dropout_rate,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }


FAMILY = registry.register(
    registry.Family(
        name="gpt2",
        model_types=("gpt2",),
        config_class=GPTConfig,
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        params_from_hf=lambda weights, hf_config, config: decoder_only.params_from_hf(weights, config),
        params_to_hf=decoder_only.params_to_hf,
        build_model=DecoderOnlyModel,
        checkpoint_fields=(
            "vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_layers", "max_position_embeddings",
            "activation", "layer_norm_epsilon",
        ),
        stack_layers=stacks.stack_layer_params,
        unstack_layers=stacks.unstack_layer_params,
        model_names=("DecoderOnlyModel", "PrefixLMModel"),
    )
)
