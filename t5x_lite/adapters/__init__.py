"""Adapters: small trainable parameters added to a frozen pre-trained network (LoRA, soft prompts).

The shared notion: an adapter's parameters are `AdapterParam`s (a subclass of `nnx.Param`, so the params
tree, its shardings and checkpoints treat them as any parameter). A network that holds any is an *adapter
run*: only its adapter parameters train (the optimizer keeps no state for the rest) and its checkpoints
hold only them (the base comes from the run's INITIAL_CHECKPOINT_PATH). Train state params are plain dicts
without variable types, so the paths of the adapter parameters are read once from the typed network
(`adapter_paths`) and used to split and merge the dicts.

`add_adapters` (gin-configurable) attaches the configured adapters to a freshly built network; every place
that builds a network for training, evaluation, inference or conversion calls it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

import gin
from flax import nnx

from t5x_lite import partitioning

if TYPE_CHECKING:
    from t5x_lite.adapters.lora import LoRAConfig
    from t5x_lite.adapters.prompt import PromptConfig


class AdapterParam(nnx.Param):
    """A parameter of an adapter (LoRA's A and B, a soft prompt): the only kind that trains in an adapter run."""


def is_adapter_param(variable: object) -> bool:
    """Whether `variable` (an nnx Variable, or its type) is an adapter's parameter."""
    kind = variable if isinstance(variable, type) else type(variable)
    return issubclass(kind, AdapterParam)


def adapter_paths(network_or_state: nnx.Module | nnx.State) -> set[str]:
    """The 'a/b/c' paths (as in the pure-dict params tree) of every adapter parameter."""
    state = network_or_state if isinstance(network_or_state, nnx.State) else nnx.state(network_or_state, nnx.Param)
    return {partitioning.param_name(path) for path, variable in nnx.to_flat_state(state) if is_adapter_param(variable)}


def split_params(params: Mapping, paths: Collection[str]) -> tuple[dict, dict]:
    """(adapter params, base params) of a pure-dict params tree, each a nested dict of the same layout."""
    return _subtree(params, set(paths), keep=True), _subtree(params, set(paths), keep=False)


def merge_params(base: Mapping, adapters: Mapping) -> dict:
    """The params tree holding both `base` and `adapters` (disjoint nested dicts; adapters win on overlap)."""
    merged = dict(base)
    for key, value in adapters.items():
        merged[key] = merge_params(base.get(key, {}), value) if isinstance(value, Mapping) else value
    return merged


def _subtree(tree: Mapping, paths: set[str], keep: bool, prefix: str = "") -> dict:
    """The leaves of `tree` whose path is (keep=True) or is not (keep=False) in `paths`; empty dicts dropped."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            sub = _subtree(value, paths, keep, path + "/")
            if sub:
                out[key] = sub
        elif (path in paths) == keep:
            out[key] = value
    return out


@gin.configurable
def add_adapters(
    network: nnx.Module, rngs: nnx.Rngs, lora: LoRAConfig | None = None, prompt: PromptConfig | None = None
) -> nnx.Module:
    """`network` with the configured adapters attached (in place): `lora` a `lora.LoRAConfig`
    (gin: `add_adapters.lora = @LoRAConfig()`), `prompt` a `prompt.PromptConfig` (a soft prompt:
    `add_adapters.prompt = @PromptConfig()`). Without adapters the network is returned unchanged."""
    if lora is not None:
        from t5x_lite.adapters import lora as lora_lib  # lora.py imports this module (AdapterParam)

        lora_lib.apply_lora(network, lora, rngs)
    if prompt is not None:
        from t5x_lite.adapters import prompt as prompt_lib  # prompt.py imports this module (AdapterParam)

        prompt_lib.apply_prompt(network, prompt)
    return network
