"""Checks every network config shares, so a bad gin value fails when the config is built, naming the field."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp

from t5x_lite.nn import attention, kernels, stacks


class ConfigError(ValueError):
    """A bad value in a network, model or adapter config, found when gin builds it; the command line prints
    its first line as the one `error:` line (`cli.run_entry_point`)."""


def check_config(config: object, positive: Sequence[str] = (), choices: dict[str, Sequence[str]] | None = None) -> None:
    """Raises ConfigError for the first bad field of a network config dataclass: a `positive` field < 1,
    a value outside its `choices`, a dropout rate outside [0, 1), an unknown dtype, remat policy,
    attention implementation or kernel set. Starts no JAX backend (host-memory settings must come first)."""
    name = type(config).__name__
    for field in positive:
        if getattr(config, field) < 1:
            raise ConfigError(f"{name}.{field}={getattr(config, field)} must be a positive integer.")
    for field, allowed in (choices or {}).items():
        if getattr(config, field) not in allowed:
            raise ConfigError(f"{name}.{field}={getattr(config, field)!r} is not supported; use one of {list(allowed)}.")
    for field in dataclasses.fields(config):
        if field.name.endswith("dropout_rate") and not 0.0 <= getattr(config, field.name) < 1.0:
            raise ConfigError(f"{name}.{field.name}={getattr(config, field.name)} must be in [0, 1).")
    try:
        stacks.check_remat_policy(name, config.remat_policy)
        kernels.check_choice(name, config.kernels)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if getattr(config, "attention_impl", "auto") not in attention.ATTENTION_IMPLS:
        raise ConfigError(
            f"{name}.attention_impl={config.attention_impl!r} is not supported; use one of "
            f"{list(attention.ATTENTION_IMPLS)}."
        )
    try:
        jnp.dtype(config.dtype)
    except TypeError as e:
        raise ConfigError(f"{name}.dtype={config.dtype!r} is not a dtype name; use e.g. 'float32' or 'bfloat16'.") from e


def max_dropout_rate(config: object) -> float:
    """The largest of a config's dropout rates (0: training needs no dropout RNG)."""
    return max((getattr(config, f.name) for f in dataclasses.fields(config) if f.name.endswith("dropout_rate")),
               default=0.0)
