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
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axis or axes). Unlisted logical axes stay replicated.
DATA_PARALLEL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", None),
    ("embed", None),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("relpos_buckets", None),
    ("layers", None),
)

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
def logical_axis_rules(rules: Rules = DATA_PARALLEL_RULES) -> tuple[tuple[str, Any], ...]:
    """Returns the rule table mapping logical axis names to mesh axes (bound in gin)."""
    return tuple((name, axes) for name, axes in rules)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """Maps one array's logical axis names to a `PartitionSpec` through the rules."""
    return linen_spmd.logical_to_mesh_axes(tuple(logical_axes), tuple(rules))


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules: Rules) -> dict:
    """Shardings (as a pure dict, like the params) for an abstract NNX parameter state."""

    def sharding_of(variable: nnx.Variable) -> NamedSharding:
        logical = variable.get_metadata().get("logical_axes")
        if logical is None:
            raise ValueError(f"Parameter of shape {variable.shape} has no `logical_axes` metadata.")
        return NamedSharding(mesh, logical_to_spec(logical, rules))

    shardings = jax.tree.map(sharding_of, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(shardings) if isinstance(shardings, nnx.State) else shardings


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device (scalars, small state)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of a [batch, length] input array: batch split over the data axes."""
    return NamedSharding(mesh, logical_to_spec(("batch", None), rules))


def host_batch_to_global(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Turns this process's slice of the global batch into global `jax.Array`s on the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
