"""BERT <-> Hugging Face `BertForMaskedLM`, `BertForPreTraining`, `BertForSequenceClassification`,
`BertForTokenClassification` (and the head-less `BertModel`): `config.json` both ways, the tensor map and the head.

A checkpoint's head comes from the first BERT class in `config.json`'s `architectures` (`ARCHITECTURES`), or,
when that is absent, from its tensors (`cls.predictions.*`: masked LM; `classifier.*` with a pooler: sequence
classification, without: token classification); docs/hf.md says which trainer model each head gives. Names are
read without the `bert.` prefix and with old TF-era layer norms' `gamma`/`beta` read as `weight`/`bias`; the MLM
decoder's weight and bias are tied copies (of the word embedding and `cls.predictions.bias`). Export writes the
class of the parameters' head, with the tensor names its `from_pretrained` expects.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from t5x_lite.hf import registry, tensor_map
from t5x_lite.models.base import BaseModel
from t5x_lite.models.encoder import EncoderClassificationModel, EncoderOnlyMLMModel, EncoderTaggingModel
from t5x_lite.networks.bert import Bert, BertConfig, has_pooler

ARCHITECTURES = {
    "BertForMaskedLM": "mlm",
    "BertForPreTraining": "mlm",
    "BertForSequenceClassification": "classification",
    "BertForTokenClassification": "tagging",
    "BertModel": "none",
}
MODELS = {
    "mlm": EncoderOnlyMLMModel,
    "classification": EncoderClassificationModel,
    "tagging": EncoderTaggingModel,
}
# config.json keys (-> the one value we support) that would make a BERT compute something else than ours.
SUPPORTED = {"is_decoder": False, "add_cross_attention": False, "position_embedding_type": "absolute"}
# HF `hidden_act` -> our activation.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# HF tensors that hold nothing of their own: the MLM decoder's tied copies and an old position buffer.
IGNORED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "embeddings.position_ids")
# HF names of the heads (outside the `bert.` prefix of the encoder and pooler).
HEAD_PREFIXES = ("cls.", "classifier.")


def hf_name(name: str) -> str:
    """A HF tensor name as the tensor map spells it: no `bert.` prefix, `.weight`/`.bias` for old TF-era
    layer norms' `.gamma`/`.beta`."""
    name = name.removeprefix("bert.")
    if name.endswith("LayerNorm.gamma"):
        return name.removesuffix("gamma") + "weight"
    return name.removesuffix("beta") + "bias" if name.endswith("LayerNorm.beta") else name


def _names(weights: Mapping[str, np.ndarray]) -> set[str]:
    return {hf_name(name) for name in weights}


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
    registry.check_supported(hf_config, SUPPORTED, "BERT")
    nsp = head_from_hf(hf_config, weights) == "mlm" and "cls.seq_relationship.weight" in _names(weights)
    return BertConfig(**encoder_config_fields(hf_config, "BERT"), next_sentence_prediction=nsp)


def encoder_config_fields(hf_config: Mapping, family: str) -> dict:
    """The `BertConfig` fields of a HF BERT-style encoder's `config.json` (BERT's and ELECTRA's alike)."""
    d_model, num_heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    return {
        "vocab_size": hf_config["vocab_size"],
        "d_model": d_model,
        "num_heads": num_heads,
        "head_dim": registry.head_dim(d_model, num_heads, "hidden_size"),
        "d_ff": hf_config["intermediate_size"],
        "num_layers": hf_config["num_hidden_layers"],
        "max_position_embeddings": hf_config["max_position_embeddings"],
        "type_vocab_size": hf_config["type_vocab_size"],
        "dropout_rate": float(hf_config.get("hidden_dropout_prob", 0.0)),
        "layer_norm_eps": hf_config.get("layer_norm_eps", 1e-12),
        "activation": registry.translate(hf_config, "hidden_act", "gelu", ACTIVATIONS, family),
        "initializer_range": hf_config.get("initializer_range", 0.02),
        "num_labels": len(hf_config.get("id2label") or {0: 0, 1: 1}),
    }


def config_to_hf(config: BertConfig, head: str = "mlm") -> dict:
    """A `config.json` that transformers reads as the `BertFor*` class of `head`."""
    registry.check_heads_span_d_model(config, "BERT")
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


def _entries(config: BertConfig, head: str, pooler: bool) -> list[tensor_map.Entry]:
    """The tensor map (names as `hf_name` gives them) of the encoder, the pooler if `pooler`, and `head`."""
    entries = [(f"embeddings.{table}_embeddings.weight", ("embeddings", f"{table}_embeddings", "embedding"), "same")
               for table in ("word", "position", "token_type")]
    entries += tensor_map.norm("embeddings.LayerNorm", ("embeddings", "layer_norm"))
    for i in range(config.num_layers):
        hf, ours = f"encoder.layer.{i}", ("layers", i)
        for name in ("query", "key", "value"):
            entries += tensor_map.dense(f"{hf}.attention.self.{name}", (*ours, "attention", name), "qkv", "heads")
        entries += tensor_map.dense(f"{hf}.attention.output.dense", (*ours, "attention", "out"), "out")
        entries += tensor_map.norm(f"{hf}.attention.output.LayerNorm", (*ours, "attention_norm"))
        entries += tensor_map.dense(f"{hf}.intermediate.dense", (*ours, "mlp", "wi"))
        entries += tensor_map.dense(f"{hf}.output.dense", (*ours, "mlp", "wo"))
        entries += tensor_map.norm(f"{hf}.output.LayerNorm", (*ours, "mlp_norm"))
    if pooler:
        entries += tensor_map.dense("pooler.dense", ("pooler",))
    if head == "mlm":
        entries += tensor_map.dense("cls.predictions.transform.dense", ("mlm", "transform"))
        entries += tensor_map.norm("cls.predictions.transform.LayerNorm", ("mlm", "layer_norm"))
        entries.append(("cls.predictions.bias", ("mlm", "bias"), "same"))
        if config.next_sentence_prediction:
            entries += tensor_map.dense("cls.seq_relationship", ("nsp",))
    elif head in ("classification", "tagging"):
        entries += tensor_map.dense("classifier", ("classifier" if head == "classification" else "tagger",))
    return entries


def encoder_entries(num_layers: int) -> list[tensor_map.Entry]:
    """The tensor map of BERT's embeddings and `num_layers` layers (what ELECTRA's encoders share with it)."""
    return _entries(BertConfig(num_layers=num_layers), "none", pooler=False)


def params_head(params: Mapping) -> str:
    """The head (`encoder_only.HEADS`) whose parameters `params` hold."""
    for key, head in (("classifier", "classification"), ("tagger", "tagging"), ("mlm", "mlm")):
        if key in params:
            return head
    return "none"


def params_from_hf(weights: Mapping[str, np.ndarray], hf_config: Mapping, config: BertConfig) -> dict:
    """Our unscanned parameters for the checkpoint's own head (a `BertModel`'s pooler too, when it has
    one); names with or without `bert.`; a missing or unexpected tensor is named in the error."""
    tensors = tensor_map.Renamed(weights, hf_name)
    head = head_from_hf(hf_config, tensors)
    pooler = has_pooler(config, head) or (head == "none" and "pooler.dense.weight" in tensors)
    # A head-less network has no pooler: a BertModel's pooler has the shapes of the classifier network's.
    shapes = tensor_map.param_shapes(Bert, config, "classification" if head == "none" and pooler else head)
    return tensor_map.params_from_hf(
        tensors, _entries(config, head, pooler), shapes, f"a {head!r}-head BERT with {config.num_layers} layers",
        IGNORED,
    )


def params_to_hf(params: Mapping, config: BertConfig) -> dict[str, np.ndarray]:
    """HF tensors from our unscanned parameters, named as the `BertFor*` class of their head expects
    (`bert.`-prefixed encoder; `BertModel` names, unprefixed, for the "none" head). The tied MLM
    decoder weight and bias are left out, as transformers writes them."""
    head = params_head(params)
    prefix = "" if head == "none" else "bert."
    tensors = tensor_map.params_to_hf(params, _entries(config, head, "pooler" in params))
    return {(name if name.startswith(HEAD_PREFIXES) else prefix + name): value for name, value in tensors.items()}


def build_model(config: BertConfig, head: str = "mlm") -> BaseModel:
    """The trainer's BERT model of `head`; a head-less `BertModel` checkpoint has none."""
    if head not in MODELS:
        raise ValueError(
            "A BertModel checkpoint has no head, so it is no model of its own: start a fine-tuning run from it "
            "(INITIAL_CHECKPOINT_PATH='hf:DIR' with EncoderClassificationModel or EncoderTaggingModel, whose heads "
            "start fresh), or export a BertForMaskedLM / BertFor{Sequence,Token}Classification instead."
        )
    return MODELS[head](config)


FAMILY = registry.register(registry.Family(
    name="bert", model_types=("bert",), config_class=BertConfig, build_model=build_model,
    model_names=tuple(model.__name__ for model in MODELS.values()),
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, params_from_hf=params_from_hf, params_to_hf=params_to_hf,
    checkpoint_fields=("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_layers", "max_position_embeddings",
                       "type_vocab_size", "layer_norm_eps", "activation"),
    head_from_hf=head_from_hf, head_from_params=params_head, head_fields=("num_labels", "next_sentence_prediction"),
))
