"""The one format of every family's Hugging Face tensor map, and the generic copy both ways.

A tensor map is a list of entries `(hf_name, our_path, layout)`: the HF tensor name (as the family
spells it, e.g. without a `model.` prefix), our parameter path in the unscanned layout (layers keyed
0..n-1), and one `LAYOUTS` name. A layout says how the two shapes relate: which two of our axes HF
holds as one (attention heads: torch stores [heads * head_dim]) and whether HF's axes run in reverse
(torch `Linear` weights are [out, in], our kernels [in, out]). Heads and head_dim come from our
parameter's shape, so one definition serves both directions and every family. Tensors that change
size (padded vocabularies, offset position rows, fused projections) are the families' own special
cases: they hand `params_from_hf` prepared tensors under the names of ordinary entries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from t5x_lite import partitioning

Entry = tuple[str, tuple, str]  # (HF tensor name, our parameter path, layout name)

# layout -> (which two of our axes HF merges: "first", "last" or None; whether HF reverses the axes)
LAYOUTS = {
    "same": (None, False),  # embeddings, norms, biases, GPT-2's Conv1D kernels (already [in, out])
    "transpose": (None, True),  # torch Linear [out, in] <-> [in, out]; T5's position table [buckets, heads]
    "qkv": ("last", True),  # torch Linear [heads*kv, embed] <-> [embed, heads, kv]
    "out": ("first", True),  # torch Linear [embed, heads*kv] <-> [heads, kv, embed]
    "heads": ("first", False),  # a query/key/value bias [heads*kv] <-> [heads, kv]
    "conv_qkv": ("last", False),  # GPT-2 Conv1D [embed, heads*kv] <-> [embed, heads, kv]
    "conv_out": ("first", False),  # GPT-2 Conv1D [heads*kv, embed] <-> [heads, kv, embed]
}


def dense(hf: str, ours: tuple, kernel: str = "transpose", bias: str = "same") -> list[Entry]:
    """The entries of a layer with `.weight` and `.bias` (torch `Linear` by default) -> kernel, bias."""
    return [(f"{hf}.weight", (*ours, "kernel"), kernel), (f"{hf}.bias", (*ours, "bias"), bias)]


def norm(hf: str, ours: tuple) -> list[Entry]:
    """The entries of a layer norm with `.weight` and `.bias` -> scale, bias."""
    return [(f"{hf}.weight", (*ours, "scale"), "same"), (f"{hf}.bias", (*ours, "bias"), "same")]


def _merged(shape: tuple[int, ...], merge: str | None) -> tuple[int, ...]:
    if merge == "first":
        return (shape[0] * shape[1], *shape[2:])
    if merge == "last":
        return (*shape[:-2], shape[-2] * shape[-1])
    return tuple(shape)


def hf_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape HF stores for our parameter of `shape` under `layout`."""
    merge, reverse = LAYOUTS[layout]
    merged = _merged(shape, merge)
    return merged[::-1] if reverse else merged


def _to_ours(layout: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return (value.T if LAYOUTS[layout][1] else value).reshape(shape)


def _to_hf(layout: str, value: np.ndarray) -> np.ndarray:
    merge, reverse = LAYOUTS[layout]
    value = value.reshape(_merged(value.shape, merge))
    return value.T if reverse else value


def to_numpy(value: Any) -> np.ndarray:
    """A float32 numpy array from a numpy array, a jax array or a (CPU) torch tensor."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, np.float32)


def get_path(tree: Mapping, path: tuple) -> np.ndarray:
    """The float32 leaf at `path` of a nested dict (layer keys may be int or str)."""
    for key in path:
        tree = tree[key] if key in tree else tree[str(key)]  # layer keys are str in some checkpoints
    return to_numpy(tree)


def set_path(tree: dict, path: tuple, value: Any) -> None:
    """Puts `value` at `path` of a nested dict, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def param_shapes(network_class: Callable[..., nnx.Module], config: Any, *args: Any) -> dict[tuple, tuple[int, ...]]:
    """Our unscanned parameter shapes by path, from an abstract `network_class(config, *args)` (nothing
    is allocated)."""
    per_layer = dataclasses.replace(config, scan_layers=False)
    abstract = nnx.eval_shape(lambda: network_class(per_layer, *args, rngs=nnx.Rngs(0)))
    return {tuple(path): tuple(leaf.shape) for path, leaf in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


class Renamed(Mapping):
    """`weights` under the names `rename` gives them (e.g. without a `model.` prefix), read lazily."""

    def __init__(self, weights: Mapping[str, Any], rename: Callable[[str], str]):
        self._weights = weights
        self._names = {rename(name): name for name in weights}

    def __getitem__(self, name: str) -> Any:
        return self._weights[self._names[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def untied_head(weights: Mapping[str, Any], embeddings: Sequence[str]) -> str | None:
    """The embedding (the first of `embeddings` in `weights`) that `lm_head.weight` differs from; None
    when there is no such head or it is a tied copy."""
    embedding = next((name for name in embeddings if name in weights), None)
    if embedding is None or "lm_head.weight" not in weights:
        return None
    return None if np.array_equal(to_numpy(weights["lm_head.weight"]), to_numpy(weights[embedding])) else embedding


def check_tied_head(weights: Mapping[str, Any], embeddings: Sequence[str], family: str) -> None:
    """Raises when `lm_head.weight` differs from the embedding: `family`'s network ties its output layer."""
    embedding = untied_head(weights, embeddings)
    if embedding:
        raise ValueError(f"The checkpoint has an lm_head.weight that differs from {embedding}; t5x_lite's {family} "
                         "ties its output layer to that embedding, so it cannot load an untied head.")


def pad_vocab(value: np.ndarray, vocab_size: int, name: str) -> np.ndarray:
    """`value` with zero rows appended up to `vocab_size` (their logits are 0); more rows is an error."""
    if value.shape[0] > vocab_size:
        raise ValueError(
            f"{name} has {value.shape[0]} rows, but the config's vocab_size is {vocab_size}; set vocab_size to at "
            "least the checkpoint's."
        )
    return np.pad(value, ((0, vocab_size - value.shape[0]),) + ((0, 0),) * (value.ndim - 1))


def params_from_hf(
    weights: Mapping[str, Any],
    entries: Sequence[Entry],
    shapes: Mapping[tuple, tuple[int, ...]],
    model: str,
    ignored: Collection[str] = (),
) -> dict:
    """Our parameters (a nested dict of float32 numpy arrays) from the HF tensors `weights` (numpy or
    torch), one per entry, checked against our `shapes`. `model` names the architecture in errors (e.g.
    "a GPT2LMHeadModel with 2 layers"); a missing tensor, a wrong shape, or a tensor that is neither
    an entry nor `ignored` (tied copies, buffers) is a ValueError naming the tensor."""
    params: dict = {}
    for name, path, layout in entries:
        ours = partitioning.param_name(path)
        if name not in weights:
            raise ValueError(f"The checkpoint has no tensor {name!r}, which {model} needs for {ours}.")
        value, want = to_numpy(weights[name]), hf_shape(layout, shapes[path])
        if value.shape != want:
            raise ValueError(f"Tensor {name!r} has shape {value.shape}, but the config needs {want} for {ours}.")
        set_path(params, path, _to_ours(layout, value, shapes[path]))
    unexpected = sorted(set(weights) - {name for name, _, _ in entries} - set(ignored))
    if unexpected:
        raise ValueError(
            f"The checkpoint has tensors {model} does not: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; "
            "is it another architecture or a model with an extra head?"
        )
    return params


def params_to_hf(params: Mapping, entries: Sequence[Entry]) -> dict[str, np.ndarray]:
    """HF tensors (float32 numpy) from our unscanned parameters, one per entry: `params_from_hf`'s inverse."""
    return {name: _to_hf(layout, get_path(params, path)) for name, path, layout in entries}
