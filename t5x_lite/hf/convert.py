"""Hugging Face directory <-> t5x_lite model: the functions behind `t5x_lite.hf` and `hf:` checkpoint paths."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import seqio
from flax import nnx
from jax.experimental import multihost_utils

from t5x_lite.hf import files, registry, vocabularies
from t5x_lite.models.base import BaseModel


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """An opened HF directory: its family, raw `config.json`, lazy weights and our derived config."""

    path: Path
    family: registry.Family
    hf_config: dict
    weights: files.Weights
    config: Any


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Reads `config.json`, finds the family and derives our config (no tensors loaded but the head's)."""
    folder = files.model_dir(path)
    hf_config = files.read_config(folder)
    family = registry.for_model_type(hf_config.get("model_type"), source=str(folder / "config.json"))
    weights = files.Weights(folder)
    return Checkpoint(folder, family, hf_config, weights, family.config_from_hf(hf_config, weights))


def param_name(path: tuple) -> str:
    """`encoder/layers/0/mlp/wo/kernel` for a jax key path (int and str keys alike)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _looks_stacked(params: Mapping) -> bool:
    """True when some `layers` entry is not keyed by layer numbers (the scan_layers layout)."""
    for key, value in params.items():
        if isinstance(value, Mapping):
            if key == "layers" and not all(str(k).isdigit() for k in value):
                return True
            if _looks_stacked(value):
                return True
    return False


def _converted_params(checkpoint: Checkpoint, stacked: bool) -> dict[str, np.ndarray]:
    """Our parameters by name, in the scanned layout if `stacked`."""
    params = checkpoint.family.params_from_hf(checkpoint.weights, checkpoint.hf_config, checkpoint.config)
    if stacked:
        if checkpoint.family.stack_layers is None:
            raise ValueError(f"The {checkpoint.family.name} family has no scanned layout (scan_layers=True).")
        params = checkpoint.family.stack_layers(params)
    return {param_name(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def _fill(abstract: Any, converted: Mapping[str, np.ndarray], source: str, place) -> Any:
    """`abstract` with every leaf replaced by `place(array, leaf)`; names and shapes must agree."""
    abstract_names = {param_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    extra = sorted(set(converted) - abstract_names)
    if extra:
        raise ValueError(f"{source} has parameters this model lacks: {extra[:5]}; is the model config the same?")

    def fill(path, leaf):
        name = param_name(path)
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


def restore_params(path: str | Path, abstract_params: dict, model: BaseModel | None = None) -> dict:
    """Parameters of the HF directory at `path` laid out like `abstract_params` (and on its shardings).

    With `model`, its config must match the checkpoint's in the family's `checkpoint_fields` (those
    that shape the parameters or the function; dropout, dtype, remat, scan layout may differ).
    Every problem is a `FileNotFoundError` or `ValueError` (a missing PyTorch for `.bin` files too).
    """
    try:
        checkpoint = open_checkpoint(path)
        if model is not None:
            registry.check_config_matches(
                checkpoint.family, checkpoint.config, model.config, str(checkpoint.path / "config.json")
            )
        converted = _converted_params(checkpoint, _looks_stacked(abstract_params))
    except ImportError as e:
        raise ValueError(str(e)) from e
    return _fill(abstract_params, converted, f"HF checkpoint {checkpoint.path}", _place_sharded)


def load_model(path: str | Path, **config_overrides: Any) -> BaseModel:
    """The trainer's model object (e.g. `EncoderDecoderModel`) configured like the HF checkpoint.

    `config_overrides` may set the fields `config.json` does not fix (e.g. `dtype="bfloat16"`,
    `dropout_rate=0.0`, `scan_layers=True`, `remat_policy="full"`).
    """
    checkpoint = open_checkpoint(path)
    return checkpoint.family.build_model(_override(checkpoint, config_overrides))


def _override(checkpoint: Checkpoint, overrides: Mapping[str, Any]) -> Any:
    fixed = sorted(set(overrides) & set(checkpoint.family.checkpoint_fields))
    if fixed:
        raise ValueError(
            f"Cannot override {fixed}: they are fixed by {checkpoint.path / 'config.json'}; only the other fields "
            f"of {type(checkpoint.config).__name__} (dropout_rate, dtype, ...) may change."
        )
    return dataclasses.replace(checkpoint.config, **overrides)


def from_pretrained(path: str | Path, **config_overrides: Any) -> tuple[nnx.Module, seqio.Vocabulary | None]:
    """(network, vocabulary) from a Hugging Face model directory.

    The network is the family's NNX module (e.g. `T5`) with the weights loaded, on the default
    device: call it for logits, decode through `load_model(path).predict_batch(network, ...)`, or
    fine-tune it. `network.config` is the derived config. The vocabulary is None when the directory
    has no tokenizer files. `config_overrides`: see `load_model`.
    """
    checkpoint = open_checkpoint(path)
    config = _override(checkpoint, config_overrides)
    checkpoint = dataclasses.replace(checkpoint, config=config)
    model = checkpoint.family.build_model(config)
    abstract = nnx.eval_shape(lambda: model.build_network(nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    pure = nnx.to_pure_dict(abstract_params)
    converted = _converted_params(checkpoint, _looks_stacked(pure))
    params = _fill(pure, converted, f"HF checkpoint {checkpoint.path}", lambda array, leaf: jnp.asarray(array))
    nnx.replace_by_pure_dict(abstract_params, params)
    return nnx.merge(graphdef, abstract_params), _vocabulary_or_none(checkpoint.path)


def _vocabulary_or_none(folder: Path) -> seqio.Vocabulary | None:
    if (folder / vocabularies.SPIECE).is_file() or (folder / vocabularies.TOKENIZER_JSON).is_file():
        return vocabularies.load_vocabulary(str(folder))
    return None


def _to_host(x: jax.Array) -> np.ndarray:
    """A whole array on this host, also when it is sharded over several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def write_pretrained(
    params: Mapping, config: Any, path: str | Path, vocabulary: seqio.Vocabulary | None = None
) -> Path:
    """Writes a HF directory (`config.json`, `model.safetensors`, tokenizer files) from our params + config."""
    family = registry.for_config(config)
    params = jax.tree.map(_to_host, dict(params))
    if _looks_stacked(params):
        params = family.unstack_layers(params)
    folder = files.write_model(path, family.config_to_hf(config), family.params_to_hf(params, config))
    if vocabulary is not None:
        vocabularies.save_vocabulary(vocabulary, folder)
    return folder


def save_pretrained(model: nnx.Module, path: str | Path, vocabulary: seqio.Vocabulary | None = None) -> Path:
    """Writes `model` (an NNX network with a `.config`, e.g. from `from_pretrained`) as a HF directory
    that `transformers`' `from_pretrained` loads with the same logits; tokenizer files too if given."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return write_pretrained(params, model.config, path, vocabulary)


def model_gin(config: Any, source: str = "") -> str:
    """A model gin file for `config` (like gin_configs/models/*/*.gin): fixed fields as values, dropout
    and activation dtype as the usual macros."""
    family = registry.for_config(config)
    model_name, config_name = type(family.build_model(config)).__name__, type(config).__name__
    lines = [f"# {config_name} of the Hugging Face checkpoint {source}".rstrip() + " (written by tools/convert_hf.py).",
             f"MODEL = @{model_name}()", f"{model_name}.config = @{config_name}()"]
    lines += [f"{config_name}.{field} = {getattr(config, field)!r}" for field in family.checkpoint_fields]
    macros = {"dropout_rate": "DROPOUT_RATE", "dtype": "ACTIVATION_DTYPE"}
    lines += [f"{config_name}.{name} = %{macro}" for name, macro in macros.items() if hasattr(config, name)]
    return "\n".join(lines) + "\n"
