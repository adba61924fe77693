"""Device mesh, logical-axis rules and the host-local <-> global array boundary.

Parameters carry logical axis names (`vocab`, `embed`, `mlp`, `heads`, `kv`, ...) as
`logical_axes` metadata; one rule table (data, given in gin) maps them to the mesh axes
`data`, `fsdp` and `tensor`. Changing the parallelism layout is a gin change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np
from flax import nnx
from flax.linen import spmd as linen_spmd
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Rule tables: (logical axis, mesh axis or axes), in order of precedence. Unlisted logical
# axes stay replicated. A mesh axis of size 1 makes its rules no-ops, so STANDARD_RULES serves
# every layout and MESH_SHAPE alone picks data / FSDP / tensor parallelism.
DATA_PARALLEL_RULES = (("batch", ("data", "fsdp")),)
# ZeRO-3 style: parameters (and their optimizer state) split over `fsdp` along `embed`.
FSDP_RULES = (*DATA_PARALLEL_RULES, ("embed", "fsdp"))
# Megatron style: heads, feed-forward and vocabulary dimensions split over `tensor`.
TENSOR_PARALLEL_RULES = (*DATA_PARALLEL_RULES, ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))
STANDARD_RULES = (*TENSOR_PARALLEL_RULES, ("embed", "fsdp"))

gin.constant("t5x_lite.DATA_PARALLEL_RULES", DATA_PARALLEL_RULES)
gin.constant("t5x_lite.FSDP_RULES", FSDP_RULES)
gin.constant("t5x_lite.TENSOR_PARALLEL_RULES", TENSOR_PARALLEL_RULES)
gin.constant("t5x_lite.STANDARD_RULES", STANDARD_RULES)

Rules = Sequence[tuple[str, Any]]


@gin.configurable
def make_mesh(
    mesh_shape: Mapping[str, int] = gin.REQUIRED,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a `Mesh('data', 'fsdp', 'tensor')`; one size may be -1, meaning "the rest"."""
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(mesh_shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(
            f"MESH_SHAPE has unknown axes {sorted(unknown)}; use only {list(MESH_AXES)}, "
            "e.g. --gin.MESH_SHAPE=\"{'data': -1, 'fsdp': 1, 'tensor': 1}\"."
        )
    sizes = [int(mesh_shape.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"MESH_SHAPE {dict(mesh_shape)} has more than one -1; at most one axis may be -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"MESH_SHAPE {dict(mesh_shape)}: {len(devices)} devices are not divisible by {known}."
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"MESH_SHAPE {dict(mesh_shape)} needs {math.prod(sizes)} devices but {len(devices)} are "
            "available; make the sizes multiply to the device count or set one axis to -1."
        )
    device_array = mesh_utils.create_device_mesh(sizes, devices=devices)
    return Mesh(device_array, MESH_AXES)


@gin.configurable
def logical_axis_rules(rules: Rules = STANDARD_RULES) -> tuple[tuple[str, Any], ...]:
    """Returns the rule table mapping logical axis names to mesh axes (bound in gin)."""
    return tuple((name, axes) for name, axes in rules)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """Maps one array's logical axis names to a `PartitionSpec` through the rules."""
    return linen_spmd.logical_to_mesh_axes(tuple(logical_axes), tuple(rules))


def _fit_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes of size 1 (readable specs) and replicates any dimension the remaining
    axes do not divide evenly (e.g. 6 heads over 4 devices)."""
    fitted = []
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = tuple(n for n in ((axes,) if isinstance(axes, str) else tuple(axes or ())) if mesh.shape[n] > 1)
        if not names or size % math.prod(mesh.shape[n] for n in names):
            fitted.append(None)
        else:
            fitted.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*fitted)


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules: Rules) -> dict:
    """Shardings (as a pure dict, like the params) for an abstract NNX parameter state."""

    def sharding_of(variable: nnx.Variable) -> NamedSharding:
        logical = variable.get_metadata().get("logical_axes")
        if logical is None:
            raise ValueError(f"Parameter of shape {variable.shape} has no `logical_axes` metadata.")
        return NamedSharding(mesh, _fit_to_shape(logical_to_spec(logical, rules), variable.shape, mesh))

    shardings = jax.tree.map(sharding_of, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(shardings) if isinstance(shardings, nnx.State) else shardings


def optimizer_state_shardings(abstract_opt_state: Any, abstract_params: dict, params_shardings: dict, mesh: Mesh) -> Any:
    """Optimizer-state leaves follow the parameter they belong to; the rest is replicated.

    optax states nest copies of the parameter tree, so a leaf belongs to the parameter whose key
    path ends its own. Same-shaped leaves (Adam moments, unfactored second moments) take the
    parameter's sharding; factored statistics (one dimension dropped) take it minus that dimension.
    """
    by_path = {
        tuple(path): (leaf.shape, sharding.spec)
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_flatten_with_path(abstract_params)[0], jax.tree.leaves(params_shardings)
        )
    }
    longest = max((len(p) for p in by_path), default=0)

    def sharding_of(path, leaf) -> NamedSharding:
        for start in range(max(len(path) - longest, 0), len(path)):
            match = by_path.get(tuple(path[start:]))
            if match is not None:
                return NamedSharding(mesh, _derived_spec(leaf.shape, *match))
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(sharding_of, abstract_opt_state)


def _derived_spec(shape: Sequence[int], param_shape: Sequence[int], spec: PartitionSpec) -> PartitionSpec:
    """The parameter's spec for a same-shaped leaf, minus one dimension for a factored one."""
    full = tuple(spec) + (None,) * (len(param_shape) - len(spec))
    if tuple(shape) == tuple(param_shape):
        return PartitionSpec(*full)
    if len(shape) == len(param_shape) - 1:
        candidates = {
            full[:d] + full[d + 1 :]
            for d in range(len(param_shape))
            if tuple(param_shape[:d]) + tuple(param_shape[d + 1 :]) == tuple(shape)
        }
        if len(candidates) == 1:
            return PartitionSpec(*candidates.pop())
    return PartitionSpec()


def param_name(path: Sequence[Any]) -> str:
    """`encoder/layers/0/mlp/wo/kernel` for a jax key path or a tuple of keys (int and str keys alike)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def named_leaves(tree: Any) -> dict[str, Any]:
    """The leaves of a params tree by `param_name`, in tree order."""
    return {param_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device (scalars, small state)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of a [batch, length] input array: batch split over the data axes."""
    return NamedSharding(mesh, logical_to_spec(("batch", None), rules))


def whole_batch_to_mesh(batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
    """A batch that every process holds whole (features run all inputs in every process) on the
    mesh: split over the data axes in a single process, replicated across several."""
    if jax.process_count() > 1:
        return {k: jax.device_put(v, replicated(mesh)) for k, v in batch.items()}
    return host_batch_to_global(batch, batch_sharding(mesh, rules))


def split_batch_to_mesh(batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
    """A batch that every process holds whole, split over the data axes: each process places only the rows its
    own devices hold, so the processes share the work of the batch (evaluation and inference)."""
    sharding = batch_sharding(mesh, rules)
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index]) for k, v in batch.items()}


def gather_to_host(tree: Any) -> Any:
    """Global arrays (e.g. the outputs of a split batch) as whole numpy arrays on every process, in order;
    in a single process just the transfer to the host."""
    return multihost_utils.process_allgather(tree, tiled=True)


def host_batch_to_global(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Turns this process's slice of the global batch into global `jax.Array`s on the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
