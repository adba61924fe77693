"""BART <-> Hugging Face `BartForConditionalGeneration` (shared, tied embedding; `final_logits_bias`).

`config.json` both ways and the tensor map. Our BART has one head count and one feed-forward width
for both stacks and ties the output layer, so checkpoints that differ (or that use mBART's pre-norm
layers) are refused by name. Special cases: HF's position tables have 2 extra leading rows (fairseq's
padding offset: position p reads row p + 2), which the import drops and the export writes as zeros;
the shared embedding may come as a stack's `embed_tokens`; a `vocab_size` above the checkpoint's pads
the embedding and `final_logits_bias` ([1, vocab] in HF, optional there) with zeros.

Token ids: t5x_lite pads with 0 and starts decoding from 0 (seqio's conventions). With a BART
tokenizer, id 0 is `<s>`, which the vocabulary never produces for text, so `<pad>` (1) goes unused.
HF's BART starts its decoder with two ids, `decoder_start_token_id` (`</s>`, 2) and then the `<s>` (0)
that its tokenizer puts first in every label (`forced_bos_token_id` at generation): one start id cannot
say that, and `<s>` cannot be a target here (0 is padding), so import keeps the model's
`decoder_start_id` at 0 whatever `config.json` says; logits of the same tokens agree exactly, and a
checkpoint fine-tuned by HF should be fine-tuned here before decoding with it. Export writes t5x_lite's
ids and the model's `decoder_start_id` (see `write_pretrained`).
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping

import numpy as np

from t5x_lite.hf import registry, tensor_map
from t5x_lite.models.seq2seq import BartModel
from t5x_lite.networks.bart import Bart, BartConfig

# HF `activation_function` -> ours, and ours -> the name written on export.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
# Keys (-> the one value we support) of older (fairseq-converted) config.json files that would change the network.
SUPPORTED = {"normalize_before": False, "add_final_layer_norm": False, "normalize_embedding": True}
POSITION_OFFSET = 2  # rows of HF's BartLearnedPositionalEmbedding before position 0
# Tied copies of `shared.weight` that HF files may hold besides it.
TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")


def _same_in_both_stacks(hf_config: Mapping, encoder_key: str, decoder_key: str, default: int) -> int:
    encoder, decoder = hf_config.get(encoder_key, default), hf_config.get(decoder_key, default)
    if encoder != decoder:
        raise ValueError(
            f"config.json has {encoder_key}={encoder} but {decoder_key}={decoder}; t5x_lite's BART uses one value "
            "for both stacks."
        )
    return encoder


def config_from_hf(hf_config: Mapping, weights: Mapping[str, np.ndarray]) -> BartConfig:
    """Our `BartConfig` for a HF BART `config.json` (HF's defaults for absent keys)."""
    tensor_map.check_tied_head(weights, ("model.shared.weight", "shared.weight"), "BART")
    registry.check_supported(hf_config, SUPPORTED, "BART")
    activation = registry.translate(hf_config, "activation_function", "gelu", ACTIVATIONS, "BART")
    heads = _same_in_both_stacks(hf_config, "encoder_attention_heads", "decoder_attention_heads", 16)
    d_ff = _same_in_both_stacks(hf_config, "encoder_ffn_dim", "decoder_ffn_dim", 4096)
    d_model = hf_config.get("d_model", 1024)
    return BartConfig(
        vocab_size=hf_config.get("vocab_size", 50265),
        d_model=d_model,
        num_heads=heads,
        head_dim=registry.head_dim(d_model, heads, "d_model"),
        d_ff=d_ff,
        num_encoder_layers=hf_config.get("encoder_layers", 12),
        num_decoder_layers=hf_config.get("decoder_layers", 12),
        max_position_embeddings=hf_config.get("max_position_embeddings", 1024),
        dropout_rate=float(hf_config.get("dropout", 0.1)),
        attention_dropout_rate=float(hf_config.get("attention_dropout", 0.0)),
        activation_dropout_rate=float(hf_config.get("activation_dropout", 0.0)),
        activation=activation,
        scale_embedding=bool(hf_config.get("scale_embedding", False)),
    )


def config_to_hf(config: BartConfig, decoder_start_id: int = 0) -> dict:
    """A `config.json` that transformers reads as this `BartForConditionalGeneration` (ids: see
    `write_pretrained`; no forced EOS, which t5x_lite's decoding does not do either)."""
    registry.check_heads_span_d_model(config, "BART")
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
        "decoder_start_token_id": decoder_start_id,
        "forced_eos_token_id": None,
    }


def _entries(config: BartConfig) -> list[tensor_map.Entry]:
    """The tensor map (names without `model.`)."""
    entries = [("shared.weight", ("token_embedder", "embedding"), "same"),
               ("final_logits_bias", ("final_logits_bias",), "same")]
    for stack in ("encoder", "decoder"):
        entries.append((f"{stack}.embed_positions.weight", (f"{stack}_embedder", "position_embedder", "embedding"),
                        "same"))
        entries += tensor_map.norm(f"{stack}.layernorm_embedding", (f"{stack}_embedder", "embedding_layer_norm"))
        count = config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers
        attentions = [("self_attn", "self_attention")] + [("encoder_attn", "cross_attention")] * (stack == "decoder")
        for i in range(count):
            hf, ours = f"{stack}.layers.{i}", (f"{stack}_layers", i)
            for hf_att, our_att in attentions:
                for proj, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
                    entries += tensor_map.dense(f"{hf}.{hf_att}.{proj}", (*ours, our_att, name), "qkv", "heads")
                entries += tensor_map.dense(f"{hf}.{hf_att}.out_proj", (*ours, our_att, "out"), "out")
                entries += tensor_map.norm(f"{hf}.{hf_att}_layer_norm", (*ours, f"{our_att}_layer_norm"))
            entries += tensor_map.dense(f"{hf}.fc1", (*ours, "mlp", "wi"))
            entries += tensor_map.dense(f"{hf}.fc2", (*ours, "mlp", "wo"))
            entries += tensor_map.norm(f"{hf}.final_layer_norm", (*ours, "mlp_layer_norm"))
    return entries


def params_from_hf(weights: Mapping[str, np.ndarray], hf_config: Mapping, config: BartConfig) -> dict:
    """Our unscanned parameters from a `BartForConditionalGeneration` state dict (or `BartModel` names,
    without the `model.` prefix; numpy arrays or torch tensors); a missing or unexpected tensor, or a
    wrong shape, is named in the error."""
    tensors = tensor_map.Renamed(weights, lambda name: name.removeprefix("model."))
    shared = next((name for name in ("shared.weight", *TIED[:2]) if name in tensors), None)
    bias = tensor_map.to_numpy(tensors["final_logits_bias"] if "final_logits_bias" in tensors else np.zeros(0))
    prepared = {"final_logits_bias": tensor_map.pad_vocab(bias.reshape(-1), config.vocab_size, "final_logits_bias")}
    if shared is not None:
        embedding = tensor_map.to_numpy(tensors[shared])
        prepared["shared.weight"] = tensor_map.pad_vocab(embedding, config.vocab_size, shared)
    for name in ("encoder.embed_positions.weight", "decoder.embed_positions.weight"):
        if name in tensors:
            prepared[name] = tensor_map.to_numpy(tensors[name])[POSITION_OFFSET:]
    return tensor_map.params_from_hf(
        ChainMap(prepared, tensors), _entries(config), tensor_map.param_shapes(Bart, config),
        f"a BartForConditionalGeneration with {config.num_encoder_layers}+{config.num_decoder_layers} layers", TIED,
    )


def params_to_hf(params: Mapping, config: BartConfig) -> dict[str, np.ndarray]:
    """`BartForConditionalGeneration` tensors (`model.` names; the tied copies of `model.shared.weight`
    left out, as transformers writes) from our unscanned parameters, the inverse of `params_from_hf`."""
    tensors = tensor_map.params_to_hf(params, _entries(config))
    for name in ("encoder.embed_positions.weight", "decoder.embed_positions.weight"):
        tensors[name] = np.pad(tensors[name], ((POSITION_OFFSET, 0), (0, 0)))
    final_logits_bias = tensors.pop("final_logits_bias")[None]
    return {**{f"model.{name}": value for name, value in tensors.items()}, "final_logits_bias": final_logits_bias}


FAMILY = registry.register(registry.Family(
    name="bart", model_types=("bart",), config_class=BartConfig, build_model=BartModel, model_names=("BartModel",),
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, params_from_hf=params_from_hf, params_to_hf=params_to_hf,
    checkpoint_fields=("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_encoder_layers",
                       "num_decoder_layers", "max_position_embeddings", "activation", "scale_embedding",
                       "layer_norm_epsilon"),
    settings=("decoder_start_id",),  # exported; import keeps 0 (see the module docstring)
))
