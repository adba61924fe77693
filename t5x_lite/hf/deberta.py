"""DeBERTa-v2/v3 <-> Hugging Face `DebertaV2ForMaskedLM`, `DebertaV2ForSequenceClassification`,
`DebertaV2ForTokenClassification` (and the head-less `DebertaV2Model`): `config.json` both ways and the tensor map.

The head comes from `architectures` (else from the tensors, as for BERT). The masked-LM head is read in
both of transformers' layouts (`cls.predictions.*`, "legacy", and `lm_predictions.lm_head.*`) and
written in the legacy one, transformers' default. Refused: the convolution layer (`conv_kernel_size`),
a factorised `embedding_size`, and relative attention switched off. transformers has no enhanced mask decoder
(`DebertaConfig.enhanced_mask_decoder`): export writes the encoder and MLM head without its position table (one
log line says so), so the exported MLM reads the last layer, as fine-tuning from such a checkpoint does.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from absl import logging

from t5x_lite.hf import registry, tensor_map
from t5x_lite.hf.bert import ACTIVATIONS, MODELS
from t5x_lite.models.base import BaseModel
from t5x_lite.networks.deberta import Deberta, DebertaConfig
from t5x_lite.networks.deberta_rtd import merge_embedding_delta

ARCHITECTURES = {
    "DebertaV2ForMaskedLM": "mlm",
    "DebertaV2ForSequenceClassification": "classification",
    "DebertaV2ForTokenClassification": "tagging",
    "DebertaV2Model": "none",
}
CLASS_OF_HEAD = {head: name for name, head in ARCHITECTURES.items()}
SUPPORTED = {"relative_attention": True, "conv_kernel_size": 0}
# HF tensors that hold nothing of their own: the legacy MLM decoder's tied copies and a position buffer.
IGNORED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "embeddings.position_ids")
HEAD_PREFIXES = ("cls.", "lm_predictions.", "pooler.", "classifier.")
# The non-legacy masked-LM head's names -> the legacy ones the tensor map uses.
LM_HEAD_NAMES = {"lm_predictions.lm_head.dense.": "cls.predictions.transform.dense.",
                 "lm_predictions.lm_head.LayerNorm.": "cls.predictions.transform.LayerNorm.",
                 "lm_predictions.lm_head.bias": "cls.predictions.bias"}


def hf_name(name: str) -> str:
    """A HF tensor name as the tensor map spells it: no `deberta.` prefix, the legacy masked-LM head's names."""
    name = name.removeprefix("deberta.")
    for new, legacy in LM_HEAD_NAMES.items():
        if name.startswith(new):
            return legacy + name.removeprefix(new)
    return name


def head_from_hf(hf_config: Mapping, weights: Mapping[str, np.ndarray]) -> str:
    """The checkpoint's head: from `architectures`, else from which head tensors exist."""
    listed = hf_config.get("architectures") or []
    known = [a for a in listed if a in ARCHITECTURES]
    if listed and not known:
        raise ValueError(
            f"config.json lists architectures {listed}; t5x_lite converts DeBERTa-v2 checkpoints of "
            f"{sorted(ARCHITECTURES)}."
        )
    if known:
        return ARCHITECTURES[known[0]]
    names = {hf_name(name) for name in weights}
    if "cls.predictions.bias" in names:
        return "mlm"
    if "classifier.weight" in names:
        return "classification" if "pooler.dense.weight" in names else "tagging"
    return "none"


def _pos_att_type(hf_config: Mapping) -> tuple[str, ...]:
    value = hf_config.get("pos_att_type") or []
    terms = value.lower().split("|") if isinstance(value, str) else list(value)
    return tuple(t.strip() for t in terms if t.strip())


def config_from_hf(hf_config: Mapping, weights: Mapping[str, np.ndarray]) -> DebertaConfig:
    """Our `DebertaConfig` for a HF `deberta-v2` `config.json`."""
    registry.check_supported(hf_config, SUPPORTED, "DeBERTa")
    d_model, num_heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    if hf_config.get("embedding_size", d_model) != d_model:
        raise ValueError(f"config.json has embedding_size={hf_config['embedding_size']}; t5x_lite's DeBERTa "
                         f"supports only embedding_size == hidden_size ({d_model}).")
    if hf_config.get("pooler_hidden_size", d_model) != d_model:
        raise ValueError("config.json has pooler_hidden_size != hidden_size; t5x_lite's DeBERTa does not support it.")
    activation = registry.translate(hf_config, "hidden_act", "gelu", ACTIVATIONS, "DeBERTa")
    if registry.translate(hf_config, "pooler_hidden_act", "gelu", ACTIVATIONS, "DeBERTa") != activation:
        raise ValueError("config.json has pooler_hidden_act != hidden_act; t5x_lite's DeBERTa supports only one.")
    norm = [x.strip() for x in str(hf_config.get("norm_rel_ebd", "none")).lower().split("|")]
    return DebertaConfig(
        vocab_size=hf_config["vocab_size"], d_model=d_model, num_heads=num_heads,
        head_dim=registry.head_dim(d_model, num_heads, "hidden_size"), d_ff=hf_config["intermediate_size"],
        num_layers=hf_config["num_hidden_layers"], max_position_embeddings=hf_config.get("max_position_embeddings", 512),
        type_vocab_size=hf_config.get("type_vocab_size", 0),
        position_biased_input=hf_config.get("position_biased_input", True),
        position_buckets=hf_config.get("position_buckets", -1),
        max_relative_positions=hf_config.get("max_relative_positions", -1),
        share_att_key=hf_config.get("share_att_key", False), pos_att_type=_pos_att_type(hf_config),
        norm_rel_ebd="layer_norm" in norm, dropout_rate=float(hf_config.get("hidden_dropout_prob", 0.0)),
        layer_norm_eps=hf_config.get("layer_norm_eps", 1e-7), activation=activation,
        initializer_range=hf_config.get("initializer_range", 0.02),
        num_labels=len(hf_config.get("id2label") or {0: 0, 1: 1}),
    )


def config_to_hf(config: DebertaConfig, head: str = "mlm") -> dict:
    """A `config.json` that transformers reads as the `DebertaV2*` class of `head`."""
    registry.check_heads_span_d_model(config, "DeBERTa")
    activation = {"gelu": "gelu", "gelu_tanh": "gelu_new"}[config.activation]
    hf_config = {
        "architectures": [CLASS_OF_HEAD[head]],
        "model_type": "deberta-v2",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.d_ff,
        "hidden_act": activation,
        "pooler_hidden_act": activation,
        "hidden_dropout_prob": config.dropout_rate,
        "attention_probs_dropout_prob": config.dropout_rate,
        "pooler_dropout": 0.0,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "position_biased_input": config.position_biased_input,
        "relative_attention": True,
        "position_buckets": config.position_buckets,
        "max_relative_positions": config.max_relative_positions,
        "share_att_key": config.share_att_key,
        "pos_att_type": list(config.pos_att_type),
        "norm_rel_ebd": "layer_norm" if config.norm_rel_ebd else "none",
        "initializer_range": config.initializer_range,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": 0,
        "legacy": True,
        "tie_word_embeddings": True,
    }
    if head in ("classification", "tagging"):
        hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
        hf_config["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
    return hf_config


def _attention_entries(config: DebertaConfig, hf: str, ours: tuple) -> list[tensor_map.Entry]:
    entries = []
    for name, mine in (("query_proj", "query"), ("key_proj", "key"), ("value_proj", "value")):
        entries += tensor_map.dense(f"{hf}.self.{name}", (*ours, "attention", mine), "qkv", "heads")
    if not config.share_att_key:
        for term, name, mine in (("c2p", "pos_key_proj", "pos_key"), ("p2c", "pos_query_proj", "pos_query")):
            if term in config.pos_att_type:
                entries += tensor_map.dense(f"{hf}.self.{name}", (*ours, mine), "qkv", "heads")
    return entries + tensor_map.dense(f"{hf}.output.dense", (*ours, "attention", "out"), "out")


def _entries(config: DebertaConfig, head: str) -> list[tensor_map.Entry]:
    """The tensor map (names as `hf_name` gives them) of the encoder and `head`."""
    tables = ["word"] + ["position"] * config.position_biased_input + ["token_type"] * (config.type_vocab_size > 0)
    entries = [(f"embeddings.{t}_embeddings.weight", ("embeddings", f"{t}_embeddings", "embedding"), "same")
               for t in tables]
    entries += tensor_map.norm("embeddings.LayerNorm", ("embeddings", "layer_norm"))
    entries.append(("encoder.rel_embeddings.weight", ("rel_embeddings", "embedding"), "same"))
    if config.norm_rel_ebd:
        entries += tensor_map.norm("encoder.LayerNorm", ("rel_norm",))
    for i in range(config.num_layers):
        hf, ours = f"encoder.layer.{i}", ("layers", i)
        entries += _attention_entries(config, f"{hf}.attention", (*ours, "attention"))
        entries += tensor_map.norm(f"{hf}.attention.output.LayerNorm", (*ours, "attention_norm"))
        entries += tensor_map.dense(f"{hf}.intermediate.dense", (*ours, "mlp", "wi"))
        entries += tensor_map.dense(f"{hf}.output.dense", (*ours, "mlp", "wo"))
        entries += tensor_map.norm(f"{hf}.output.LayerNorm", (*ours, "mlp_norm"))
    if head == "mlm":
        entries += tensor_map.dense("cls.predictions.transform.dense", ("mlm", "transform"))
        entries += tensor_map.norm("cls.predictions.transform.LayerNorm", ("mlm", "layer_norm"))
        entries.append(("cls.predictions.bias", ("mlm", "bias"), "same"))
    elif head == "classification":
        entries += tensor_map.dense("pooler.dense", ("pooler",))
        entries += tensor_map.dense("classifier", ("classifier",))
    elif head == "tagging":
        entries += tensor_map.dense("classifier", ("tagger",))
    return entries


def params_head(params: Mapping) -> str:
    """The head whose parameters `params` hold."""
    for key, head in (("classifier", "classification"), ("tagger", "tagging"), ("mlm", "mlm")):
        if key in params:
            return head
    return "none"


def params_from_hf(weights: Mapping[str, np.ndarray], hf_config: Mapping, config: DebertaConfig) -> dict:
    """Our unscanned parameters for the checkpoint's own head; a missing or unexpected tensor is named."""
    tensors = tensor_map.Renamed(weights, hf_name)
    head = head_from_hf(hf_config, tensors)
    shapes = tensor_map.param_shapes(Deberta, config, head)
    return tensor_map.params_from_hf(
        tensors, _entries(config, head), shapes, f"a {head!r}-head DeBERTa with {config.num_layers} layers", IGNORED,
    )


def params_to_hf(params: Mapping, config: DebertaConfig) -> dict[str, np.ndarray]:
    """HF tensors from our unscanned parameters, named as the `DebertaV2*` class of their head expects; a
    DeBERTa-v3 RTD network's are its discriminator's (head-less, the word table E_G + E_delta merged)."""
    params = merge_embedding_delta(params)
    head = params_head(params)
    if "emd_positions" in params:
        logging.warning("DeBERTa's enhanced mask decoder has no transformers counterpart: the export leaves out its "
                        "absolute-position table (emd_positions); the exported MLM head reads the last layer.")
    prefix = "" if head == "none" else "deberta."
    tensors = tensor_map.params_to_hf(params, _entries(config, head))
    return {(name if name.startswith(HEAD_PREFIXES) else prefix + name): value for name, value in tensors.items()}


def build_model(config: DebertaConfig, head: str = "mlm") -> BaseModel:
    """The trainer's model of `head` (the encoder models of `t5x_lite.models.encoder`)."""
    if head not in MODELS:
        raise ValueError(
            "A DebertaV2Model checkpoint has no head, so it is no model of its own: start a fine-tuning run from it "
            "(INITIAL_CHECKPOINT_PATH='hf:DIR' with EncoderClassificationModel or EncoderTaggingModel), or export "
            "a DebertaV2ForMaskedLM / DebertaV2For{Sequence,Token}Classification instead."
        )
    return MODELS[head](config)


FAMILY = registry.register(registry.Family(
    name="deberta-v2", model_types=("deberta-v2",), config_class=DebertaConfig, build_model=build_model,
    model_names=tuple(model.__name__ for model in MODELS.values()),
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, params_from_hf=params_from_hf, params_to_hf=params_to_hf,
    checkpoint_fields=("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_layers", "max_position_embeddings",
                       "type_vocab_size", "position_biased_input", "position_buckets", "max_relative_positions",
                       "share_att_key", "pos_att_type", "norm_rel_ebd", "layer_norm_eps", "activation"),
    head_from_hf=head_from_hf, head_from_params=params_head, head_fields=("num_labels",),
))
