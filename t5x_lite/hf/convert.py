"""Hugging Face directory <-> t5x_lite model: the functions behind `t5x_lite.hf` and `hf:` checkpoint paths."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import seqio
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from t5x_lite import partitioning
from t5x_lite.hf import files, registry, vocabularies
from t5x_lite.models.base import BaseModel
from t5x_lite.nn import stacks


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """An opened HF directory: its family, raw `config.json`, lazy weights, our derived config, for
    families with several heads (BERT) the checkpoint's head, and the trainer-model settings it fixes
    (an encoder-decoder's `decoder_start_id`)."""

    path: epath.Path
    family: registry.Family
    hf_config: dict
    weights: files.Weights
    config: Any
    head: str | None = None
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def model(self, config: Any = None) -> BaseModel:
        """The trainer's model of this checkpoint's family, head and settings, for `config` (default: its own)."""
        return self.family.model(self.config if config is None else config, self.head, **self.settings)

    def params(self) -> dict:
        """Our parameters, a nested dict of numpy arrays in the unscanned layout (layers keyed 0..n-1)."""
        return self.family.params_from_hf(self.weights, self.hf_config, self.config)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Reads `config.json`, finds the family and derives our config (no tensors loaded but the head's)."""
    folder = files.model_dir(path)
    hf_config = files.read_config(folder)
    family = registry.for_model_type(hf_config.get("model_type"), source=str(folder / "config.json"))
    weights = files.Weights(folder)
    head = None if family.head_from_hf is None else family.head_from_hf(hf_config, weights)
    settings = {} if family.settings_from_hf is None else family.settings_from_hf(hf_config)
    return Checkpoint(folder, family, hf_config, weights, family.config_from_hf(hf_config, weights), head, settings)


def _looks_stacked(params: Mapping) -> bool:
    """True when some layer stack is not keyed by layer numbers (the scan_layers layout)."""
    return any(
        isinstance(value, Mapping)
        and ((stacks.is_stack_key(key) and not all(str(k).isdigit() for k in value)) or _looks_stacked(value))
        for key, value in params.items()
    )


def _converted_params(checkpoint: Checkpoint, stacked: bool) -> dict[str, np.ndarray]:
    """Our parameters by name, in the scanned layout if `stacked`."""
    params = checkpoint.params()
    if stacked:
        params = stacks.stack_layer_params(params)
    return {name: np.asarray(leaf) for name, leaf in partitioning.named_leaves(params).items()}


def _fill(
    abstract: Any, converted: Mapping[str, np.ndarray], source: str, place, fresh: Mapping[str, Any] | None = None
) -> Any:
    """`abstract` with every leaf replaced by `place(array, leaf)`, or by the `fresh` leaf of that name
    where the checkpoint has none; names and shapes must agree."""
    fresh = fresh or {}
    extra = sorted(set(converted) - set(partitioning.named_leaves(abstract)))
    if extra:
        raise ValueError(f"{source} has parameters this model lacks: {extra[:5]}; is the model config the same?")

    def fill(path, leaf):
        name = partitioning.param_name(path)
        if name not in converted and name in fresh:
            return fresh[name]
        if name not in converted:
            raise ValueError(f"{source} has no parameter {name}; is the model config the same?")
        array = converted[name]
        if tuple(array.shape) != tuple(leaf.shape):
            raise ValueError(
                f"Parameter {name} has shape {tuple(array.shape)} in {source} but {tuple(leaf.shape)} in this model; "
                "use the model config of the checkpoint."
            )
        return place(array.astype(leaf.dtype), leaf)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _place_sharded(array: np.ndarray, leaf: Any) -> jax.Array:
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        return jnp.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def restore_params(
    path: str | os.PathLike, abstract_params: dict, model: BaseModel | None = None, fresh: dict | None = None
) -> dict:
    """Parameters of the HF directory at `path` laid out like `abstract_params` (and on its shardings).

    With `model`, its config must match the checkpoint's in the family's `checkpoint_fields` (those
    that shape the parameters or the function; dropout, dtype, remat, scan layout may differ), and the
    model the checkpoint's settings (the decoder start id it was trained from).
    With `fresh` (initialised params: the start of a fine-tuning run, as `checkpoints.restore_params`
    gives them), a parameter the checkpoint lacks keeps its fresh value if it lies under a prefix in
    `model.fresh_param_prefixes` (e.g. a classifier on a `BertForMaskedLM` encoder), and checkpoint
    parameters the model lacks (e.g. that masked-LM head) are left out, as with Orbax checkpoints.
    Every problem is a `FileNotFoundError` or `ValueError` (a missing PyTorch for `.bin` files too).
    """
    try:
        checkpoint = open_checkpoint(path)
        if model is not None:
            source_file = str(checkpoint.path / "config.json")
            registry.check_config_matches(checkpoint.family, checkpoint.config, model.config, source_file)
            registry.check_settings_match(checkpoint.settings, model, source_file)
        converted = _converted_params(checkpoint, _looks_stacked(abstract_params))
    except ImportError as e:
        raise ValueError(str(e)) from e
    source = f"HF checkpoint {checkpoint.path}"
    kept = {}
    if fresh is not None:
        prefixes = tuple(getattr(model, "fresh_param_prefixes", ()))
        kept = {name: leaf for name, leaf in partitioning.named_leaves(fresh).items()
                if name not in converted and name.split("/")[0].startswith(prefixes)}
        unused = sorted(set(converted) - set(partitioning.named_leaves(abstract_params)))
        if unused:
            logging.info("%s: leaving out parameters the model does not have: %s", source, unused)
            converted = {name: array for name, array in converted.items() if name not in unused}
    if kept:
        logging.info("%s: starting %s afresh (the checkpoint lacks them).", source, sorted(kept))
    return _fill(abstract_params, converted, source, _place_sharded, kept)


def load_model(path: str | os.PathLike, **config_overrides: Any) -> BaseModel:
    """The trainer's model object (e.g. `EncoderDecoderModel`) configured like the HF checkpoint.

    `config_overrides` may set the fields `config.json` does not fix (e.g. `dtype="bfloat16"`,
    `dropout_rate=0.0`, `scan_layers=True`, `remat_policy="full"`).
    """
    checkpoint = open_checkpoint(path)
    return checkpoint.model(_override(checkpoint, config_overrides))


def _override(checkpoint: Checkpoint, overrides: Mapping[str, Any]) -> Any:
    fixed = sorted(set(overrides) & set(checkpoint.family.checkpoint_fields))
    if fixed:
        raise ValueError(
            f"Cannot override {fixed}: they are fixed by {checkpoint.path / 'config.json'}; only the other fields "
            f"of {type(checkpoint.config).__name__} (dropout_rate, dtype, ...) may change."
        )
    return dataclasses.replace(checkpoint.config, **overrides)


def from_pretrained(path: str | os.PathLike, **config_overrides: Any) -> tuple[nnx.Module, seqio.Vocabulary | None]:
    """(network, vocabulary) from a Hugging Face model directory.

    The network is the family's NNX module (e.g. `T5`) with the weights loaded, on the default
    device: call it for logits, decode through `load_model(path).predict_batch(network, ...)`, or
    fine-tune it. `network.config` is the derived config. The vocabulary is None when the directory
    has no tokenizer files. `config_overrides`: see `load_model`.
    """
    checkpoint = open_checkpoint(path)
    checkpoint = dataclasses.replace(checkpoint, config=_override(checkpoint, config_overrides))
    model = checkpoint.model()
    abstract = nnx.eval_shape(lambda: model.build_network(nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    pure = nnx.to_pure_dict(abstract_params)
    converted = _converted_params(checkpoint, _looks_stacked(pure))
    params = _fill(pure, converted, f"HF checkpoint {checkpoint.path}", lambda array, leaf: jnp.asarray(array))
    nnx.replace_by_pure_dict(abstract_params, params)
    return nnx.merge(graphdef, abstract_params), _vocabulary_or_none(checkpoint.path)


def _vocabulary_or_none(folder: epath.Path) -> seqio.Vocabulary | None:
    if (folder / vocabularies.SPIECE).is_file() or (folder / vocabularies.TOKENIZER_JSON).is_file():
        return vocabularies.load_vocabulary(str(folder))
    return None


def _to_host(x: jax.Array) -> np.ndarray:
    """A whole array on this host, also when it is sharded over several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def write_pretrained(
    params: Mapping, model: BaseModel | Any, path: str | os.PathLike, vocabulary: seqio.Vocabulary | None = None
) -> epath.Path:
    """Writes a HF directory (`config.json`, `model.safetensors`, tokenizer files) from our params and a
    trainer model (e.g. `load_model(path)`, a run's `MODEL`) or a bare config (its family's default model).

    Special token ids in `config.json` follow t5x_lite's conventions: padding 0, EOS the vocabulary's
    `eos_id` (1 without a vocabulary), and an encoder-decoder starts decoding from the model's
    `decoder_start_id` (`decoder_start_token_id`; T5Gemma's `bos_token_id`s too; 0 for a bare config), so
    that `generate` and HF's label shifting start where the model was trained to.
    """
    if isinstance(model, BaseModel):
        return _write(params, model.config, registry.for_config(model.config).model_settings(model), path, vocabulary)
    return _write(params, model, {}, path, vocabulary)


def _write(
    params: Mapping, config: Any, settings: Mapping[str, Any], path: str | os.PathLike,
    vocabulary: seqio.Vocabulary | None,
) -> epath.Path:
    family = registry.for_config(config)
    params = jax.tree.map(_to_host, dict(params))
    if _looks_stacked(params):
        params = stacks.unstack_layer_params(params)
    head = None if family.head_from_params is None else family.head_from_params(params)
    hf_config = family.hf_config(config, head, **settings)
    if vocabulary is not None and vocabulary.eos_id is not None and "eos_token_id" in hf_config:
        hf_config["eos_token_id"] = vocabulary.eos_id
    folder = files.write_model(path, hf_config, family.params_to_hf(params, config))
    if vocabulary is not None:
        vocabularies.save_vocabulary(vocabulary, folder)
    return folder


def save_pretrained(
    model: nnx.Module, path: str | os.PathLike, vocabulary: seqio.Vocabulary | None = None, **settings: Any
) -> epath.Path:
    """Writes `model` (an NNX network with a `.config`, e.g. from `from_pretrained`) as a HF directory
    that `transformers`' `from_pretrained` loads with the same logits; tokenizer files too if given.
    `settings`: the trainer model's that the network lacks, e.g. `decoder_start_id=2` (default: the family's
    default; `write_pretrained` with the trainer model takes them from it)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return _write(params, model.config, settings, path, vocabulary)


def model_gin(model: BaseModel | Any, source: str = "") -> str:
    """A model gin file for a trainer model (e.g. `load_model(path)`) or a config (its family's default
    model), like gin_configs/models/*/*.gin: fixed fields as values, dropout and activation dtype as
    the usual macros, the config bound for every model of the family so that `MODEL` may switch, and the
    model's settings (an encoder-decoder's `decoder_start_id`)."""
    if not isinstance(model, BaseModel):
        model = registry.for_config(model).model(model)
    config = model.config
    family = registry.for_config(config)
    model_name, config_name = type(model).__name__, type(config).__name__
    lines = [f"# {config_name} of the Hugging Face checkpoint {source}".rstrip() + " (written by tools/convert_hf.py).",
             f"MODEL = @{model_name}()"]
    lines += [f"{name}.config = @{config_name}()" for name in dict.fromkeys((model_name, *family.model_names))]
    lines += [f"{config_name}.{field} = {getattr(config, field)!r}"
              for field in (*family.checkpoint_fields, *family.head_fields)]
    lines += [f"{model_name}.{name} = {value!r}" for name, value in family.model_settings(model).items()]
    macros = {"dropout_rate": "DROPOUT_RATE", "attention_dropout_rate": "DROPOUT_RATE",
              "activation_dropout_rate": "DROPOUT_RATE", "dtype": "ACTIVATION_DTYPE", "kernels": "KERNELS"}
    lines += [f"{config_name}.{name} = %{macro}" for name, macro in macros.items() if hasattr(config, name)]
    return "\n".join(lines) + "\n"
