"""BERT <-> Hugging Face `BertForMaskedLM`, `BertForPreTraining`, `BertForSequenceClassification`,
`BertForTokenClassification` (and the head-less `BertModel`).

The tensor mapping lives beside the network (`t5x_lite.models.encoder_only.params_from_hf` /
`params_to_hf`); this module adds the family: `config.json` both ways and the head. A checkpoint's
head comes from `architectures` in `config.json` (the first BERT class listed), or, when that is
absent, from its tensors (`cls.predictions.*`: masked LM; `classifier.*` with a pooler: sequence
classification, without: token classification):

    BertForMaskedLM, BertForPreTraining -> "mlm" (`EncoderOnlyMLMModel`), with the pooler and
        next-sentence head when `cls.seq_relationship.*` is present (`next_sentence_prediction`);
    BertForSequenceClassification -> "classification" (`EncoderClassificationModel`), `num_labels`
        from `id2label`;
    BertForTokenClassification -> "tagging" (`EncoderTaggingModel`), `num_labels` from `id2label`;
    BertModel -> "none": only a starting point for fine-tuning (`INITIAL_CHECKPOINT_PATH='hf:...'`).

Export writes the class of the parameters' head, with the tensor names its `from_pretrained` expects.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from t5x_lite.hf import registry
from t5x_lite.models import encoder_only as eo
from t5x_lite.models import stacks
from t5x_lite.models.base import BaseModel
from t5x_lite.models.encoder_only import BertConfig

ARCHITECTURES = {
    "BertForMaskedLM": "mlm",
    "BertForPreTraining": "mlm",
    "BertForSequenceClassification": "classification",
    "BertForTokenClassification": "tagging",
    "BertModel": "none",
}
MODELS = {
    "mlm": eo.EncoderOnlyMLMModel,
    "classification": eo.EncoderClassificationModel,
    "tagging": eo.EncoderTaggingModel,
}
# config.json keys that would make a BERT compute something else than our network.
_UNSUPPORTED = {"is_decoder": False, "add_cross_attention": False, "position_embedding_type": "absolute"}


def _names(weights: Mapping[str, np.ndarray]) -> set[str]:
    return {eo.hf_name(name) for name in weights}


def head_from_hf(hf_config: Mapping, weights: Mapping[str, np.ndarray]) -> str:
    """The checkpoint's head: from `architectures`, else from which head tensors exist."""
    listed = hf_config.get("architectures") or []
    known = [a for a in listed if a in ARCHITECTURES]
    if listed and not known:
        raise ValueError(
            f"config.json lists architectures {listed}; t5x_lite converts BERT checkpoints of {sorted(ARCHITECTURES)}."
        )
    if known:
        return ARCHITECTURES[known[0]]
    names = _names(weights)
    if "cls.predictions.bias" in names:
        return "mlm"
    if "classifier.weight" in names:
        return "classification" if "pooler.dense.weight" in names else "tagging"
    return "none"


def config_from_hf(hf_config: Mapping, weights: Mapping[str, np.ndarray]) -> BertConfig:
    """Our `BertConfig` for a HF BERT `config.json`; the next-sentence head if the weights have it."""
    for key, supported in _UNSUPPORTED.items():
        if hf_config.get(key, supported) != supported:
            raise ValueError(f"config.json has {key}={hf_config[key]!r}; t5x_lite's BERT supports only {supported!r}.")
    if hf_config["hidden_size"] % hf_config["num_attention_heads"]:
        raise ValueError(
            f"config.json has hidden_size={hf_config['hidden_size']}, not a multiple of num_attention_heads="
            f"{hf_config['num_attention_heads']}."
        )
    nsp = head_from_hf(hf_config, weights) == "mlm" and "cls.seq_relationship.weight" in _names(weights)
    return eo.config_from_hf(hf_config, next_sentence_prediction=nsp)


def config_to_hf(config: BertConfig, head: str = "mlm") -> dict:
    """A `config.json` that transformers reads as the `BertFor*` class of `head`."""
    if config.num_heads * config.head_dim != config.d_model:
        raise ValueError(
            f"Hugging Face BERT needs num_heads * head_dim == d_model; this BertConfig has {config.num_heads} * "
            f"{config.head_dim} != {config.d_model}."
        )
    architecture = {"mlm": "BertForPreTraining" if config.next_sentence_prediction else "BertForMaskedLM",
                    "classification": "BertForSequenceClassification", "tagging": "BertForTokenClassification",
                    "none": "BertModel"}[head]
    activation = {"gelu": "gelu", "gelu_tanh": "gelu_new"}[config.activation]
    hf_config = {
        "architectures": [architecture],
        "model_type": "bert",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.d_ff,
        "hidden_act": activation,
        "hidden_dropout_prob": config.dropout_rate,
        "attention_probs_dropout_prob": config.dropout_rate,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "initializer_range": config.initializer_range,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": 0,
        "tie_word_embeddings": True,
    }
    if head in ("classification", "tagging"):
        hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
        hf_config["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
    return hf_config


def params_from_hf(weights: Mapping[str, np.ndarray], hf_config: Mapping, config: BertConfig) -> dict:
    """Our parameters for the checkpoint's own head (a `BertModel`'s pooler too, when it has one); a
    missing or unexpected tensor is named in the error."""
    head = head_from_hf(hf_config, weights)
    names = _names(weights)
    pooler = eo.has_pooler(config, head) or (head == "none" and "pooler.dense.weight" in names)
    params = eo.params_from_hf(weights, config, head, pooler)
    used = {name for name, _, _ in eo.hf_mapping(config, head, pooler)}
    unexpected = sorted(names - used - set(eo.HF_IGNORED))
    if unexpected:
        raise ValueError(
            f"The checkpoint has tensors a {head!r}-head BERT with {config.num_layers} layers does not: "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; is it another architecture?"
        )
    return params


def build_model(config: BertConfig, head: str = "mlm") -> BaseModel:
    """The trainer's BERT model of `head`; a head-less `BertModel` checkpoint has none."""
    if head not in MODELS:
        raise ValueError(
            "A BertModel checkpoint has no head, so it is no model of its own: start a fine-tuning run from it "
            "(INITIAL_CHECKPOINT_PATH='hf:DIR' with EncoderClassificationModel or EncoderTaggingModel, whose heads "
            "start fresh), or export a BertForMaskedLM / BertFor{Sequence,Token}Classification instead."
        )
    return MODELS[head](config)


FAMILY = registry.register(
    registry.Family(
        name="bert",
        model_types=("bert",),
        config_class=BertConfig,
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        params_from_hf=params_from_hf,
        params_to_hf=eo.params_to_hf,
        build_model=build_model,
        checkpoint_fields=(
            "vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_layers", "max_position_embeddings",
            "type_vocab_size", "layer_norm_eps", "activation",
        ),
        stack_layers=stacks.stack_layer_params,
        unstack_layers=stacks.unstack_layer_params,
        model_names=tuple(model.__name__ for model in MODELS.values()),
        head_from_hf=head_from_hf,
        head_from_params=eo.params_head,
        head_fields=("num_labels", "next_sentence_prediction"),
    )
)
