"""One converter per model family, found by `config.json`'s `model_type` or by our config's class.

A family module (e.g. `t5x_lite.hf.t5`) holds its `config.json` both ways, its tensor map (in the
format of `t5x_lite.hf.tensor_map`) and its special cases, builds a `Family` and calls `register` at
import; adding a family is one new module plus one line in `FAMILY_MODULES`. The `config.json` checks
the families share are here too.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from t5x_lite.models.base import BaseModel

# Modules that register a family when imported (imported lazily, on the first lookup).
FAMILY_MODULES = ("t5x_lite.hf.t5", "t5x_lite.hf.bert", "t5x_lite.hf.gpt2", "t5x_lite.hf.bart", "t5x_lite.hf.electra",
                 "t5x_lite.hf.t5gemma", "t5x_lite.hf.deberta")


@dataclasses.dataclass(frozen=True)
class Family:
    """How one architecture family maps between Hugging Face files and t5x_lite.

    config_from_hf(hf_config, weights) -> our config (a frozen dataclass, e.g. `T5Config`); `weights`
        is the lazy name -> array mapping, for facts config.json does not state (e.g. an untied head).
    config_to_hf(config) -> the `config.json` dict.
    params_from_hf(weights, hf_config, config) -> our parameters as a pure nested dict of numpy
        arrays, in the unscanned layout (per-layer dicts keyed 0..n-1).
    params_to_hf(params, config) -> {Hugging Face tensor name: numpy array} (unscanned params in).
    build_model(config) -> the trainer's model object (a `BaseModel`).
    checkpoint_fields: the config fields `config.json` fixes (they shape the parameters or the
        function); the others (dropout, activation dtype, remat, scan layout, ...) are free to differ.
    model_names: the gin names of every trainer model taking this config; `model_gin` binds the config
        for each, so that `MODEL` may switch between them (e.g. a causal LM and a prefix LM).

    Families whose checkpoints carry one of several heads (BERT: masked LM, classification, ...) also set
    head_from_hf(hf_config, weights) -> the checkpoint's head; head_from_params(params) -> the head our
        parameters hold; then `build_model` and `config_to_hf` take the head as a second argument
        (optional: without it, the family's default head);
    head_fields: config fields that shape only a head (e.g. `num_labels`): written by `model_gin` but
        not compared on restore, where the model's head may start fresh instead.

    Families whose trainer model has settings beyond the network config that a checkpoint fixes (an
    encoder-decoder's `decoder_start_id`) name them in `settings`; `config_to_hf` then takes them as keyword
    arguments, and settings_from_hf(hf_config) -> {setting: value} reads those `config.json` states (the
    others keep the model's default).
    """

    name: str
    model_types: tuple[str, ...]
    config_class: type
    config_from_hf: Callable[[Mapping, Mapping[str, np.ndarray]], Any]
    config_to_hf: Callable[..., dict]
    params_from_hf: Callable[[Mapping[str, np.ndarray], Mapping, Any], dict]
    params_to_hf: Callable[[Mapping, Any], dict[str, np.ndarray]]
    build_model: Callable[..., BaseModel]
    checkpoint_fields: tuple[str, ...]
    model_names: tuple[str, ...] = ()
    head_from_hf: Callable[[Mapping, Mapping[str, np.ndarray]], str] | None = None
    head_from_params: Callable[[Mapping], str] | None = None
    head_fields: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()
    settings_from_hf: Callable[[Mapping], dict[str, Any]] | None = None

    def model(self, config: Any, head: str | None = None, **settings: Any) -> BaseModel:
        """The trainer's model for `config` (with `head`, for families that have several, and `settings`)."""
        return self.build_model(config, **settings) if head is None else self.build_model(config, head, **settings)

    def hf_config(self, config: Any, head: str | None = None, **settings: Any) -> dict:
        """The `config.json` dict for `config` (with `head`, for families that have several, and `settings`)."""
        return self.config_to_hf(config, **settings) if head is None else self.config_to_hf(config, head, **settings)

    def model_settings(self, model: BaseModel) -> dict[str, Any]:
        """`model`'s values of this family's `settings`."""
        return {name: getattr(model, name) for name in self.settings}


_FAMILIES: list[Family] = []


def register(family: Family) -> Family:
    """Adds a family (replacing one of the same name, so re-imports are harmless)."""
    _FAMILIES[:] = [f for f in _FAMILIES if f.name != family.name] + [family]
    return family


def _families() -> list[Family]:
    for module in FAMILY_MODULES:
        importlib.import_module(module)
    return _FAMILIES


def supported_model_types() -> list[str]:
    return sorted(t for family in _families() for t in family.model_types)


def for_model_type(model_type: str | None, source: str = "config.json") -> Family:
    """The family converting `model_type`; an unknown type names the supported ones."""
    for family in _families():
        if model_type in family.model_types:
            return family
    raise ValueError(
        f"{source} has model_type={model_type!r}, which t5x_lite cannot convert; supported model types: "
        f"{', '.join(supported_model_types())}."
    )


def for_config(config: Any) -> Family:
    """The family whose t5x_lite config class `config` is an instance of (its exact class first: an
    `ElectraConfig` is a `BertConfig` too)."""
    for family in sorted(_families(), key=lambda family: type(config) is not family.config_class):
        if isinstance(config, family.config_class):
            return family
    raise ValueError(
        f"No Hugging Face converter for a model configured by {type(config).__name__}; supported: "
        f"{', '.join(f.config_class.__name__ for f in _families())}."
    )


def check_supported(hf_config: Mapping, supported: Mapping[str, Any], family: str) -> None:
    """Raises for a `config.json` key that would make the network compute something else than `family`'s
    (`supported`: key -> the one value we support, also assumed when the key is absent)."""
    for key, value in supported.items():
        if hf_config.get(key, value) != value:
            raise ValueError(f"config.json has {key}={hf_config[key]!r}; t5x_lite's {family} supports only {value!r}.")


def translate(hf_config: Mapping, key: str, default: str, ours: Mapping[str, str], family: str) -> str:
    """Our name for `config.json`'s `key` (`default` when absent) through `ours`; other values are refused."""
    value = hf_config.get(key, default)
    if value not in ours:
        raise ValueError(f"config.json has {key}={value!r}; t5x_lite's {family} supports {sorted(ours)}.")
    return ours[value]


def head_dim(d_model: int, heads: int, d_model_key: str) -> int:
    """`config.json`'s width per attention head; a `d_model_key` value that heads do not divide is refused."""
    if d_model % heads:
        raise ValueError(f"config.json has {d_model_key}={d_model}, not a multiple of its {heads} attention heads.")
    return d_model // heads


def check_heads_span_d_model(config: Any, family: str) -> None:
    """Hugging Face's `family` derives the head width from d_model; a config whose heads do not span it is refused."""
    if config.num_heads * config.head_dim != config.d_model:
        raise ValueError(
            f"Hugging Face {family} needs num_heads * head_dim == d_model; this {type(config).__name__} has "
            f"{config.num_heads} * {config.head_dim} != {config.d_model}."
        )


def decoder_start_from_hf(hf_config: Mapping, default: int, *fallbacks: Mapping) -> dict[str, int]:
    """An encoder-decoder's settings from `config.json`: the decoder start id, as `generate` picks it
    (`decoder_start_token_id` of the config, then of `fallbacks` such as a nested decoder config, else their
    `bos_token_id` in that order), else `default`."""
    for key in ("decoder_start_token_id", "bos_token_id"):
        for source in (hf_config, *fallbacks):
            if source.get(key) is not None:
                return {"decoder_start_id": int(source[key])}
    return {"decoder_start_id": default}


def check_settings_match(expected: Mapping[str, Any], model: BaseModel, source: str) -> None:
    """Raises if the model's value of a setting the checkpoint fixes (`expected`) differs from the checkpoint's."""
    for name, want in expected.items():
        have = getattr(model, name)
        if want != have:
            setting = f"{type(model).__name__}.{name}"
            raise ValueError(
                f"{setting} is {have!r} in the model config but {want!r} in {source}; set --gin.{setting}={want!r} "
                "or use the model gin file that tools/convert_hf.py writes for it."
            )


def check_config_matches(family: Family, expected: Any, configured: Any, source: str) -> None:
    """Raises if a parameter-relevant field of the configured (gin) model differs from the checkpoint's."""
    for field in family.checkpoint_fields:
        want, have = getattr(expected, field), getattr(configured, field)
        if want != have:
            name = f"{type(configured).__name__}.{field}"
            value = f'"{want!r}"' if isinstance(want, str) else repr(want)
            raise ValueError(
                f"{name} is {have!r} in the model config but {want!r} in {source}; set "
                f"--gin.{name}={value} or use the model gin file that tools/convert_hf.py writes for it."
            )
