"""Reusable Flax NNX layers for transformer families (T5, BERT, GPT-2, BART).

Conventions: parameters are float32 `nnx.Param`s carrying `logical_axes` metadata (one name per
dimension, mapped to mesh axes by the partitioning rule table); activations and matmuls run in a
configurable `dtype`; softmax, norms and logits run in float32.
"""

import functools
import math
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from t5x_lite import cpu_features

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]

NEG_INF = -1e10  # additive bias for masked attention logits (finite, so fully masked rows stay NaN-free)


# ---------------------------------------------------------------------------------------------
# Matmul

BF16_DOTS_ENV = "T5X_LITE_BF16_DOTS"  # auto (default), bfloat16 or float32: see `dot_operand_dtype`


def dot_operand_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype in which the operands of a `dtype` matmul enter XLA's dot.

    `dtype` itself, except bfloat16 on a CPU without bf16 dot instructions (`cpu_features`), where XLA's
    bf16 dots run below its float32 ones: there the operands are upcast inside the dot's fusion (exact,
    and activations stay bf16 in memory). T5X_LITE_BF16_DOTS=bfloat16 or =float32 overrides the choice.
    """
    dtype = jnp.dtype(dtype)
    if dtype != jnp.bfloat16:
        return dtype
    choice = os.environ.get(BF16_DOTS_ENV, "auto")
    if choice == "auto":
        emulated = jax.default_backend() == "cpu" and cpu_features.has_bf16_dot() is False
        return jnp.dtype(jnp.float32 if emulated else jnp.bfloat16)
    if choice not in ("bfloat16", "float32"):
        raise ValueError(f"{BF16_DOTS_ENV}={choice!r}: use auto, bfloat16 or float32")
    return jnp.dtype(choice)


def _dot(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """einsum(spec, x, y) accumulating in float32, operands in `dot_operand_dtype`."""
    operands = dot_operand_dtype(x.dtype)
    return jnp.einsum(spec, x.astype(operands), y.astype(operands), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _einsum(spec: str, x: jax.Array, y: jax.Array, out_dtype: jnp.dtype) -> jax.Array:
    return _dot(spec, x, y).astype(out_dtype)


def _einsum_fwd(spec, x, y, out_dtype):
    return _einsum(spec, x, y, out_dtype), (x, y)


def _grad_einsum(result_spec: str, a_spec: str, a: jax.Array, b_spec: str, b: jax.Array) -> jax.Array:
    """Einsum accumulating in float32 whose lhs is the operand owning the result's first free index.

    That order keeps the dot's natural output layout: XLA CPU then needs no transposed copy of the
    result, and bf16 x bf16 -> f32 dots in the other order fail at run time on CPU for some layouts
    (e.g. 'bqhd,bhqk->bkhd': "Unsupported element type for DotThunk ... BF16 x BF16 = F32").
    """
    first_free = next(c for c in result_spec if (c in a_spec) != (c in b_spec))
    if first_free in b_spec:
        a_spec, a, b_spec, b = b_spec, b, a_spec, a
    return _dot(f"{a_spec},{b_spec}->{result_spec}", a, b)


def _einsum_bwd(spec, out_dtype, residuals, g):
    # Autodiff would turn bf16 backward dots into f32 x f32; casting the cotangent to the operands'
    # dtype keeps them bf16 x bf16 -> f32 (bf16 T5-small train step on 2 CPU cores: 7.5 s -> 5.4 s).
    # In float32 the explicit operand order alone saves ~14% of the T5-small step's CPU time over
    # autodiff's dots, which XLA CPU follows with transposed copies.
    x, y = residuals
    inputs, out = spec.split("->")
    x_spec, y_spec = inputs.split(",")
    g = g.astype(x.dtype)
    dx = _grad_einsum(x_spec, out, g, y_spec, y)
    dy = _grad_einsum(y_spec, out, g, x_spec, x)
    return dx.astype(x.dtype), dy.astype(y.dtype)


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


def einsum(
    spec: str, x: jax.Array, y: jax.Array, *, dtype: jnp.dtype, out_dtype: jnp.dtype | None = None
) -> jax.Array:
    """Two-operand einsum with both operands cast to `dtype` (fed to the dot in `dot_operand_dtype`),
    accumulating in float32, with a hand-written VJP whose backward dots keep those operand dtypes and
    a copy-free output layout.

    Every index of an operand must appear in the other operand or the output (true for projections
    and attention), so the backward pass can be written as two einsums. XLA CPU runs bf16 x bf16 -> f32
    dots only in layouts its fast path accepts and picks layouts from the whole graph, so tests must
    execute bf16 steps (a bare 'bhqk,bkhd->bqhd' fed straight to a loss fails).
    """
    dtype = jnp.dtype(dtype)
    out_dtype = dtype if out_dtype is None else jnp.dtype(out_dtype)
    return _einsum(spec, x.astype(dtype), y.astype(dtype), out_dtype)


@jax.custom_vjp
def softmax(logits: jax.Array) -> jax.Array:
    """Softmax over the last axis whose backward pass reads only the saved probabilities.

    Autodiff of `jax.nn.softmax` keeps the exponentials and a broadcast of the normaliser's
    reciprocal (materialised at the full [b, h, q, k] size); the closed form p * (g - sum(g * p))
    needs just p, one tensor of that size fewer to write and read per attention layer.
    """
    return jax.nn.softmax(logits, axis=-1)


def _softmax_fwd(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    probs = softmax(logits)
    return probs, probs


def _softmax_bwd(probs: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (probs * (g - jnp.sum(g * probs, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


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


def broadcast_add(x: jax.Array, y: jax.Array) -> jax.Array:
    """`x + y` with broadcasting; on CPU the backward pass sums over broadcast axes with a dot.

    XLA:CPU reduces over a leading axis slowly: T5's relative-position bias, broadcast over the batch
    and shared by every layer, has a gradient that sums eight layers' [8, 6, 512, 512] cotangents and
    the batch, 94 ms as a reduce and 42 ms as an add then a product with ones (3.1 -> ~0.5 ms tiny).
    """
    if jax.default_backend() != "cpu":
        return x + y
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
# Dropout and masks


def _hash32(x: jax.Array) -> jax.Array:
    """Integer avalanche hash on uint32 ("lowbias32"): a handful of cheap vector ops per element."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
    """Inverted dropout, applied iff `rngs` is given and `rate > 0`; draws one key from `rngs.dropout`.

    The mask hashes each element's index with a 64-bit seed from the key instead of drawing threefry
    bits per element: fine statistics for dropout at ~12x less CPU time (16 ms vs 194 ms for 16M bf16).
    """
    if rngs is None or rate == 0.0:
        return x
    if not 0.0 < rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}.")
    seed = jax.random.bits(rngs.dropout(), (2,), jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim) * jnp.uint32(stride % 2**32)
        stride *= x.shape[dim]
    bits = _hash32(_hash32(index ^ seed[0]) ^ seed[1])
    threshold = min(round(rate * 2**32), 2**32 - 1)
    keep = bits >= jnp.uint32(threshold)
    return jnp.where(keep, x * (1.0 / (1.0 - threshold / 2**32)), jnp.zeros_like(x))


def padding_mask(key_ids: jax.Array) -> jax.Array:
    """[b, 1, 1, k] bool: keys whose token (or segment id) is > 0; 0 marks padding."""
    return (key_ids > 0)[:, None, None, :]


def segment_mask(query_segment_ids: jax.Array, key_segment_ids: jax.Array) -> jax.Array:
    """[b, 1, q, k] bool: query and key lie in the same packed segment."""
    return query_segment_ids[:, None, :, None] == key_segment_ids[:, None, None, :]


def causal_mask(length: int) -> jax.Array:
    """[1, 1, q, k] bool: key position <= query position."""
    return jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]


def mask_to_bias(mask: jax.Array) -> jax.Array:
    """Boolean attention mask -> additive float32 logit bias (0 where allowed, NEG_INF elsewhere)."""
    return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Layers


def variance_scaling(distribution: str, fan: str = "fan_in", *, n_in: int = 1, n_out: int = 1) -> Initializer:
    """Scale-1 variance-scaling init for a kernel whose first `n_in` axes are inputs, last `n_out` outputs."""
    return jax.nn.initializers.variance_scaling(
        1.0, fan, distribution, in_axis=tuple(range(n_in)), out_axis=tuple(range(-n_out, 0))
    )


class RMSNorm(nnx.Module):
    """T5 layer norm: x / sqrt(mean(x^2) + eps) * scale, in float32; no bias, no mean subtraction."""

    def __init__(self, features: int, *, eps: float = 1e-6, dtype: jnp.dtype = jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32), logical_axes=("embed",))
        self.eps = eps
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...]).astype(self.dtype)


class LayerNorm(nnx.Module):
    """Standard layer norm (BERT, GPT-2, BART): (x - mean) / sqrt(var + eps) * scale + bias, in float32."""

    def __init__(self, features: int, *, eps: float = 1e-5, use_bias: bool = True, dtype: jnp.dtype = jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32), logical_axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32), logical_axes=("embed",)) if use_bias else None
        self.eps = eps
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(variance + self.eps) * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.dtype)


DENSE_OUTPUT = "dense_output"  # `checkpoint_name` of every Dense output (see Dense.__call__)


class Dense(nnx.Module):
    """Projection: contracts the trailing `in_shape` axes of x with a kernel of shape
    `in_shape + out_shape` (e.g. embed -> (heads, kv)); `axes` names the kernel's dimensions.
    T5 uses no bias; `use_bias` adds a zero-initialised float32 bias of shape `out_shape`."""

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        axes: Sequence[str],
        *,
        init: Initializer,
        use_bias: bool = False,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        shape = (*in_shape, *out_shape)
        if len(axes) != len(shape):
            raise ValueError(f"Dense: {len(shape)} kernel dims {shape} need as many axis names, got {axes}.")
        self.kernel = nnx.Param(init(rngs.params(), shape, jnp.float32), logical_axes=tuple(axes))
        self.bias = (
            nnx.Param(jnp.zeros(tuple(out_shape), jnp.float32), logical_axes=tuple(axes[len(in_shape):]))
            if use_bias else None
        )
        self.n_in = len(in_shape)
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x: jax.Array, out_dtype: jnp.dtype | None = None) -> jax.Array:
        n_out = self.kernel.ndim - self.n_in
        batch, contract, out = "abcdefgh"[: x.ndim - self.n_in], "ijkl"[: self.n_in], "mnop"[:n_out]
        spec = f"{batch}{contract},{contract}{out}->{batch}{out}"
        y = einsum(spec, x, self.kernel[...], dtype=self.dtype, out_dtype=out_dtype)
        if self.bias is not None:
            y = (y + self.bias[...]).astype(y.dtype)
        # Named for remat policies: the low-precision matmul is a custom-VJP call, which
        # dot-based policies (`dots_with_no_batch_dims_saveable`) do not see; a name works in any dtype.
        return checkpoint_name(y, DENSE_OUTPUT)


class Embed(nnx.Module):
    """Token embedding table [vocab, embed]; `attend` gives tied output logits.

    `stddev` of the normal init: 1.0 for T5; 0.02 for GPT-2/BERT/BART, whose tied logits are unscaled."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        stddev: float = 1.0,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        table = jax.nn.initializers.normal(stddev=stddev)(rngs.params(), (num_embeddings, features), jnp.float32)
        self.embedding = nnx.Param(table, logical_axes=("vocab", "embed"))
        self.dtype = jnp.dtype(dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Float32 logits x @ embedding.T."""
        return einsum("bte,ve->btv", x, self.embedding[...], dtype=self.dtype, out_dtype=jnp.float32)


class PositionEmbed(nnx.Module):
    """Learned absolute position embeddings [max_length, embed] (BERT, GPT-2, BART)."""

    def __init__(
        self, max_length: int, features: int, *, stddev: float = 0.02, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs
    ):
        table = jax.nn.initializers.normal(stddev=stddev)(rngs.params(), (max_length, features), jnp.float32)
        self.embedding = nnx.Param(table, logical_axes=("positions", "embed"))
        self.dtype = jnp.dtype(dtype)

    def __call__(self, positions: jax.Array) -> jax.Array:
        """Embeddings of integer `positions` (any shape); raises a clear error past the table's end."""
        max_length = self.embedding.shape[0]
        if positions.shape[-1] > max_length:
            raise ValueError(
                f"Sequence length {positions.shape[-1]} exceeds the model's {max_length} learned positions; "
                "shorten TASK_FEATURE_LENGTHS or raise the config's max_position_embeddings."
            )
        return jnp.take(self.embedding[...], positions, axis=0).astype(self.dtype)


ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")


def attention_impl(name: str, dtype: jnp.dtype, head_dim: int) -> str:
    """Resolves an attention implementation name: "einsum" (our einsum attention, the low-precision
    matmul path above), "xla" or "cudnn" (`jax.nn.dot_product_attention` with that implementation);
    "auto" picks cuDNN's fused kernel on GPU in bf16/fp16 for head dims it supports, einsum elsewhere
    (on CPU the einsum form measured faster than `dot_product_attention`'s XLA path); an attention
    module built with "auto" also runs einsum for odd sequence lengths, which cuDNN rejects."""
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"Unknown attention implementation {name!r}; use one of {list(ATTENTION_IMPLS)}.")
    if name != "auto":
        return name
    fits = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if fits and jax.default_backend() == "gpu" else "einsum"


class MultiHeadAttention(nnx.Module):
    """Multi-head dot-product attention with separate query/key/value/out projections.

    T5 (the default) does not scale logits by 1/sqrt(head_dim) but folds that factor into the query
    init; `scale_logits=True` scales queries at run time instead (BERT, GPT-2, BART weights), and
    `use_bias` adds projection biases. `bias` is an additive float32 logit bias (relative positions +
    masks) broadcastable to [b, h, q, k]. `implementation` (see `attention_impl`) picks the kernel of
    full-sequence attention; fused kernels have no attention-probability dropout, so while that dropout
    is on (training with a rate > 0) the einsum form runs instead. Cached decoding always uses einsum.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int,
        *,
        dropout_rate: float = 0.0,
        scale_logits: bool = False,
        use_bias: bool = False,
        implementation: str = "einsum",
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        base_init = variance_scaling("normal", n_in=1, n_out=2)

        def query_init(key, shape, dtype):
            return base_init(key, shape, dtype) / math.sqrt(head_dim)

        in_axes, out_axes = ("embed", "heads", "kv"), ("heads", "kv", "embed")
        proj = functools.partial(
            Dense, (d_model,), (num_heads, head_dim), in_axes, use_bias=use_bias, dtype=dtype, rngs=rngs
        )
        self.query = proj(init=base_init if scale_logits else query_init)
        self.key = proj(init=base_init)
        self.value = proj(init=base_init)
        self.out = Dense(
            (num_heads, head_dim), (d_model,), out_axes,
            init=variance_scaling("normal", n_in=2, n_out=1), use_bias=use_bias, dtype=dtype, rngs=rngs,
        )
        self.query_scale = 1.0 / math.sqrt(head_dim) if scale_logits else None
        self.dropout_rate = dropout_rate
        self.dtype = jnp.dtype(dtype)
        self.implementation = attention_impl(implementation, self.dtype, head_dim)
        self.picked_automatically = implementation == "auto"

    def __call__(
        self, inputs_q: jax.Array, inputs_kv: jax.Array, bias: jax.Array, *, dropout_rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        q, k, v = self.project_query(inputs_q), self.key(inputs_kv), self.value(inputs_kv)  # [b, s, h, d]
        return self.attend(q, k, v, bias, dropout_rngs=dropout_rngs)

    def project_query(self, inputs_q: jax.Array) -> jax.Array:
        """Projected queries [b, q, h, d], scaled by 1/sqrt(head_dim) when `scale_logits`."""
        q = self.query(inputs_q)
        return q if self.query_scale is None else q * jnp.asarray(self.query_scale, q.dtype)

    def attend(
        self, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, *, dropout_rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """Attention from projected queries [b, q, h, d] over projected keys/values [b, k, h, d]."""
        fused = self.implementation != "einsum" and (dropout_rngs is None or self.dropout_rate == 0.0)
        if fused and self.picked_automatically and (q.shape[1] % 2 or k.shape[1] % 2):
            fused = False  # cuDNN's kernel with a bias (and its gradient) needs even sequence lengths
        if fused:
            q, k, v = (t.astype(self.dtype) for t in (q, k, v))
            # Masked logits stay finite in the activation dtype (-1e10 would overflow float16). cuDNN takes
            # a bias broadcast over batch and heads only, so a padding mask [b, 1, 1, k] is spread over queries.
            bias = jnp.maximum(bias, jnp.finfo(self.dtype).min / 2).astype(self.dtype)
            bias = jnp.broadcast_to(bias, (*bias.shape[:-2], q.shape[1], k.shape[1]))
            x = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=1.0, implementation=self.implementation)
            return self.out(x)
        logits = broadcast_add(einsum("bqhd,bkhd->bhqk", q, k, dtype=self.dtype, out_dtype=jnp.float32), bias)
        probs = dropout(softmax(logits), self.dropout_rate, dropout_rngs)
        x = einsum("bhqk,bkhd->bqhd", probs, v, dtype=self.dtype)
        return self.out(x)

    def project_kv(self, inputs_kv: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values in the cache layout [b, h, k, d] (activation dtype), e.g. for the encoder side."""
        k, v = self.key(inputs_kv), self.value(inputs_kv)
        return jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)

    def attend_cached(self, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
        """Attention from projected queries [b, q, h, d] over cached keys/values [b, h, k, d].

        The head-major cache layout is what the batched dots consume directly, so a decode step reads
        the cache once instead of transposing all of it (a [b, k, h, d] cache cost a full copy per step).
        """
        logits = einsum("bqhd,bhkd->bhqk", q, k, dtype=self.dtype, out_dtype=jnp.float32) + bias
        x = einsum("bhqk,bhkd->bqhd", jax.nn.softmax(logits, axis=-1), v, dtype=self.dtype)
        return self.out(x)

    def decode_step(
        self, inputs_q: jax.Array, cached_key: jax.Array, cached_value: jax.Array, index: jax.Array, bias: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Self-attention of ONE new position [b, 1, e] with a key/value cache [b, h, max_len, d].

        Writes the position's key and value at slot `index`, then attends over the whole fixed-size
        cache; `bias` [.., 1, max_len] must mask the slots after `index`. Returns (output, key, value).
        """
        q, (k, v) = self.project_query(inputs_q), self.project_kv(inputs_q)
        start = (0, 0, index, 0)
        cached_key = jax.lax.dynamic_update_slice(cached_key, k.astype(cached_key.dtype), start)
        cached_value = jax.lax.dynamic_update_slice(cached_value, v.astype(cached_value.dtype), start)
        return self.attend_cached(q, cached_key, cached_value, bias), cached_key, cached_value


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # BERT, BART (erf form)
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # GPT-2's "gelu_new"
}


class MlpBlock(nnx.Module):
    """Feed-forward block: "gated-gelu" (T5 v1.1: wo(gelu(wi_0 x) * wi_1 x)) or a plain activation
    wo(act(wi x)) with "relu" (T5 v1.0), "gelu" (BERT, BART) or "gelu_tanh" (GPT-2); optional biases."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        activation: str = "gated-gelu",
        dropout_rate: float = 0.0,
        use_bias: bool = False,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = variance_scaling("truncated_normal")
        dense = functools.partial(Dense, init=init, use_bias=use_bias, dtype=dtype, rngs=rngs)
        up = functools.partial(dense, (d_model,), (d_ff,), ("embed", "mlp"))
        if activation == "gated-gelu":
            self.wi_0, self.wi_1 = up(), up()
        elif activation in _ACTIVATIONS:
            self.wi = up()
        else:
            raise ValueError(
                f"Unknown feed-forward activation {activation!r}; use 'gated-gelu' or one of {sorted(_ACTIVATIONS)}."
            )
        self.wo = dense((d_ff,), (d_model,), ("mlp", "embed"))
        self.activation = activation
        self.dropout_rate = dropout_rate

    def __call__(self, x: jax.Array, *, dropout_rngs: nnx.Rngs | None = None) -> jax.Array:
        if self.activation == "gated-gelu":
            h = jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x)
        else:
            h = _ACTIVATIONS[self.activation](self.wi(x))
        return self.wo(dropout(h, self.dropout_rate, dropout_rngs))


def relative_position_bucket(
    relative_position: jax.Array, *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> jax.Array:
    """T5's bucket for relative_position = key_position - query_position.

    Half the buckets (per direction, when bidirectional) are exact small distances, the rest grow
    logarithmically up to `max_distance`; causal (unidirectional) maps all future keys to bucket 0.
    """
    relative_position = jnp.asarray(relative_position, jnp.int32)
    bucket = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    log_ratio = jnp.log(jnp.maximum(distance, max_exact).astype(jnp.float32) / max_exact)
    log_bucket = log_ratio / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    large = jnp.minimum(max_exact + log_bucket.astype(jnp.int32), num_buckets - 1)
    return bucket + jnp.where(distance < max_exact, distance, large)


class RelativePositionBias(nnx.Module):
    """Learned per-head scalar bias for each relative-position bucket (one table per T5 stack)."""

    def __init__(
        self,
        num_heads: int,
        *,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
        rngs: nnx.Rngs,
    ):
        table = variance_scaling("uniform", "fan_avg")(rngs.params(), (num_heads, num_buckets), jnp.float32)
        self.rel_embedding = nnx.Param(table, logical_axes=("heads", "relpos_buckets"))
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional

    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        """[1, h, q, k] float32 bias from 1-D query/key positions."""
        buckets = relative_position_bucket(
            key_positions[None, :] - query_positions[:, None],
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return jnp.take(self.rel_embedding[...], buckets, axis=1)[None]
