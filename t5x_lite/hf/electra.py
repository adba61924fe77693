"""ELECTRA <-> Hugging Face `ElectraForPreTraining` (the discriminator), `ElectraForMaskedLM` (the
generator), `ElectraForSequenceClassification` and `ElectraForTokenClassification`: `config.json` both
ways and the tensor map (BERT's for the embeddings and layers, `t5x_lite.hf.bert.encoder_entries`).

A checkpoint's head comes from `architectures`, else from its tensors. Names are read without the
`electra.` prefix; the generator's output layer (`generator_lm_head.weight`) must be the tied copy of the
word embeddings. A generator checkpoint is configured with its own sizes and `generator_fraction` 1.
Export writes the class of the parameters' head; the joint pre-training parameters (`ElectraModel`)
are written as two directories, the discriminator and the generator (`write_pretraining_pair`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from t5x_lite.hf import bert as hf_bert
from t5x_lite.hf import registry, tensor_map
from t5x_lite.models.base import BaseModel
from t5x_lite.models.electra import (
    ElectraClassificationModel,
    ElectraDiscriminatorModel,
    ElectraGeneratorModel,
    ElectraModel,
    ElectraTaggingModel,
)
from t5x_lite.networks.electra import Electra, ElectraConfig

ARCHITECTURES = {
    "ElectraForPreTraining": "discriminator",
    "ElectraForMaskedLM": "generator",
    "ElectraForSequenceClassification": "classification",
    "ElectraForTokenClassification": "tagging",
}
CLASSES = {head: name for name, head in ARCHITECTURES.items()} | {"pretraining": "ElectraForPreTraining"}
MODELS = {
    "pretraining": ElectraModel,
    "discriminator": ElectraDiscriminatorModel,
    "generator": ElectraGeneratorModel,
    "classification": ElectraClassificationModel,
    "tagging": ElectraTaggingModel,
}
SUPPORTED = {"is_decoder": False, "add_cross_attention": False, "position_embedding_type": "absolute"}
# Tensors that hold nothing of their own: the generator's tied output layer and the position buffer.
IGNORED = ("generator_lm_head.weight", "embeddings.position_ids")
HEAD_PREFIXES = ("discriminator_predictions.", "generator_predictions.", "generator_lm_head.", "classifier.")


def hf_name(name: str) -> str:
    """A HF tensor name as the tensor map spells it: without the `electra.` prefix."""
    return name.removeprefix("electra.")


def head_from_hf(hf_config: Mapping, weights: Mapping[str, np.ndarray]) -> str:
    """The checkpoint's head: from `architectures`, else from which head tensors exist."""
    listed = hf_config.get("architectures") or []
    known = [a for a in listed if a in ARCHITECTURES]
    if known:
        return ARCHITECTURES[known[0]]
    names = {hf_name(name) for name in weights}
    for tensor, head in (("generator_lm_head.bias", "generator"), ("discriminator_predictions.dense.weight", "discriminator"),
                         ("classifier.out_proj.weight", "classification"), ("classifier.weight", "tagging")):
        if tensor in names:
            return head
    raise ValueError(f"config.json lists architectures {listed}; t5x_lite converts ELECTRA checkpoints of {sorted(ARCHITECTURES)}.")


def config_from_hf(hf_config: Mapping, weights: Mapping[str, np.ndarray]) -> ElectraConfig:
    """Our `ElectraConfig` for a HF ELECTRA `config.json` (a generator's: its own sizes, fraction 1)."""
    registry.check_supported(hf_config, SUPPORTED, "ELECTRA")
    d_model = hf_config["hidden_size"]
    embedding_size = hf_config.get("embedding_size", d_model)
    return ElectraConfig(
        **hf_bert.encoder_config_fields(hf_config, "ELECTRA"),
        embedding_size=0 if embedding_size == d_model else embedding_size,
        generator_fraction=1.0 if head_from_hf(hf_config, weights) == "generator" else ElectraConfig.generator_fraction,
    )


def generator_only_config(config: ElectraConfig) -> ElectraConfig:
    """The config of the generator as a network of its own (`ElectraForMaskedLM`): its sizes, fraction 1."""
    generator = config.generator_config()
    return dataclasses.replace(
        config, d_model=generator.d_model, num_heads=generator.num_heads, head_dim=generator.head_dim,
        d_ff=generator.d_ff, num_layers=generator.num_layers, embedding_size=config.embedding_width,
        generator_fraction=1.0, generator_num_layers=0,
    )


def _body(config: ElectraConfig, head: str) -> ElectraConfig:
    """The config whose d_model, heads and layers the head's encoder has (the generator's for "generator")."""
    return generator_only_config(config) if head == "generator" else config


def config_to_hf(config: ElectraConfig, head: str = "discriminator") -> dict:
    """A `config.json` that transformers reads as the `ElectraFor*` class of `head` ("pretraining": the
    discriminator's)."""
    body = _body(config, head)
    registry.check_heads_span_d_model(body, "ELECTRA")
    hf_config = {
        "architectures": [CLASSES[head]],
        "model_type": "electra",
        "vocab_size": body.vocab_size,
        "embedding_size": config.embedding_width,
        "hidden_size": body.d_model,
        "num_hidden_layers": body.num_layers,
        "num_attention_heads": body.num_heads,
        "intermediate_size": body.d_ff,
        "hidden_act": {"gelu": "gelu", "gelu_tanh": "gelu_new"}[body.activation],
        "hidden_dropout_prob": body.dropout_rate,
        "attention_probs_dropout_prob": body.dropout_rate,
        "max_position_embeddings": body.max_position_embeddings,
        "type_vocab_size": body.type_vocab_size,
        "initializer_range": body.initializer_range,
        "layer_norm_eps": body.layer_norm_eps,
        "pad_token_id": 0,
        "tie_word_embeddings": True,
    }
    if head in ("classification", "tagging"):
        hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
        hf_config["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
    return hf_config


def _under(entries: list[tensor_map.Entry], prefix: tuple) -> list[tensor_map.Entry]:
    """`entries` with our paths of the layers moved under `prefix` (the generator's body)."""
    return [(name, (*prefix, *path) if path[0] == "layers" else path, layout) for name, path, layout in entries]


def _entries(config: ElectraConfig, head: str) -> list[tensor_map.Entry]:
    """The tensor map (names as `hf_name` gives them) of the embeddings, the head's encoder and the head."""
    body = _body(config, head)
    own = ("generator", "body") if head == "generator" else ()
    entries = _under(hf_bert.encoder_entries(body.num_layers), own)
    if config.embedding_width != body.d_model:
        entries += tensor_map.dense("embeddings_project", (*own, "embeddings_project"))
    if head in ("pretraining", "discriminator"):
        entries += tensor_map.dense("discriminator_predictions.dense", ("discriminator_predictions", "dense"))
        entries += tensor_map.dense("discriminator_predictions.dense_prediction", ("discriminator_predictions", "dense_prediction"))
    elif head == "generator":
        entries += tensor_map.dense("generator_predictions.dense", ("generator", "head", "dense"))
        entries += tensor_map.norm("generator_predictions.LayerNorm", ("generator", "head", "layer_norm"))
        entries.append(("generator_lm_head.bias", ("generator", "head", "bias"), "same"))
    elif head == "classification":
        entries += tensor_map.dense("classifier.dense", ("classifier", "dense"))
        entries += tensor_map.dense("classifier.out_proj", ("classifier", "out_proj"))
    else:
        entries += tensor_map.dense("classifier", ("tagger",))
    return entries


def params_head(params: Mapping) -> str:
    """The head (`networks.electra.HEADS`) whose parameters `params` hold."""
    if "classifier" in params:
        return "classification"
    if "tagger" in params:
        return "tagging"
    if "generator" in params:
        return "pretraining" if "layers" in params else "generator"
    return "discriminator"


def _check_tied(weights: Mapping[str, np.ndarray]) -> None:
    if "generator_lm_head.weight" in weights and not np.array_equal(
        tensor_map.to_numpy(weights["generator_lm_head.weight"]), tensor_map.to_numpy(weights["embeddings.word_embeddings.weight"])
    ):
        raise ValueError("The checkpoint's generator_lm_head.weight differs from the word embeddings; t5x_lite's ELECTRA "
                         "ties the generator's output layer to them, so it cannot load an untied head.")


def params_from_hf(weights: Mapping[str, np.ndarray], hf_config: Mapping, config: ElectraConfig) -> dict:
    """Our unscanned parameters for the checkpoint's own head; a missing or unexpected tensor is named."""
    tensors = tensor_map.Renamed(weights, hf_name)
    head = head_from_hf(hf_config, tensors)
    _check_tied(tensors)
    shapes = tensor_map.param_shapes(Electra, config, head)
    model = f"a {head!r}-head ELECTRA with {_body(config, head).num_layers} layers"
    return tensor_map.params_from_hf(tensors, _entries(config, head), shapes, model, IGNORED)


def params_to_hf(params: Mapping, config: ElectraConfig) -> dict[str, np.ndarray]:
    """HF tensors from our unscanned parameters, named as the `ElectraFor*` class of their head expects
    (the joint pre-training parameters: the discriminator's; the tied generator output layer left out)."""
    head = params_head(params)
    tensors = tensor_map.params_to_hf(params, _entries(config, head))
    return {(name if name.startswith(HEAD_PREFIXES) else "electra." + name): value for name, value in tensors.items()}


def generator_params(params: Mapping) -> dict:
    """The generator's part of the joint pre-training parameters (the shared embeddings and the generator)."""
    return {"embeddings": params["embeddings"], "generator": params["generator"]}


def write_pretraining_pair(params: Mapping, config: ElectraConfig, path: str | Path, vocabulary=None) -> tuple[Path, Path]:
    """Writes `ElectraModel`'s parameters as `path/discriminator` (`ElectraForPreTraining`) and
    `path/generator` (`ElectraForMaskedLM`), as Google's ELECTRA releases come."""
    from t5x_lite.hf import convert

    discriminator = {k: v for k, v in params.items() if k != "generator"}
    folder = Path(path)
    return (convert.write_pretrained(discriminator, config, folder / "discriminator", vocabulary),
            convert.write_pretrained(generator_params(params), generator_only_config(config), folder / "generator", vocabulary))


def build_model(config: ElectraConfig, head: str = "discriminator") -> BaseModel:
    """The trainer's ELECTRA model of `head`."""
    return MODELS[head](config)


FAMILY = registry.register(registry.Family(
    name="electra", model_types=("electra",), config_class=ElectraConfig, build_model=build_model,
    model_names=tuple(model.__name__ for model in MODELS.values()),
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, params_from_hf=params_from_hf, params_to_hf=params_to_hf,
    checkpoint_fields=("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_layers", "max_position_embeddings",
                       "type_vocab_size", "layer_norm_eps", "activation", "embedding_size"),
    head_from_hf=head_from_hf, head_from_params=params_head,
    head_fields=("num_labels", "generator_fraction", "generator_num_layers"),
))
