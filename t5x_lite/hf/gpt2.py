"""GPT-2 <-> Hugging Face `GPT2LMHeadModel` (tied output layer).

`config.json` both ways and the tensor map. GPT-2 options that change the function and that our
network lacks (unscaled or layer-scaled attention, cross-attention, an untied head) are refused by
name. `GPTConfig.dropout_rate` takes `resid_pdrop` (GPT-2 uses one rate for all three).

HF's Conv1D weights are [in, out] like our kernels. Special cases: the fused `c_attn` ([e, 3e] and
[3e]) is split into query, key and value thirds (read under the names `...c_attn[query].weight` etc.)
and fused again on export; a `vocab_size` above the checkpoint's pads `wte` with zero rows.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping

import numpy as np

from t5x_lite.hf import registry, tensor_map
from t5x_lite.models.causal import DecoderOnlyModel
from t5x_lite.networks.gpt import GPT, GPTConfig

# HF `activation_function` -> ours, and ours -> the name written on export.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
EXPORT_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
# config.json keys (-> the one value we support) that would make a GPT-2 compute something else than ours.
SUPPORTED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
# HF tensors that carry no parameters of their own: the tied head and old causal-mask buffers.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
QKV = ("query", "key", "value")


def config_from_hf(hf_config: Mapping, weights: Mapping[str, np.ndarray]) -> GPTConfig:
    """Our `GPTConfig` for a HF GPT-2 `config.json` (HF's defaults for absent keys)."""
    tensor_map.check_tied_head(weights, ("transformer.wte.weight", "wte.weight"), "GPT")
    registry.check_supported(hf_config, SUPPORTED, "GPT")
    activation = registry.translate(hf_config, "activation_function", "gelu_new", ACTIVATIONS, "GPT")
    d_model, heads = hf_config.get("n_embd", 768), hf_config.get("n_head", 12)
    return GPTConfig(
        vocab_size=hf_config.get("vocab_size", 50257),
        d_model=d_model,
        num_heads=heads,
        head_dim=registry.head_dim(d_model, heads, "n_embd"),
        d_ff=hf_config.get("n_inner") or 4 * d_model,
        num_layers=hf_config.get("n_layer", 12),
        max_position_embeddings=hf_config.get("n_positions", 1024),
        dropout_rate=float(hf_config.get("resid_pdrop", 0.1)),
        activation=activation,
        layer_norm_epsilon=float(hf_config.get("layer_norm_epsilon", 1e-5)),
    )


def config_to_hf(config: GPTConfig) -> dict:
    """A `config.json` that transformers reads as this `GPT2LMHeadModel` (ids: see `write_pretrained`)."""
    registry.check_heads_span_d_model(config, "GPT-2")
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


def _entries(config: GPTConfig) -> list[tensor_map.Entry]:
    """The tensor map (names without `transformer.`; `c_attn` as its thirds `c_attn[query]` etc.)."""
    entries = [("wte.weight", ("token_embedder", "embedding"), "same"),
               ("wpe.weight", ("position_embedder", "embedding"), "same"),
               *tensor_map.norm("ln_f", ("final_layer_norm",))]
    for i in range(config.num_layers):
        hf, ours = f"h.{i}", ("layers", i)
        for name in QKV:
            entries += tensor_map.dense(f"{hf}.attn.c_attn[{name}]", (*ours, "attention", name), "conv_qkv", "heads")
        entries += tensor_map.dense(f"{hf}.attn.c_proj", (*ours, "attention", "out"), "conv_out")
        entries += tensor_map.norm(f"{hf}.ln_1", (*ours, "pre_attention_layer_norm"))
        entries += tensor_map.norm(f"{hf}.ln_2", (*ours, "pre_mlp_layer_norm"))
        entries += tensor_map.dense(f"{hf}.mlp.c_fc", (*ours, "mlp", "wi"), "same")
        entries += tensor_map.dense(f"{hf}.mlp.c_proj", (*ours, "mlp", "wo"), "same")
    return entries


def _split_fused(tensors: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The query, key and value thirds of the fused `c_attn` tensors `names`, under the names the entries read."""
    thirds = {}
    for name in names:
        if name in tensors:
            layer, kind = name.rsplit(".", 1)
            parts = np.array_split(tensor_map.to_numpy(tensors[name]), 3, axis=-1)
            thirds.update({f"{layer}[{part}].{kind}": value for part, value in zip(QKV, parts)})
    return thirds


def params_from_hf(weights: Mapping[str, np.ndarray], hf_config: Mapping, config: GPTConfig) -> dict:
    """Our unscanned parameters from a `GPT2LMHeadModel` state dict (or `GPT2Model` names, without the
    `transformer.` prefix; numpy arrays or torch tensors); a missing or unexpected tensor is named."""
    tensors = tensor_map.Renamed(weights, lambda name: name.removeprefix("transformer."))
    fused = [f"h.{i}.attn.c_attn.{kind}" for i in range(config.num_layers) for kind in ("weight", "bias")]
    prepared = _split_fused(tensors, fused)
    if "wte.weight" in tensors:
        wte = tensor_map.to_numpy(tensors["wte.weight"])
        prepared["wte.weight"] = tensor_map.pad_vocab(wte, config.vocab_size, "wte.weight")
    ignored = [*fused, "lm_head.weight", *(name for name in tensors if name.endswith(_IGNORED_SUFFIXES))]
    return tensor_map.params_from_hf(
        ChainMap(prepared, tensors), _entries(config), tensor_map.param_shapes(GPT, config),
        f"a GPT2LMHeadModel with {config.num_layers} layers", ignored,
    )


def params_to_hf(params: Mapping, config: GPTConfig) -> dict[str, np.ndarray]:
    """`GPT2LMHeadModel` tensors (`transformer.` names, no tied `lm_head.weight`) from our unscanned
    parameters, the inverse of `params_from_hf` (padded vocabulary rows included)."""
    tensors = tensor_map.params_to_hf(params, _entries(config))
    for i in range(config.num_layers):
        for kind in ("weight", "bias"):
            parts = [tensors.pop(f"h.{i}.attn.c_attn[{part}].{kind}") for part in QKV]
            tensors[f"h.{i}.attn.c_attn.{kind}"] = np.concatenate(parts, axis=-1)
    return {f"transformer.{name}": value for name, value in tensors.items()}


FAMILY = registry.register(registry.Family(
    name="gpt2", model_types=("gpt2",), config_class=GPTConfig, build_model=DecoderOnlyModel,
    model_names=("DecoderOnlyModel", "PrefixLMModel"),
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, params_from_hf=params_from_hf, params_to_hf=params_to_hf,
    checkpoint_fields=("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_layers", "max_position_embeddings",
                       "activation", "layer_norm_epsilon"),
))
