"""Multi-head attention and the one key/value cache layout every family decodes with.

A layer's cache is head-major, [b, heads, length, head_dim], because that is what the attention dots
consume directly: a decode step reads the cache once instead of transposing it (a [b, length, heads,
head_dim] cache cost a full copy per step). A decoder stack keeps its layers' caches the way it keeps
their parameters: a tuple of per-layer caches for an unrolled stack (each read and written in place,
no slicing), one cache with the layers on axis 1, [b, layers, heads, length, head_dim], for a scanned
stack (batch leading, as beam search requires), whose layer i reads and writes its slice inside the
one `lax.scan` of a decode step, so the decode program stays flat in depth. A sliding-window layer
may keep fewer slots than the decode length, as a ring buffer (`ring_slot`, `ring_visible`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_lite import partitioning
from t5x_lite.nn import layers
from t5x_lite.nn.kernels import Kernels

ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")


def attention_impl(name: str, dtype: jnp.dtype, head_dim: int) -> str:
    """Resolves an attention implementation name: "einsum" (our einsum attention over the backend's
    kernels), "xla" or "cudnn" (`jax.nn.dot_product_attention` with that implementation); "auto" picks
    cuDNN's fused kernel on GPU in bf16/fp16 for head dims it supports, einsum elsewhere (on CPU the
    einsum form measured faster than `dot_product_attention`'s XLA path); an attention module built
    with "auto" also runs einsum for odd sequence lengths, which cuDNN rejects."""
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"Unknown attention implementation {name!r}; use one of {list(ATTENTION_IMPLS)}.")
    if name != "auto":
        return name
    fits = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if fits and jax.default_backend() == "gpu" else "einsum"


class KVCache(NamedTuple):
    """Keys and values, [b, heads, length, head_dim] (one layer) or [b, layers, heads, length, head_dim]
    (a scanned stack), in the activation dtype."""

    key: jax.Array
    value: jax.Array


# A decoder stack's caches: per-layer caches (an unrolled stack) or one stacked cache (a scanned stack).
StackCache = KVCache | tuple[KVCache, ...]


def empty_stack_cache(
    batch: int, num_layers: int, num_heads: int, length: int, head_dim: int, dtype, *, scan: bool
) -> StackCache:
    """Zeroed caches of `length` slots for a stack of `num_layers` layers."""
    if scan:
        shape = (batch, num_layers, num_heads, length, head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    shape = (batch, num_heads, length, head_dim)
    return tuple(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers))


def layer_cache(caches: StackCache, layer: int | jax.Array) -> KVCache:
    """Layer `layer`'s [b, heads, length, head_dim] cache."""
    if not isinstance(caches, KVCache):  # per-layer caches
        return caches[layer]
    take = functools.partial(jax.lax.dynamic_index_in_dim, index=layer, axis=1, keepdims=False)
    return KVCache(take(caches.key), take(caches.value))


def write_layer_slot(
    caches: StackCache, layer: int | jax.Array, slot: jax.Array, key: jax.Array, value: jax.Array
) -> StackCache:
    """The caches with layer `layer`'s position `slot` set to `key`/`value` [b, heads, 1, head_dim]."""
    if not isinstance(caches, KVCache):  # per-layer caches
        old, start = caches[layer], (0, 0, slot, 0)
        new = KVCache(*(jax.lax.dynamic_update_slice(c, x.astype(c.dtype), start) for c, x in zip(old, (key, value))))
        return (*caches[:layer], new, *caches[layer + 1:])
    start = (0, layer, 0, slot, 0)
    return KVCache(
        *(jax.lax.dynamic_update_slice(c, x[:, None].astype(c.dtype), start) for c, x in zip(caches, (key, value)))
    )


def cache_length(caches: StackCache) -> int:
    """The number of slots of a stack's caches."""
    return jax.tree.leaves(caches)[0].shape[-2]


def ring_slot(index: jax.Array, length: int) -> jax.Array:
    """The slot of a ring-buffer cache of `length` slots that index `index` writes: index % length (a
    cache at least as long as the decode is a plain cache: slot = index)."""
    return index % length


def ring_visible(index: jax.Array, first_slot: jax.Array, length: int, window: int | jax.Array) -> jax.Array:
    """[b, length] bool: the slots of a ring-buffer cache (see `ring_slot`) a query at `index` may see.

    Slot s holds the latest index t <= `index` with t % length == s; it is visible iff t is the row's
    (t >= `first_slot` [b], which also hides slots not yet written) and within the query's causal
    `window` (index - t < window). With length >= the decode length this is the plain cache's mask."""
    slots = jnp.arange(length)[None]
    held = index - (index - slots) % length
    return (held >= first_slot[:, None]) & (index - held < window)


class DecodeState(NamedTuple):
    """Everything a network's `decode_step` needs besides its parameters (a pytree whose non-scalar leaves
    all have the batch as their leading axis, so beam search can repeat and gather them row-wise).

    cache: the decoder stack's self-attention keys/values (`StackCache`; T5Gemma's `WindowedCache` groups
        two); slot t holds position t - first_slot of its row (in a ring buffer, slot `ring_slot(t, length)`).
    cross: encoder-decoders: every decoder layer's keys/values of the encoded inputs (None otherwise).
    cross_mask: [b, s] bool, True for real (non-padding) encoder tokens (None without `cross`).
    first_slot: [b] int32, the slot of each row's first position: 0, or the left padding of
        right-aligned prompts (decoder-only models).
    forced_token: [b] int32, a token fed at the first step in place of the loop's start id (the prompt's
        last token, whose logits predict the first new token), -1 for none and after the first step.
    index: int32 scalar, the slot the next `decode_step` fills.
    """

    cache: StackCache
    cross: StackCache | None
    cross_mask: jax.Array | None
    first_slot: jax.Array
    forced_token: jax.Array
    index: jax.Array

    def self_attention_bias(self) -> jax.Array:
        """[b, 1, 1, length] float32: the slots a query at `index` may see (its row's, up to `index`)."""
        slots = jnp.arange(cache_length(self.cache))[None]
        visible = (slots >= self.first_slot[:, None]) & (slots <= self.index)
        return layers.mask_to_bias(visible)[:, None, None, :]

    def cross_attention_bias(self) -> jax.Array:
        """[b, 1, 1, s] float32 bias that hides padding of the encoded inputs."""
        return layers.mask_to_bias(self.cross_mask[:, None, None, :])

    def advanced(self, cache: StackCache) -> DecodeState:
        """The state after a step that wrote `cache`."""
        return self._replace(cache=cache, forced_token=jnp.full_like(self.forced_token, -1), index=self.index + 1)


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
        kernels: Kernels,
        dropout_rate: float = 0.0,
        scale_logits: bool = False,
        use_bias: bool = False,
        implementation: str = "einsum",
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        base_init = layers.variance_scaling("normal", n_in=1, n_out=2)

        def query_init(key, shape, dtype):
            return base_init(key, shape, dtype) / math.sqrt(head_dim)

        in_axes, out_axes = ("embed", "heads", "kv"), ("heads", "kv", "embed")
        proj = functools.partial(
            layers.Dense, (d_model,), (num_heads, head_dim), in_axes,
            kernels=kernels, use_bias=use_bias, dtype=dtype, rngs=rngs,
        )
        self.query = proj(init=base_init if scale_logits else query_init)
        self.key = proj(init=base_init)
        self.value = proj(init=base_init)
        self.out = layers.Dense(
            (num_heads, head_dim), (d_model,), out_axes,
            init=layers.variance_scaling("normal", n_in=2, n_out=1), kernels=kernels, use_bias=use_bias,
            dtype=dtype, rngs=rngs,
        )
        self.query_scale = 1.0 / math.sqrt(head_dim) if scale_logits else None
        self.dropout_rate = dropout_rate
        self.kernels = kernels
        self.dtype = jnp.dtype(dtype)
        self.implementation = attention_impl(implementation, self.dtype, head_dim)
        self.picked_automatically = implementation == "auto"

    def __call__(
        self, inputs_q: jax.Array, inputs_kv: jax.Array, bias: jax.Array, *, dropout_rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        q, (k, v) = self.project_query(inputs_q), self.project_key_value(inputs_kv)  # [b, s, h, d]
        return self.attend(q, k, v, bias, dropout_rngs=dropout_rngs)

    def project_query(self, inputs_q: jax.Array) -> jax.Array:
        """Projected queries [b, q, h, d], scaled by 1/sqrt(head_dim) when `scale_logits`."""
        q = self.query(inputs_q)
        q = q if self.query_scale is None else q * jnp.asarray(self.query_scale, q.dtype)
        return partitioning.constrain(q, "attention/query", layers.HEADS_AXES)

    def project_key_value(self, inputs_kv: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Projected keys and values [b, k, h, d]."""
        k = partitioning.constrain(self.key(inputs_kv), "attention/key", layers.HEADS_AXES)
        return k, partitioning.constrain(self.value(inputs_kv), "attention/value", layers.HEADS_AXES)

    def project_out(self, x: jax.Array) -> jax.Array:
        """Attention per head [b, q, h, d] -> the output projection [b, q, embed]."""
        x = partitioning.constrain(x, "attention/heads", layers.HEADS_AXES)
        return partitioning.constrain(self.out(x), "attention/output", layers.EMBED_AXES)

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
            return self.project_out(x)
        ops = self.kernels
        logits = ops.add(ops.einsum("bqhd,bkhd->bhqk", q, k, dtype=self.dtype, out_dtype=jnp.float32), bias)
        logits = partitioning.constrain(logits, "attention/logits", layers.ATTENTION_LOGITS_AXES)
        probs = ops.dropout(ops.softmax(logits), self.dropout_rate, dropout_rngs)
        return self.project_out(ops.einsum("bhqk,bkhd->bqhd", probs, v, dtype=self.dtype))

    def project_kv(self, inputs_kv: jax.Array) -> KVCache:
        """Keys and values of `inputs_kv` [b, s, e] in the cache layout [b, h, s, d] (activation dtype)."""
        k, v = self.project_key_value(inputs_kv)
        return KVCache(jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))

    def attend_cached(self, inputs_q: jax.Array, cache: KVCache, bias: jax.Array) -> jax.Array:
        """Attention of `inputs_q` [b, q, e] over one layer's cached keys/values [b, h, k, d]."""
        q, ops = self.project_query(inputs_q), self.kernels
        logits = ops.einsum("bqhd,bhkd->bhqk", q, cache.key, dtype=self.dtype, out_dtype=jnp.float32) + bias
        logits = partitioning.constrain(logits, "attention/logits", layers.ATTENTION_LOGITS_AXES)
        x = ops.einsum("bhqk,bhkd->bqhd", jax.nn.softmax(logits, axis=-1), cache.value, dtype=self.dtype)
        return self.project_out(x)

    def decode_step(
        self, inputs_q: jax.Array, caches: StackCache, layer: int | jax.Array, slot: jax.Array, bias: jax.Array
    ) -> tuple[jax.Array, StackCache]:
        """Self-attention of ONE new position [b, 1, e] as layer `layer` of a stack's caches: writes the
        position's key and value at `slot`, then attends over the layer's whole fixed-size cache; `bias`
        [.., 1, length] must hide the slots the position may not see. Returns (output, updated caches)."""
        new = self.project_kv(inputs_q)
        caches = write_layer_slot(caches, layer, slot, new.key, new.value)
        return self.attend_cached(inputs_q, layer_cache(caches, layer), bias), caches


class GroupedQueryAttention(nnx.Module):
    """Grouped-query attention (Gemma-2, T5Gemma): `num_kv_heads` key/value heads, each shared by
    num_heads // num_kv_heads query heads, with optional rotary positions (`rope_theta`), queries scaled by
    `query_scale` and logits soft-capped at `logit_cap` (`layers.soft_cap`) before the mask applies.

    Takes boolean masks (broadcastable to [b, 1, q, k]) rather than additive biases: with no learned bias
    and no soft cap, the fused `jax.nn.dot_product_attention` runs (`implementation`, see `attention_impl`:
    on GPU only); otherwise, and in cached decoding, the einsum form. Keys/values may come from a stream of
    another width (`kv_features`: an encoder-decoder's cross-attention). The cache holds the kv heads only,
    [b, num_kv_heads, length, head_dim], keys after the rotation.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        kernels: Kernels,
        query_scale: float,
        kv_features: int | None = None,
        logit_cap: float | None = None,
        rope_theta: float | None = None,
        dropout_rate: float = 0.0,
        implementation: str = "einsum",
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}.")
        in_axes = ("embed", "heads", "kv")
        proj = functools.partial(
            layers.Dense, init=layers.variance_scaling("normal", n_in=1, n_out=2), kernels=kernels, dtype=dtype,
            rngs=rngs,
        )
        self.query = proj((d_model,), (num_heads, head_dim), in_axes)
        self.key = proj((kv_features or d_model,), (num_kv_heads, head_dim), in_axes)
        self.value = proj((kv_features or d_model,), (num_kv_heads, head_dim), in_axes)
        self.out = layers.Dense(
            (num_heads, head_dim), (d_model,), ("heads", "kv", "embed"),
            init=layers.variance_scaling("normal", n_in=2, n_out=1), kernels=kernels, dtype=dtype, rngs=rngs,
        )
        self.num_kv_heads = num_kv_heads
        self.query_scale = query_scale
        self.logit_cap = logit_cap
        self.rope_theta = rope_theta
        self.dropout_rate = dropout_rate
        self.kernels = kernels
        self.dtype = jnp.dtype(dtype)
        self.implementation = attention_impl(implementation, self.dtype, head_dim)

    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array,
        mask: jax.Array,
        *,
        q_positions: jax.Array | None = None,
        kv_positions: jax.Array | None = None,
        dropout_rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Attention of `inputs_q` [b, q, e] over `inputs_kv` [b, k, e_kv] where `mask` is True; positions
        [b or 1, length] rotate queries and keys when the module has `rope_theta`."""
        q = self.project_query(inputs_q, q_positions)
        k, v = self.project_key_value(inputs_kv, kv_positions)
        return self.attend(q, k, v, mask, dropout_rngs=dropout_rngs)

    def _rotate(self, x: jax.Array, positions: jax.Array | None) -> jax.Array:
        return x if self.rope_theta is None else layers.rotary_embedding(x, positions, self.rope_theta)

    def project_query(self, inputs_q: jax.Array, positions: jax.Array | None) -> jax.Array:
        """Queries [b, q, heads, d], rotated and scaled."""
        q = self._rotate(self.query(inputs_q), positions)
        q = q * jnp.asarray(self.query_scale, q.dtype)
        return partitioning.constrain(q, "attention/query", layers.HEADS_AXES)

    def project_key_value(self, inputs_kv: jax.Array, positions: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Keys (rotated) and values [b, k, kv_heads, d]."""
        k = partitioning.constrain(self._rotate(self.key(inputs_kv), positions), "attention/key", layers.HEADS_AXES)
        return k, partitioning.constrain(self.value(inputs_kv), "attention/value", layers.HEADS_AXES)

    def project_out(self, x: jax.Array) -> jax.Array:
        """Attention per head [b, q, heads, d] -> the output projection [b, q, embed]."""
        x = partitioning.constrain(x, "attention/heads", layers.HEADS_AXES)
        return partitioning.constrain(self.out(x), "attention/output", layers.EMBED_AXES)

    def attend(
        self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, dropout_rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """Attention from queries [b, q, heads, d] over keys/values [b, k, kv_heads, d]."""
        dropout = dropout_rngs is not None and self.dropout_rate > 0.0
        if self.implementation != "einsum" and self.logit_cap is None and not dropout:
            q, k, v = (t.astype(self.dtype) for t in (q, k, v))
            mask = jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], k.shape[1]))
            x = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, implementation=self.implementation)
            return self.project_out(x)
        return self.project_out(self._einsum_attention(q, k, v, mask, dropout_rngs))

    def _einsum_attention(
        self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dropout_rngs: nnx.Rngs | None,
        kv: str = "skd",
    ) -> jax.Array:
        """Per-head outputs [b, q, heads, d]; each group of query heads reads its kv head without copies.
        `kv` names the key/value axes after the batch: "skd" projected, "ksd" the cache layout."""
        ops, (b, length, heads, d) = self.kernels, q.shape
        keys, groups = k.shape[1 + kv.index("s")], heads // self.num_kv_heads
        grouped = q.reshape(b, length, self.num_kv_heads, groups, d)
        logits = ops.einsum(f"bqkgd,b{kv}->bkgqs", grouped, k, dtype=self.dtype, out_dtype=jnp.float32)
        logits = layers.soft_cap(logits.reshape(b, heads, length, keys), self.logit_cap)
        logits = jnp.where(mask, logits, layers.NEG_INF)
        logits = partitioning.constrain(logits, "attention/logits", layers.ATTENTION_LOGITS_AXES)
        probs = ops.dropout(ops.softmax(logits), self.dropout_rate, dropout_rngs)
        probs = probs.reshape(b, self.num_kv_heads, groups, length, keys)
        return ops.einsum(f"bkgqs,b{kv}->bqkgd", probs, v, dtype=self.dtype).reshape(b, length, heads, d)

    def project_kv(self, inputs_kv: jax.Array, positions: jax.Array | None = None) -> KVCache:
        """Keys and values of `inputs_kv` [b, s, e] in the cache layout [b, kv_heads, s, d]."""
        k, v = self.project_key_value(inputs_kv, positions)
        return KVCache(jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))

    def attend_cached(
        self, inputs_q: jax.Array, cache: KVCache, mask: jax.Array, positions: jax.Array | None = None
    ) -> jax.Array:
        """Attention of `inputs_q` [b, q, e] over one layer's cached keys/values [b, kv_heads, k, d]."""
        q = self.project_query(inputs_q, positions)
        return self.project_out(self._einsum_attention(q, cache.key, cache.value, mask, None, kv="ksd"))

    def decode_step(
        self, inputs_q: jax.Array, caches: StackCache, layer: int | jax.Array, slot: jax.Array, mask: jax.Array,
        positions: jax.Array,
    ) -> tuple[jax.Array, StackCache]:
        """Self-attention of ONE new position [b, 1, e] at `positions` [b, 1] as layer `layer` of a stack's
        caches: writes its key and value at `slot`, then attends over the layer's cache where `mask`
        [b, 1, 1, length] is True. Returns (output, updated caches)."""
        new = self.project_kv(inputs_q, positions)
        caches = write_layer_slot(caches, layer, slot, new.key, new.value)
        return self.attend_cached(inputs_q, layer_cache(caches, layer), mask, positions), caches
