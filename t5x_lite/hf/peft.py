"""LoRA adapters <-> Hugging Face PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`).

A PEFT LoRA on a torch `Linear` [out, in] adds `lora_B @ lora_A * lora_alpha / r` with `lora_A.weight`
[r, in] and `lora_B.weight` [out, r]; ours adds A B * alpha / rank to a kernel [in..., out...] with A
[in..., r] and B [r, out...]. So PEFT's A is our A flattened and transposed, its B our B likewise, and
alpha and rank carry over. Which HF module a kernel is comes from the family's tensor map, found by
exporting a probe (each adapted kernel filled with its own number) through `params_to_hf`: one
definition of the names serves the base model and its adapters. The keys are PEFT's:
`base_model.model.<module>.lora_A.weight`. Only LoRA on torch `Linear` projections (T5, BART, BERT,
ELECTRA) is supported; GPT-2's `Conv1D` kernels need PEFT's `fan_in_fan_out` and are refused.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from t5x_lite import partitioning
from t5x_lite.hf import registry

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def _kernel_modules(params: Mapping, config: Any, kernels: list[str]) -> dict[str, str]:
    """Our kernel path -> the HF module name of its torch `Linear`, for those of `kernels` that have one of their
    own (unscanned params in): one export of a probe with each kernel filled with its own number."""
    family = registry.for_config(config)
    numbers = {path: i + 1 for i, path in enumerate(kernels)}
    probe = _map_leaves(params, lambda path, leaf: np.full(np.shape(leaf), numbers.get(path, 0), np.float32))
    modules = {}
    for name, tensor in family.params_to_hf(probe, config).items():
        values = np.unique(tensor)
        if name.endswith(".weight") and len(values) == 1 and values[0] > 0:
            modules[kernels[int(values[0]) - 1]] = name.removesuffix(".weight")
    return modules


def _map_leaves(tree: Mapping, fn, prefix: str = "") -> dict:
    return {key: _map_leaves(value, fn, f"{prefix}{key}/") if isinstance(value, Mapping) else fn(f"{prefix}{key}", value)
            for key, value in tree.items()}


def _adapted(params: Mapping) -> dict[str, dict[str, np.ndarray]]:
    """Kernel path -> {'lora_a', 'lora_b'} of every LoRA in unscanned params."""
    leaves = partitioning.named_leaves(params)
    return {path.removesuffix("/adapter/lora_a") + "/kernel": {
        "lora_a": np.asarray(leaves[path], np.float32),
        "lora_b": np.asarray(leaves[path.removesuffix("lora_a") + "lora_b"], np.float32),
    } for path in leaves if path.endswith("/adapter/lora_a")}


def _target_modules(modules: list[str], all_linear: list[str]) -> list[str]:
    """PEFT's `target_modules`: the modules' last names (e.g. ['q', 'v']) when they select exactly these
    modules among the model's Linears, else the full module names."""
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in modules})
    if {m for m in all_linear if m.rsplit(".", 1)[-1] in suffixes} == set(modules):
        return suffixes
    return sorted(modules)


def save_adapter(
    params: Mapping, config: Any, lora_config: Any, path: str | os.PathLike, base_model: str = "",
) -> epath.Path:
    """Writes the LoRA adapters in `params` (our network's params with adapters, unscanned layout, numpy or
    jax arrays) of a model with `config` as a PEFT adapter folder; returns it."""
    from safetensors.numpy import save_file

    adapted = _adapted(params)
    if not adapted:
        raise ValueError("The params hold no LoRA adapter to export.")
    everything = _kernel_modules(params, config, [p for p in partitioning.named_leaves(params) if p.endswith("/kernel")])
    missing = sorted(set(adapted) - set(everything))
    if missing:
        raise ValueError(f"{missing[0]} has no torch Linear of its own in the HF model; PEFT cannot load a LoRA on it.")
    linear = {kernel: everything[kernel] for kernel in adapted}
    tensors = {}
    for kernel, lora in adapted.items():
        module, rank = linear[kernel], lora["lora_a"].shape[-1]
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(lora["lora_a"].reshape(-1, rank).T)
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(lora["lora_b"].reshape(rank, -1).T)
    folder = epath.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    adapter_config = {
        "peft_type": "LORA", "task_type": _task_type(config), "base_model_name_or_path": base_model or None,
        "r": lora_config.rank, "lora_alpha": lora_config.alpha, "lora_dropout": lora_config.dropout,
        "target_modules": _target_modules(sorted(linear.values()), sorted(everything.values())),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def _task_type(config: Any) -> str | None:
    return {"t5": "SEQ_2_SEQ_LM", "bart": "SEQ_2_SEQ_LM", "gpt2": "CAUSAL_LM"}.get(registry.for_config(config).name)


def load_adapter(path: str | os.PathLike, params: Mapping, config: Any) -> tuple[dict, dict]:
    """(our LoRA params as a nested dict {kernel module path: {'adapter': {'lora_a', 'lora_b'}}} in the unscanned
    layout, LoRAConfig fields {'targets', 'rank', 'alpha', 'dropout'}) of the PEFT adapter folder at `path`,
    for a model with `config` whose (unscanned, adapter-free) params are `params`."""
    from safetensors.numpy import load_file

    folder = epath.Path(path)
    adapter_config = json.loads((folder / CONFIG_FILE).read_text())
    if adapter_config.get("peft_type") != "LORA" or adapter_config.get("use_rslora") or adapter_config.get("use_dora"):
        raise ValueError(f"{folder / CONFIG_FILE}: only plain LoRA adapters (no rsLoRA, DoRA) import.")
    rank, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise ValueError(f"{folder / CONFIG_FILE}: per-module ranks or alphas (rank_pattern, alpha_pattern) do not import.")
    tensors = load_file(str(folder / WEIGHTS_FILE))
    kernels = [p for p in partitioning.named_leaves(params) if p.endswith("/kernel")]
    module_to_kernel = {module: kernel for kernel, module in _kernel_modules(params, config, kernels).items()}
    shapes = {p: leaf.shape for p, leaf in partitioning.named_leaves(params).items()}
    adapters: dict = {}
    pattern = re.compile(rf"^{re.escape(KEY_PREFIX)}(.+)\.lora_A(?:\.[^.]+)?\.weight$")
    for key in tensors:
        match = pattern.match(key)
        if not match:
            continue
        module = match.group(1)
        if module not in module_to_kernel:
            raise ValueError(f"{folder / WEIGHTS_FILE}: {key} adapts {module}, which this model has no projection for.")
        kernel = module_to_kernel[module]
        n_in = _input_axes(shapes[kernel], tensors[key].shape[1])
        a = tensors[key].T.reshape(*shapes[kernel][:n_in], rank)
        b = tensors[key.replace(".lora_A", ".lora_B")].T.reshape(rank, *shapes[kernel][n_in:])
        node = adapters
        for part in kernel.removesuffix("/kernel").split("/"):
            node = node.setdefault(int(part) if part.isdigit() else part, {})
        node["adapter"] = {"lora_a": a.astype(np.float32), "lora_b": b.astype(np.float32)}
    if not adapters:
        raise ValueError(f"{folder / WEIGHTS_FILE} holds no LoRA weights (keys like {KEY_PREFIX}<module>.lora_A.weight).")
    targets = [re.escape(p.removesuffix("/adapter/lora_a") + "/kernel") + "$"
               for p in partitioning.named_leaves(adapters) if p.endswith("/lora_a")]
    return adapters, {"targets": targets, "rank": rank, "alpha": alpha, "dropout": float(adapter_config.get("lora_dropout", 0.0))}


def _input_axes(kernel_shape: tuple[int, ...], fan_in: int) -> int:
    """How many leading axes of a kernel PEFT's input dimension `fan_in` spans."""
    size = 1
    for i, dim in enumerate(kernel_shape):
        size *= dim
        if size == fan_in:
            return i + 1
    raise ValueError(f"A LoRA input of {fan_in} features does not fit a kernel of shape {kernel_shape}.")
