"""Reusable Flax NNX layers for transformer families (T5, BERT, GPT-2, BART): masks, norms,
projections, embeddings, feed-forward blocks and T5's relative position bias.

Conventions: parameters are float32 `nnx.Param`s carrying `logical_axes` metadata (one name per
dimension, mapped to mesh axes by the partitioning rule table); activations and matmuls run in a
configurable `dtype`; softmax, norms and logits run in float32. Matmuls and dropout go through the
backend's `kernels.Kernels`. The layers name their activations' axes too (`*_AXES` below) in
`partitioning.constrain` calls, which the same rule table maps to mesh axes while a step is traced
(no-ops without a mesh).
"""

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from t5x_lite import partitioning
from t5x_lite.nn.kernels import Kernels

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]

NEG_INF = -1e10  # additive bias for masked attention logits (finite, so fully masked rows stay NaN-free)

# Logical axes of the activations, mapped to mesh axes by the parameters' rule table (`partitioning.constrain`).
EMBED_AXES = ("batch", "length", "embed")  # the residual stream and every [b, s, embed] output
HEADS_AXES = ("batch", "length", "heads", "kv")  # queries, keys, values and attention outputs per head
ATTENTION_LOGITS_AXES = ("batch", "heads", "length", None)  # [b, h, q, k]: every query needs all keys
MLP_AXES = ("batch", "length", "mlp")  # the feed-forward hidden layer
VOCAB_AXES = ("batch", "length", "vocab")  # output logits


# ---------------------------------------------------------------------------------------------
# Masks


def padding_mask(key_ids: jax.Array) -> jax.Array:
    """[b, 1, 1, k] bool: keys whose token (or segment id) is > 0; 0 marks padding."""
    return (key_ids > 0)[:, None, None, :]


def segment_mask(query_segment_ids: jax.Array, key_segment_ids: jax.Array) -> jax.Array:
    """[b, 1, q, k] bool: query and key lie in the same packed segment."""
    return query_segment_ids[:, None, :, None] == key_segment_ids[:, None, None, :]


def causal_mask(length: int) -> jax.Array:
    """[1, 1, q, k] bool: key position <= query position."""
    return jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]


def encoder_mask(tokens: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """[b, 1, s or 1, s] bool self-attention mask of an encoder: same segment of packed rows (segment id 0 =
    padding), or only non-padding keys (token id 0 = padding) unpacked."""
    if segment_ids is None:
        return padding_mask(tokens)
    return padding_mask(segment_ids) & segment_mask(segment_ids, segment_ids)


def order_mask(attention_rank: jax.Array) -> jax.Array:
    """[b, 1, q, k] bool: the key's place in the row's reading order is at or before the query's (ranks all
    equal: bidirectional; 0..n-1: left-to-right; a permutation: random-factorized)."""
    return attention_rank[:, None, None, :] <= attention_rank[:, None, :, None]


def decoder_masks(
    encoder_input_tokens: jax.Array,
    decoder_input_tokens: jax.Array,
    encoder_segment_ids: jax.Array | None,
    decoder_segment_ids: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """(self-attention mask [b or 1, 1, t, t], cross-attention mask [b, 1, t or 1, s]) of an encoder-decoder's
    decoder: causal and same-segment for packed rows (segment id 0 = padding), padding-only unpacked."""
    if (encoder_segment_ids is None) != (decoder_segment_ids is None):
        raise ValueError("Pass both encoder_segment_ids and decoder_segment_ids (packed) or neither (unpacked).")
    self_mask = causal_mask(decoder_input_tokens.shape[1])
    if decoder_segment_ids is None:
        return self_mask, padding_mask(encoder_input_tokens)
    self_mask = self_mask & padding_mask(decoder_segment_ids)
    self_mask = self_mask & segment_mask(decoder_segment_ids, decoder_segment_ids)
    cross_mask = padding_mask(encoder_segment_ids) & segment_mask(decoder_segment_ids, encoder_segment_ids)
    return self_mask, cross_mask


FULL_WINDOW = 2**30  # the window of a global-attention layer in `sliding_window_mask`: wider than any sequence


def sliding_window_mask(
    query_positions: jax.Array, key_positions: jax.Array, window: int | jax.Array, *, causal: bool
) -> jax.Array:
    """[b or 1, 1, q, k] bool: keys within `window` of the query, from positions [b or 1, q] and [b or 1, k].

    Hugging Face's Gemma-2 conventions: a causal layer sees the `window` latest positions (q - k < window),
    a bidirectional one every key at distance <= window. `window` may be traced (one per scanned layer);
    `FULL_WINDOW` makes the mask all True (a global layer)."""
    distance = query_positions[..., :, None] - key_positions[..., None, :]
    visible = distance < window if causal else jnp.abs(distance) <= window
    return visible[:, None]


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
    T5 uses no bias; `use_bias` adds a zero-initialised float32 bias of shape `out_shape`.
    `adapter` (None unless an adapter such as LoRA is attached, see `t5x_lite.adapters`) is a module whose
    output on the same input is added to the projection's."""

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        axes: Sequence[str],
        *,
        init: Initializer,
        kernels: Kernels,
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
        self.kernels = kernels
        self.dtype = jnp.dtype(dtype)
        self.adapter: nnx.Module | None = nnx.data(None)

    def __call__(self, x: jax.Array, out_dtype: jnp.dtype | None = None) -> jax.Array:
        n_out = self.kernel.ndim - self.n_in
        batch, contract, out = "abcdefgh"[: x.ndim - self.n_in], "ijkl"[: self.n_in], "mnop"[:n_out]
        spec = f"{batch}{contract},{contract}{out}->{batch}{out}"
        y = self.kernels.einsum(spec, x, self.kernel[...], dtype=self.dtype, out_dtype=out_dtype)
        if self.bias is not None:
            y = (y + self.bias[...]).astype(y.dtype)
        if self.adapter is not None:
            y = (y + self.adapter(x)).astype(y.dtype)
        # Named for remat policies: with KERNELS='cpu_tuned' the matmul is a custom-VJP call, which
        # dot-based policies (`dots_with_no_batch_dims_saveable`) do not see; a name works with any kernels.
        return checkpoint_name(y, DENSE_OUTPUT)


class Embed(nnx.Module):
    """Token embedding table [vocab, embed]; `attend` gives tied output logits.

    `stddev` of the normal init: 1.0 for T5; 0.02 for GPT-2/BERT/BART, whose tied logits are unscaled."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        kernels: Kernels,
        stddev: float = 1.0,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        table = jax.nn.initializers.normal(stddev=stddev)(rngs.params(), (num_embeddings, features), jnp.float32)
        self.embedding = nnx.Param(table, logical_axes=("vocab", "embed"))
        self.kernels = kernels
        self.dtype = jnp.dtype(dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Embeddings [b, s, embed] of token ids [b, s]."""
        x = jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
        return partitioning.constrain(x, "embeddings", EMBED_AXES)

    def attend(self, x: jax.Array) -> jax.Array:
        """Float32 logits x @ embedding.T, [b, t, vocab]."""
        logits = self.kernels.einsum("bte,ve->btv", x, self.embedding[...], dtype=self.dtype, out_dtype=jnp.float32)
        return partitioning.constrain(logits, "logits", VOCAB_AXES)


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


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # BERT, BART (erf form)
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # GPT-2's "gelu_new"
}
# Gated feed-forwards wo(act(wi_0 x) * wi_1 x): T5 v1.1's tanh GELU, UL2's SiLU.
_GATED_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gated-gelu": functools.partial(jax.nn.gelu, approximate=True),
    "gated-silu": jax.nn.silu,
}


class MlpBlock(nnx.Module):
    """Feed-forward block: "gated-gelu" (T5 v1.1: wo(gelu(wi_0 x) * wi_1 x)), "gated-silu" (UL2) or a plain activation
    wo(act(wi x)) with "relu" (T5 v1.0), "gelu" (BERT, BART) or "gelu_tanh" (GPT-2); optional biases."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        kernels: Kernels,
        activation: str = "gated-gelu",
        dropout_rate: float = 0.0,
        use_bias: bool = False,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = variance_scaling("truncated_normal")
        dense = functools.partial(Dense, init=init, kernels=kernels, use_bias=use_bias, dtype=dtype, rngs=rngs)
        up = functools.partial(dense, (d_model,), (d_ff,), ("embed", "mlp"))
        if activation in _GATED_ACTIVATIONS:
            self.wi_0, self.wi_1 = up(), up()
        elif activation in _ACTIVATIONS:
            self.wi = up()
        else:
            raise ValueError(
                f"Unknown feed-forward activation {activation!r}; use one of "
                f"{sorted(_GATED_ACTIVATIONS) + sorted(_ACTIVATIONS)}."
            )
        self.wo = dense((d_ff,), (d_model,), ("mlp", "embed"))
        self.activation = activation
        self.dropout_rate = dropout_rate
        self.kernels = kernels

    def __call__(self, x: jax.Array, *, dropout_rngs: nnx.Rngs | None = None) -> jax.Array:
        if self.activation in _GATED_ACTIVATIONS:
            h = _GATED_ACTIVATIONS[self.activation](self._up(self.wi_0, x)) * self._up(self.wi_1, x)
        else:
            h = _ACTIVATIONS[self.activation](self._up(self.wi, x))
        y = self.wo(self.kernels.dropout(h, self.dropout_rate, dropout_rngs))
        return partitioning.constrain(y, "mlp/output", EMBED_AXES)

    @staticmethod
    def _up(dense: Dense, x: jax.Array) -> jax.Array:
        """An up-projection [b, s, mlp], constrained where the matmul produces it."""
        return partitioning.constrain(dense(x), "mlp/hidden", MLP_AXES)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap): Gemma-2's bound on attention and output logits (identity for None)."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (RoPE) of queries or keys [b, s, heads, d] at integer positions [b or 1, s].

    The "rotate half" layout (Llama, Gemma, Hugging Face): dimension i pairs with i + d/2, rotated by
    position * theta**(-2i/d); angles in float32, the product in x's dtype."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (jnp.arange(0, 2 * half, 2, dtype=jnp.float32) / (2 * half))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


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


def param_count(module: nnx.Module) -> int:
    """Total number of parameter elements in `module` (works on `nnx.eval_shape` outputs too)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
