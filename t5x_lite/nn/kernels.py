"""The hot-path primitives of the layers (matmul, softmax, bias add, dropout), chosen per backend.

`KERNELS` (a gin macro bound to every network config's `kernels` field) picks one set:
  * "xla": plain JAX (`jnp.einsum` accumulating in float32, `jax.nn.softmax`, `+`, `jax.random`
    dropout). No custom VJPs, so JAX's own `jax.checkpoint_policies` see every matmul.
  * "cpu_tuned": what pays on XLA:CPU: matmuls with a hand-written VJP (backward dots keep the
    operands' dtype and a copy-free output layout), a softmax whose backward reads only the saved
    probabilities, a bias add whose backward sums broadcast axes with a dot, integer-hash dropout masks,
    and bf16 matmul operands upcast to float32 on CPUs without bf16 dot instructions.
  * "auto" (default): "cpu_tuned" on the CPU backend, "xla" on GPU/TPU.
`resolve` makes the choice once per process (cached: it reads the backend and the CPU's features on
the first call only; `train()` makes that call before building any network) and returns a hashable
`Kernels` that the layers keep as static configuration. Configs only check the name: resolving starts
JAX's backend, which must wait for the host-memory settings (`host_memory.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from t5x_lite.nn import cpu_features

KERNEL_CHOICES = ("auto", "xla", "cpu_tuned")
# Tests force bf16 dots on every CPU (some XLA:CPU bf16 dot layouts fail only at run time): "auto"
# (default), "bfloat16" or "float32". Read once, by `resolve`.
BF16_DOTS_ENV = "T5X_LITE_BF16_DOTS"


def check_choice(owner: str, name: str) -> None:
    """A clear error for a `kernels` value that is not one of `KERNEL_CHOICES`."""
    if name not in KERNEL_CHOICES:
        raise ValueError(
            f"{owner}.kernels={name!r} is not supported; use one of {list(KERNEL_CHOICES)} "
            "(e.g. --gin.KERNELS=\"'xla'\")."
        )


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One resolved set of primitives: `name` is "xla" or "cpu_tuned"; `bf16_operands` is the dtype in
    which bfloat16 matmul operands enter the dot (float32 where the CPU has no bf16 dot instructions)."""

    name: str
    bf16_operands: str = "bfloat16"

    def describe(self) -> str:
        upcast = ", bf16 matmul operands upcast to float32" if self.bf16_operands != "bfloat16" else ""
        return f"{self.name}{upcast}"

    def operand_dtype(self, dtype: jnp.dtype) -> jnp.dtype:
        """The dtype in which `dtype` matmul operands enter XLA's dot."""
        dtype = jnp.dtype(dtype)
        return jnp.dtype(self.bf16_operands) if dtype == jnp.bfloat16 else dtype

    def einsum(
        self, spec: str, x: jax.Array, y: jax.Array, *, dtype: jnp.dtype, out_dtype: jnp.dtype | None = None
    ) -> jax.Array:
        """Two-operand einsum of `x` and `y` cast to `dtype`, accumulating in float32, returned in
        `out_dtype` (default `dtype`)."""
        dtype = jnp.dtype(dtype)
        out_dtype = dtype if out_dtype is None else jnp.dtype(out_dtype)
        x, y = x.astype(dtype), y.astype(dtype)
        if self.name == "cpu_tuned":
            return _tuned_einsum(spec, x, y, out_dtype, self.operand_dtype(dtype))
        return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32).astype(out_dtype)

    def softmax(self, logits: jax.Array) -> jax.Array:
        """Softmax over the last axis."""
        return _tuned_softmax(logits) if self.name == "cpu_tuned" else jax.nn.softmax(logits, axis=-1)

    def add(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """`x + y` with broadcasting (e.g. a shared attention bias added to every row's logits)."""
        return _tuned_broadcast_add(x, y) if self.name == "cpu_tuned" else x + y

    def dropout(self, x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
        """Inverted dropout, applied iff `rngs` is given and `rate > 0`; draws one key from `rngs.dropout`."""
        if rngs is None or rate == 0.0:
            return x
        if not 0.0 < rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}.")
        key = rngs.dropout()
        if self.name == "cpu_tuned":
            return _hash_dropout(x, rate, key)
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        return jnp.where(keep, x * (1.0 / (1.0 - rate)), jnp.zeros_like(x))


@functools.cache
def resolve(name: str = "auto") -> Kernels:
    """The kernels for `name` ("auto", "xla" or "cpu_tuned") on this process's backend; logged once."""
    check_choice("KERNELS", name)
    backend = jax.default_backend()
    chosen = ("cpu_tuned" if backend == "cpu" else "xla") if name == "auto" else name
    kernels = Kernels(chosen, _bf16_operands(backend) if chosen == "cpu_tuned" else "bfloat16")
    logging.info("KERNELS=%r on the %s backend: %s", name, backend, kernels.describe())
    return kernels


def _bf16_operands(backend: str) -> str:
    """bfloat16, or float32 on a CPU without bf16 dot instructions (XLA emulates those dots slowly)."""
    choice = os.environ.get(BF16_DOTS_ENV, "auto")
    if choice not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"{BF16_DOTS_ENV}={choice!r}: use auto, bfloat16 or float32")
    if choice != "auto":
        return choice
    return "float32" if backend == "cpu" and cpu_features.has_bf16_dot() is False else "bfloat16"


# ---------------------------------------------------------------------------------------------
# cpu_tuned: matmul with a hand-written VJP


def _dot(spec: str, x: jax.Array, y: jax.Array, operand_dtype: jnp.dtype) -> jax.Array:
    return jnp.einsum(spec, x.astype(operand_dtype), y.astype(operand_dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _tuned_einsum(spec: str, x: jax.Array, y: jax.Array, out_dtype: jnp.dtype, operand_dtype: jnp.dtype) -> jax.Array:
    return _dot(spec, x, y, operand_dtype).astype(out_dtype)


def _tuned_einsum_fwd(spec, x, y, out_dtype, operand_dtype):
    return _tuned_einsum(spec, x, y, out_dtype, operand_dtype), (x, y)


def _grad_einsum(result: str, a_spec: str, a: jax.Array, b_spec: str, b: jax.Array, operand_dtype) -> jax.Array:
    """Einsum accumulating in float32 whose lhs is the operand owning the result's first free index.

    That order keeps the dot's natural output layout: XLA:CPU then needs no transposed copy of the
    result, and bf16 x bf16 -> f32 dots in the other order fail at run time on CPU for some layouts
    (e.g. 'bqhd,bhqk->bkhd': "Unsupported element type for DotThunk ... BF16 x BF16 = F32").
    """
    first_free = next(c for c in result if (c in a_spec) != (c in b_spec))
    if first_free in b_spec:
        a_spec, a, b_spec, b = b_spec, b, a_spec, a
    return _dot(f"{a_spec},{b_spec}->{result}", a, b, operand_dtype)


def _tuned_einsum_bwd(spec, out_dtype, operand_dtype, residuals, g):
    # Autodiff would turn bf16 backward dots into f32 x f32; casting the cotangent to the operands'
    # dtype keeps them bf16 x bf16 -> f32, and the explicit operand order avoids XLA:CPU's transposed
    # copies of autodiff's dots (docs/performance.md has the measurements).
    x, y = residuals
    inputs, out = spec.split("->")
    x_spec, y_spec = inputs.split(",")
    g = g.astype(x.dtype)
    dx = _grad_einsum(x_spec, out, g, y_spec, y, operand_dtype)
    dy = _grad_einsum(y_spec, out, g, x_spec, x, operand_dtype)
    return dx.astype(x.dtype), dy.astype(y.dtype)


_tuned_einsum.defvjp(_tuned_einsum_fwd, _tuned_einsum_bwd)


# ---------------------------------------------------------------------------------------------
# cpu_tuned: softmax and broadcast add with lean backward passes


@jax.custom_vjp
def _tuned_softmax(logits: jax.Array) -> jax.Array:
    """Softmax whose backward pass reads only the saved probabilities: p * (g - sum(g * p)), one tensor of
    the [b, h, q, k] size fewer to write and read than autodiff of `jax.nn.softmax` keeps."""
    return jax.nn.softmax(logits, axis=-1)


def _tuned_softmax_fwd(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    probs = _tuned_softmax(logits)
    return probs, probs


def _tuned_softmax_bwd(probs: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (probs * (g - jnp.sum(g * probs, axis=-1, keepdims=True)),)


_tuned_softmax.defvjp(_tuned_softmax_fwd, _tuned_softmax_bwd)


def _sum_to_shape(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The cotangent of broadcasting an array of `shape` to `g.shape`: `g` summed over the broadcast axes,
    as a product with a vector of ones per axis (a dot XLA:CPU runs at memory speed)."""
    lead = g.ndim - len(shape)
    axes = [*range(lead), *(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)]
    if not axes:
        return g.reshape(shape)
    names = "abcdefghijklmnopqrstuvwxyz"[: g.ndim]
    kept = "".join(name for axis, name in enumerate(names) if axis not in axes)
    spec = ",".join([names, *(names[axis] for axis in axes)]) + "->" + kept
    ones = [jnp.ones((g.shape[axis],), g.dtype) for axis in axes]
    return jnp.einsum(spec, g, *ones, precision=jax.lax.Precision.HIGHEST).reshape(shape)


def _tuned_broadcast_add(x: jax.Array, y: jax.Array) -> jax.Array:
    """`x + y` whose backward pass sums over broadcast axes with a dot: XLA:CPU reduces over a leading
    axis slowly (T5's relative-position bias is broadcast over the batch and shared by every layer)."""
    x_shape, x_dtype, y_shape, y_dtype = x.shape, x.dtype, y.shape, y.dtype

    @jax.custom_vjp
    def add(x, y):
        return x + y

    def add_fwd(x, y):
        return x + y, None

    def add_bwd(_, g):
        return _sum_to_shape(g, x_shape).astype(x_dtype), _sum_to_shape(g, y_shape).astype(y_dtype)

    add.defvjp(add_fwd, add_bwd)
    return add(x, y)


# ---------------------------------------------------------------------------------------------
# cpu_tuned: dropout masks from an integer hash


def _hash32(x: jax.Array) -> jax.Array:
    """Integer avalanche hash on uint32 ("lowbias32"): a handful of cheap vector ops per element."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _hash_dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Dropout whose mask hashes each element's index with a 64-bit seed from `key` instead of drawing
    threefry bits per element: fine statistics for dropout at a fraction of the CPU time."""
    seed = jax.random.bits(key, (2,), jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim) * jnp.uint32(stride % 2**32)
        stride *= x.shape[dim]
    bits = _hash32(_hash32(index ^ seed[0]) ^ seed[1])
    threshold = min(round(rate * 2**32), 2**32 - 1)
    keep = bits >= jnp.uint32(threshold)
    return jnp.where(keep, x * (1.0 / (1.0 - threshold / 2**32)), jnp.zeros_like(x))
