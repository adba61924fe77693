"""Device mesh, logical-axis rules, activation sharding constraints and the host-local <-> global array boundary.

Parameters carry logical axis names (`vocab`, `embed`, `mlp`, `heads`, `kv`, ...) as
`logical_axes` metadata, and the layers name their activations' axes (`batch`, `length`, `embed`,
...) in `constrain` calls; one rule table (data, given in gin) maps both to the mesh axes `data`,
`fsdp` and `tensor`. Changing the parallelism layout is a gin change. A dimension that its mesh axes
do not divide stays replicated; `replicated_parameters`, `record_replicated` and `replication_report`
say which, and what that costs.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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


def _mesh_axes(entry: Any, mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes of one `PartitionSpec` entry that have more than one device."""
    return tuple(n for n in ((entry,) if isinstance(entry, str) else tuple(entry or ())) if mesh.shape[n] > 1)


def _spec_entries(spec: PartitionSpec, ndim: int) -> tuple[Any, ...]:
    """The spec's entries padded with None to one per dimension."""
    return tuple(spec) + (None,) * (ndim - len(spec))


def _fit_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes of size 1 (readable specs) and replicates any dimension the remaining
    axes do not divide evenly (e.g. 6 heads over 4 devices)."""
    fitted = []
    for size, entry in zip(shape, _spec_entries(spec, len(shape))):
        names = _mesh_axes(entry, mesh)
        if not names or size % math.prod(mesh.shape[n] for n in names):
            fitted.append(None)
        else:
            fitted.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*fitted)


def _indivisible(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> list[tuple[int, tuple[str, ...]]]:
    """(dimension, mesh axes) of every dimension that `_fit_to_shape` replicates because its axes do not divide it."""
    found = []
    for dim, (size, entry) in enumerate(zip(shape, _spec_entries(spec, len(shape)))):
        names = _mesh_axes(entry, mesh)
        if names and size % math.prod(mesh.shape[n] for n in names):
            found.append((dim, names))
    return found


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


# ---------------------------------------------------------------------------------------------
# Activations: sharding constraints from the same rule table, applied while a step is traced

# (mesh, rules) of the innermost `activation_sharding` block; None outside one (or on one device).
_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar("activation_sharding", default=None)
# The lists that `record_replicated` blocks collect replicated activation dimensions into.
_RECORDERS: contextvars.ContextVar[tuple[list, ...]] = contextvars.ContextVar("replicated_recorders", default=())


def _hashable_rules(rules: Rules) -> tuple[tuple[str, Any], ...]:
    """The rule table as nested tuples (gin may bind lists), so layouts can be cached per table."""
    return tuple((name, axes if axes is None or isinstance(axes, str) else tuple(axes)) for name, axes in rules)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Inside the block, `constrain` maps activations' logical axes through `rules` onto `mesh`.

    The step builders (`training/steps.py`) open it inside the jitted function, so it holds while the
    step is traced; a one-device mesh leaves `constrain` a no-op, as outside any block.
    """
    token = _ACTIVE.set((mesh, _hashable_rules(rules)) if mesh.size > 1 else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def with_activation_sharding(fn: Callable, mesh: Mesh, rules: Rules | None = None) -> Callable:
    """`fn` run inside `activation_sharding(mesh, rules)` (`rules` default: the gin-bound table), so that a jitted
    `fn`'s activations carry the rules' sharding constraints; it keeps `fn`'s name."""
    rules = logical_axis_rules() if rules is None else rules

    @functools.wraps(fn)
    def constrained(*args, **kwargs):
        with activation_sharding(mesh, rules):
            return fn(*args, **kwargs)

    return constrained


@contextlib.contextmanager
def record_replicated() -> Iterator[list[Replicated]]:
    """Collects a `Replicated` for each dimension that `constrain` leaves replicated inside the block
    (i.e. while a step traced inside it runs its constraints)."""
    found: list[Replicated] = []
    token = _RECORDERS.set((*_RECORDERS.get(), found))
    try:
        yield found
    finally:
        _RECORDERS.reset(token)


def constrain(x: jax.Array, name: str, logical_axes: Sequence[str | None]) -> jax.Array:
    """`x` with a sharding constraint from its logical axes (one name or None per dimension) under the
    enclosing `activation_sharding`; `x` itself outside one, so a network runs unchanged without a mesh.

    `name` (e.g. `attention/logits`) identifies the activation in `replication_report`.
    """
    active = _ACTIVE.get()
    if active is None:
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(f"Activation {name!r} of shape {x.shape} needs {x.ndim} logical axes, got {logical_axes}.")
    mesh, rules = active
    spec, indivisible = _activation_layout(tuple(logical_axes), tuple(x.shape), mesh, rules)
    for found in _RECORDERS.get():
        found.extend(_replicated(name, x.shape, x.dtype, dim, axes, mesh) for dim, axes in indivisible)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


@functools.lru_cache(maxsize=4096)
def _activation_layout(
    logical_axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, rules: tuple
) -> tuple[PartitionSpec, list[tuple[int, tuple[str, ...]]]]:
    """An activation's spec on `mesh` and its dimensions left replicated (cached: a trace asks for the same
    few layouts once per layer)."""
    spec = logical_to_spec(logical_axes, rules)
    return _fit_to_shape(spec, shape, mesh), _indivisible(spec, shape, mesh)


# ---------------------------------------------------------------------------------------------
# What is replicated because a mesh axis does not divide it


@dataclasses.dataclass(frozen=True)
class Replicated:
    """One dimension of a parameter or an activation that its mesh axes do not divide, so that the
    array is replicated along it instead of split."""

    kind: str  # "parameter" or "activation"
    name: str  # the parameter path or the activation name
    shape: tuple[int, ...]
    dtype: str
    dim: int
    mesh_axes: tuple[tuple[str, int], ...]  # (mesh axis, its size) the rules map the dimension to

    @property
    def nbytes(self) -> int:
        """The whole array's size in bytes."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def cost(self) -> int:
        """Bytes per device that splitting the dimension over its mesh axes would have saved."""
        return self.nbytes - self.nbytes // math.prod(size for _, size in self.mesh_axes)


def _replicated(name: str, shape: Sequence[int], dtype: Any, dim: int, axes: Sequence[str], mesh: Mesh,
                kind: str = "activation") -> Replicated:
    """A `Replicated` record with plain (hashable, printable) shape, dtype name and mesh axis sizes."""
    return Replicated(kind, name, tuple(int(n) for n in shape), np.dtype(dtype).name, dim,
                      tuple((axis, int(mesh.shape[axis])) for axis in axes))


def replicated_parameters(abstract_params: nnx.State, mesh: Mesh, rules: Rules) -> list[Replicated]:
    """Every parameter dimension that `param_shardings` replicates because its mesh axes do not divide it."""
    found = []
    leaves = jax.tree_util.tree_flatten_with_path(abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    for path, variable in leaves:
        spec = logical_to_spec(variable.get_metadata()["logical_axes"], rules)
        for dim, axes in _indivisible(spec, variable.shape, mesh):
            found.append(_replicated(param_name(path), variable.shape, variable.dtype, dim, axes, mesh, "parameter"))
    return found


def replication_report(found: Iterable[Replicated]) -> list[str]:
    """One line per replicated dimension (none when the mesh axes divide every dimension the rules split), e.g.
    `Parameter token_embedder/embedding [250, 64] float32: dimension 0 (250) is not divisible by tensor=8, so it
    is replicated: 54.7 KiB more per device.` The layers of an unrolled stack share one line (`layers/*/`, with
    their count), and an activation that every layer traces is listed once."""
    counts: dict[Replicated, int] = {}
    for entry in found:
        folded = dataclasses.replace(entry, name=re.sub(r"/\d+(?=/)", "/*", entry.name))
        counts[folded] = (counts.get(folded, 0) + 1) if entry.kind == "parameter" else 1
    return [_report_line(entry, count) for entry, count in counts.items()]


def _report_line(entry: Replicated, count: int) -> str:
    axes = " x ".join(f"{axis}={size}" for axis, size in entry.mesh_axes)
    if count > 1:
        cost = f"{_human_bytes(entry.cost * count)} more per device ({count} parameters)"
    else:
        cost = f"{_human_bytes(entry.cost)} more per device" + (" per array" if entry.kind == "activation" else "")
    return (
        f"{entry.kind.capitalize()} {entry.name} {list(entry.shape)} {entry.dtype}: dimension {entry.dim} "
        f"({entry.shape[entry.dim]}) is not divisible by {axes}, so it is replicated: {cost}."
    )


def _human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'."""
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"
