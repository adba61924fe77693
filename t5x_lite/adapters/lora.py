"""LoRA (Hu et al., 2021): a low-rank update on chosen projections of a frozen network, any family.

A targeted projection (`nn.layers.Dense`) computes y = x W (+ b) + x A B * alpha / rank, with A
[in..., rank] initialised as PEFT does (Kaiming-uniform, bound 1/sqrt(fan_in)) and B [rank, out...] zero,
so a fresh adapter leaves the network's function unchanged. A and B are `LoRAParam`s, both an
`nnx.LoRAParam` and an `adapters.AdapterParam`, and carry the base kernel's logical axes (A's input axes
are the kernel's input axes, B's output axes its output axes; the rank axis is replicated), so they shard
like the weight they update. In a scanned stack they carry its leading `layers` axis too.

Why not `nnx.LoRA` itself: it is a 2-D `x @ A @ B` without scaling or dropout, while our projections
contract several axes (embed -> heads, kv; heads, kv -> embed) under logical-axis metadata and may sit
in a scanned stack; flattening them would lose the per-axis sharding. `LoRA` below is the same module
over our kernel layout, and its parameters are of nnx's LoRA variable type.

Targets: gin `LoRAConfig.targets`, selection terms over parameter paths in the style of
`training.freezing` (the same matcher: regular expressions searched in paths such as
`encoder/layers/0/attention/query/kernel`); every selected path must be a projection's kernel. The
default, `attention/(query|value)/kernel$`, is the paper's (and PEFT's T5/BERT default): q and v of
every attention.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from t5x_lite.adapters import AdapterParam
from t5x_lite.networks.config_checks import ConfigError
from t5x_lite.nn import layers, stacks
from t5x_lite.training import freezing

DEFAULT_TARGETS = ("attention/(query|value)/kernel$",)
LAYERS_AXIS = "layers"  # the leading axis of a scanned stack's params (`nn.stacks`)


class LoRAParam(AdapterParam, nnx.LoRAParam):
    """LoRA's A and B matrices: adapter parameters of nnx's LoRA variable type."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which projections get LoRA, and its rank and scale (alpha / rank). `dropout` (PEFT's `lora_dropout`) must
    be 0: the projections are called without a dropout RNG, so LoRA's input dropout is not built yet."""

    targets: Sequence[str] | str = DEFAULT_TARGETS
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRAConfig.rank must be an integer >= 1, got {self.rank!r}.")
        if self.dropout != 0.0:
            raise ConfigError(
                f"LoRAConfig.dropout={self.dropout!r}: LoRA input dropout is not supported yet (the projections get "
                "no dropout RNG); set it to 0.0 (the model's own dropout still applies)."
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_a_init(fan_in: int):
    """PEFT's A init (`kaiming_uniform_(a=sqrt(5))`): uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / fan_in**0.5
    return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class LoRA(nnx.Module):
    """The low-rank update of one projection with kernel [in..., out...]: x A B * scale."""

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        axes: Sequence[str | None],
        config: LoRAConfig,
        *,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        n_in, rank = len(in_shape), config.rank
        fan_in = math.prod(in_shape)
        self.lora_a = LoRAParam(
            lora_a_init(fan_in)(rngs.params(), (*in_shape, rank)), logical_axes=(*axes[:n_in], None)
        )
        self.lora_b = LoRAParam(jnp.zeros((rank, *out_shape), jnp.float32), logical_axes=(None, *axes[n_in:]))
        self.scale = config.scale
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in, n_out = self.lora_a.ndim - 1, self.lora_b.ndim - 1
        batch, contract, out = "abcdefgh"[: x.ndim - n_in], "ijkl"[:n_in], "mnop"[:n_out]
        a, b = self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype)
        h = jnp.einsum(f"{batch}{contract},{contract}r->{batch}r", x.astype(self.dtype), a)
        y = jnp.einsum(f"{batch}r,r{out}->{batch}{out}", h, b)
        return y * jnp.asarray(self.scale, y.dtype)


def _projections(network: nnx.Module) -> dict[str, layers.Dense]:
    """Every projection of `network` by its kernel's params path ('.../query/kernel')."""
    return {
        "/".join(map(str, (*path, "kernel"))): module
        for path, module in nnx.iter_graph(network)
        if isinstance(module, layers.Dense)
    }


def target_paths(network: nnx.Module, targets: Sequence[str] | str) -> list[str]:
    """The kernel paths `targets` select (`training.freezing`'s terms); raises a ValueError naming a term
    that matches nothing, or a selected parameter that is not a projection's kernel."""
    params = nnx.to_pure_dict(nnx.state(network, nnx.Param))
    try:
        selected = freezing.select(params, targets)
    except ValueError as e:
        raise ValueError(f"LoRAConfig.targets: {e}") from e
    projections = _projections(network)
    others = sorted(selected - set(projections))
    if others:
        raise ValueError(
            f"LoRAConfig.targets {list(targets) if not isinstance(targets, str) else targets!r} select "
            f"{others[0]}, which is not a projection kernel; LoRA applies to kernels such as {min(projections)}."
        )
    return sorted(selected)


def _make_lora(dense: layers.Dense, config: LoRAConfig, rngs: nnx.Rngs) -> LoRA:
    """A LoRA for `dense`, stacked on a leading `layers` axis when the projection lies in a scanned stack."""
    kernel = dense.kernel
    axes = tuple(kernel.get_metadata().get("logical_axes", (None,) * kernel.ndim))
    stacked = len(axes) == kernel.ndim and axes[0] == LAYERS_AXIS
    shape, axes = (kernel.shape[1:], axes[1:]) if stacked else (kernel.shape, axes)
    n_in = dense.n_in

    def make(layer_rngs: nnx.Rngs) -> LoRA:
        return LoRA(shape[:n_in], shape[n_in:], axes, config, dtype=dense.dtype, rngs=layer_rngs)

    if not stacked:
        return make(rngs)
    return stacks.make_layers(make, kernel.shape[0], scan=True, rngs=rngs)


def apply_lora(network: nnx.Module, config: LoRAConfig, rngs: nnx.Rngs) -> list[str]:
    """Attaches a LoRA to every projection `config.targets` select (in place); returns their kernel paths."""
    paths = target_paths(network, config.targets)
    projections = _projections(network)
    for path in paths:
        projections[path].adapter = _make_lora(projections[path], config, rngs)
    return paths


def _kernel_delta(lora_a: jax.Array, lora_b: jax.Array, kernel_shape: Sequence[int], scale: float) -> jax.Array:
    """A B * scale laid out as the kernel [layers?, in..., out...] (A [layers?, in..., r], B [layers?, r, out...])."""
    lead = lora_a.ndim + lora_b.ndim - 2 - len(kernel_shape)  # 1 in a scanned stack, else 0
    rank = lora_a.shape[-1]
    a = jnp.reshape(lora_a, (*lora_a.shape[:lead], -1, rank))
    b = jnp.reshape(lora_b, (*lora_b.shape[:lead], rank, -1))
    return jnp.reshape(jnp.matmul(a, b) * scale, tuple(kernel_shape))


def merged_params(params: dict, scale: float) -> dict:
    """The params of the base network with every LoRA folded into its kernel (W + A B * alpha / rank) and the
    adapters removed: a plain checkpoint of the same function (pure dicts, scanned or unrolled layout)."""
    merged = {}
    for key, value in params.items():
        if not isinstance(value, dict):
            merged[key] = value
            continue
        sub = merged_params(value, scale)
        lora = sub.pop("adapter", None)
        if isinstance(lora, dict) and set(lora) == {"lora_a", "lora_b"}:
            kernel = sub["kernel"]
            delta = _kernel_delta(jnp.asarray(lora["lora_a"]), jnp.asarray(lora["lora_b"]), kernel.shape, scale)
            sub["kernel"] = (jnp.asarray(kernel, jnp.float32) + delta).astype(kernel.dtype)
        elif lora is not None:
            sub["adapter"] = lora
        merged[key] = sub
    return merged
