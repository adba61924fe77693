"""T5Gemma <-> Hugging Face `T5GemmaForConditionalGeneration` (`model_type` "t5gemma").

HF's config nests an `encoder` and a `decoder` module config; ours is flat (`encoder_*`, `decoder_*` sizes)
with one set of attention settings, so a checkpoint whose stacks differ in those (window, scaling, soft cap,
RoPE base, norm epsilon) or whose `layer_types` are not the local/global alternation is refused by name.
Norm weights differ by one: HF multiplies by (1 + weight), we by a scale (= 1 + weight). The output layer
`lm_head.out_proj.weight` is the decoder embedding when tied (transformers writes no copy).

Decoder start: published T5Gemma checkpoints start decoder inputs with their BOS id 2; import sets the
model's `decoder_start_id` from `config.json` as `generate` picks it (`registry.decoder_start_from_hf`; HF's
default 2), and export writes the model's value as `decoder_start_token_id` and the `bos_token_id`s, which
HF's `labels` shifting reads. A model that starts from 0 (the pad id): when running HF's forward on it, pass
`decoder_attention_mask` (HF's default masks id 0 as padding).
"""

from __future__ import annotations

import dataclasses
from collections import ChainMap
from collections.abc import Iterator, Mapping

import numpy as np

from t5x_lite.hf import registry, tensor_map
from t5x_lite.models.seq2seq import EncoderDecoderModel
from t5x_lite.networks.t5gemma import STACK_FIELDS, T5Gemma, T5GemmaConfig

HEAD = "lm_head.out_proj.weight"
DECODER_EMBEDDING = "model.decoder.embed_tokens.weight"

# Our stack field -> HF module config key, and HF's T5GemmaModuleConfig defaults for absent keys.
STACK_KEYS = {"d_model": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
              "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "d_ff": "intermediate_size"}
STACK_DEFAULTS = {"hidden_size": 2304, "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
                  "head_dim": 256, "intermediate_size": 9216}
# Our shared attention field -> (HF module config key, HF's default).
SHARED_KEYS = {"sliding_window": ("sliding_window", 4096), "query_pre_attn_scalar": ("query_pre_attn_scalar", 256),
               "attn_logit_softcapping": ("attn_logit_softcapping", 50.0), "rms_norm_eps": ("rms_norm_eps", 1e-6)}
SUPPORTED = {"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False}
DEFAULT_BOS = 2  # HF's T5GemmaModuleConfig.bos_token_id: the decoder start of a config.json that states none


def _entries(config: T5GemmaConfig) -> Iterator[tensor_map.Entry]:
    """The tensor map: every parameter, the untied head included."""

    def attention(hf: str, ours: tuple) -> Iterator[tensor_map.Entry]:
        for hf_name, our_name in (("q", "query"), ("k", "key"), ("v", "value")):
            yield f"{hf}.{hf_name}_proj.weight", (*ours, our_name, "kernel"), "qkv"
        yield f"{hf}.o_proj.weight", (*ours, "out", "kernel"), "out"

    def norm(hf: str, ours: tuple) -> tensor_map.Entry:
        return f"{hf}.weight", (*ours, "scale"), "same"

    def sandwich(hf: str, hf_name: str, ours: tuple, our_name: str) -> Iterator[tensor_map.Entry]:
        yield norm(f"{hf}.pre_{hf_name}_layernorm", (*ours, f"pre_{our_name}_norm"))
        yield norm(f"{hf}.post_{hf_name}_layernorm", (*ours, f"post_{our_name}_norm"))

    def layer(hf: str, ours: tuple) -> Iterator[tensor_map.Entry]:
        yield from sandwich(hf, "feedforward", ours, "mlp")
        for hf_name, our_name in (("gate", "wi_0"), ("up", "wi_1"), ("down", "wo")):
            yield f"{hf}.mlp.{hf_name}_proj.weight", (*ours, "mlp", our_name, "kernel"), "transpose"

    for stack in ("encoder", "decoder"):
        yield f"model.{stack}.embed_tokens.weight", (f"{stack}_embedder", "embedding"), "same"
        yield norm(f"model.{stack}.norm", (stack, "final_norm"))
    for i in range(config.encoder_num_layers):
        hf, ours = f"model.encoder.layers.{i}", ("encoder", "layers", i)
        yield from attention(f"{hf}.self_attn", (*ours, "attention"))
        yield from sandwich(hf, "self_attn", ours, "attention")
        yield from layer(hf, ours)
    for i in range(config.decoder_num_layers):
        hf, ours = f"model.decoder.layers.{i}", ("decoder", "layers", i)
        yield from attention(f"{hf}.self_attn", (*ours, "self_attention"))
        yield from sandwich(hf, "self_attn", ours, "self_attention")
        yield from attention(f"{hf}.cross_attn", (*ours, "cross_attention"))
        yield from sandwich(hf, "cross_attn", ours, "cross_attention")
        yield from layer(hf, ours)
    if not config.tie_word_embeddings:
        yield HEAD, ("logits_dense", "kernel"), "transpose"


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def _layer_types(num_layers: int, sliding_window: int | None) -> list[str]:
    """HF's `layer_types` of our alternation: local (sliding) first, then global."""
    local = "full_attention" if sliding_window is None else "sliding_attention"
    return [local if i % 2 == 0 else "full_attention" for i in range(num_layers)]


def _rope_theta(module: Mapping) -> float:
    """The RoPE base of a module config (transformers 5's `rope_parameters` or the older `rope_theta`)."""
    rope = module.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"config.json has rope_type={rope['rope_type']!r}; t5x_lite's T5Gemma supports only 'default'.")
    return float(rope.get("rope_theta", module.get("rope_theta", 10000.0)))


def _shared(module: Mapping) -> dict:
    """A module config's attention settings, in our field names."""
    values = {ours: module.get(key, default) for ours, (key, default) in SHARED_KEYS.items()}
    values["rope_theta"] = _rope_theta(module)
    layer_types = module.get("layer_types")
    num_layers = module.get("num_hidden_layers", STACK_DEFAULTS["num_hidden_layers"])
    if layer_types is not None and "sliding_attention" not in layer_types:
        values["sliding_window"] = None
    elif layer_types is not None and list(layer_types) != _layer_types(num_layers, 1):
        raise ValueError(f"config.json has layer_types={layer_types}; t5x_lite's T5Gemma supports the alternation "
                         "of sliding_attention (first) and full_attention only.")
    return values


def config_from_hf(hf_config: Mapping, weights: Mapping[str, np.ndarray]) -> T5GemmaConfig:
    """Our `T5GemmaConfig` for a HF T5Gemma `config.json` (and its weights, for the head)."""
    encoder, decoder = hf_config.get("encoder") or {}, hf_config.get("decoder") or {}
    for module in (encoder, decoder):
        registry.check_supported(module, SUPPORTED, "T5Gemma")
    shared, decoder_shared = _shared(encoder), _shared(decoder)
    for field, value in shared.items():
        if decoder_shared[field] != value:
            raise ValueError(f"config.json's encoder has {field}={value!r} but its decoder {decoder_shared[field]!r}; "
                             "t5x_lite's T5Gemma shares the attention settings between its stacks.")
    sizes = {f"{name}_{field}": module.get(STACK_KEYS[field], STACK_DEFAULTS[STACK_KEYS[field]])
             for name, module in (("encoder", encoder), ("decoder", decoder)) for field in STACK_FIELDS}
    tied = hf_config.get("tie_word_embeddings", True) and tensor_map.untied_head(
        {name.replace(HEAD, "lm_head.weight"): weights[name] for name in (HEAD, DECODER_EMBEDDING) if name in weights},
        (DECODER_EMBEDDING,),
    ) is None
    return T5GemmaConfig(
        vocab_size=hf_config.get("vocab_size", 256000), **sizes, **shared,
        final_logit_softcapping=decoder.get("final_logit_softcapping", 30.0), tie_word_embeddings=bool(tied),
        dropout_rate=float(hf_config.get("dropout_rate", 0.0)),
        attention_dropout_rate=float(hf_config.get("attention_dropout", 0.0)),
    )


def _module_config(config: T5GemmaConfig, stack: str, bos_id: int) -> dict:
    """HF's `encoder` or `decoder` module config."""
    return {
        **{key: getattr(config, f"{stack}_{field}") for field, key in STACK_KEYS.items()},
        "hidden_activation": "gelu_pytorch_tanh",
        "layer_types": _layer_types(getattr(config, f"{stack}_num_layers"), config.sliding_window),
        "sliding_window": config.sliding_window or 4096,
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "attn_logit_softcapping": config.attn_logit_softcapping,
        "final_logit_softcapping": config.final_logit_softcapping,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rms_norm_eps": config.rms_norm_eps,
        "attention_bias": False,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_word_embeddings,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": bos_id,
    }


def config_to_hf(config: T5GemmaConfig, decoder_start_id: int = 0) -> dict:
    """A `config.json` that transformers reads as this model, decoding (and shifting labels) from `decoder_start_id`."""
    return {
        "architectures": ["T5GemmaForConditionalGeneration"],
        "model_type": "t5gemma",
        "encoder": _module_config(config, "encoder", decoder_start_id),
        "decoder": _module_config(config, "decoder", decoder_start_id),
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_word_embeddings,
        "dropout_rate": config.dropout_rate,
        "attention_dropout": config.attention_dropout_rate,
        "is_encoder_decoder": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": decoder_start_id,
        "decoder_start_token_id": decoder_start_id,
    }


def _settings_from_hf(hf_config: Mapping) -> dict:
    """The decoder start id (`generate`'s pick; the nested decoder config's BOS, HF's default 2, when unstated)."""
    return registry.decoder_start_from_hf(hf_config, DEFAULT_BOS, hf_config.get("decoder") or {})


def params_from_hf(weights: Mapping[str, np.ndarray], hf_config: Mapping, config: T5GemmaConfig) -> dict:
    """Our unscanned parameters from HF tensors (norm scales = 1 + HF's weights); a missing or unexpected
    tensor is named in the error."""
    scales = {name: tensor_map.to_numpy(weights[name]) + np.float32(1.0) for name in weights if _is_norm(name)}
    ignored = (HEAD,) if config.tie_word_embeddings else ()
    return tensor_map.params_from_hf(
        ChainMap(scales, weights), list(_entries(config)), tensor_map.param_shapes(T5Gemma, config),
        "a T5GemmaForConditionalGeneration", ignored,
    )


def params_to_hf(params: Mapping, config: T5GemmaConfig) -> dict[str, np.ndarray]:
    """HF tensors from our unscanned parameters (no head when tied, as transformers writes)."""
    tensors = tensor_map.params_to_hf(params, list(_entries(config)))
    return {name: value - np.float32(1.0) if _is_norm(name) else value for name, value in tensors.items()}


FAMILY = registry.register(registry.Family(
    name="t5gemma", model_types=("t5gemma",), config_class=T5GemmaConfig, build_model=EncoderDecoderModel,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, params_from_hf=params_from_hf, params_to_hf=params_to_hf,
    checkpoint_fields=tuple(
        field.name for field in dataclasses.fields(T5GemmaConfig)
        if field.name not in ("dropout_rate", "attention_dropout_rate", "dtype", "remat_policy", "scan_layers",
                              "attention_impl", "kernels")
    ),
    settings=("decoder_start_id",), settings_from_hf=_settings_from_hf,
))
