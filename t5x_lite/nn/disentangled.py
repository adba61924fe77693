"""DeBERTa's disentangled self-attention: content-to-content plus content-to-position (c2p) and
position-to-content (p2c) scores over log-bucketed relative positions (He et al., 2021; v2/v3 layout).

The projections are a `MultiHeadAttention`'s (query/key/value/out with biases), so the fused kernels
serve the content part; the two position terms enter as an additive logit bias. Every score is
divided by sqrt(head_dim * (1 + number of position terms)), as the reference does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_lite.nn import attention, layers
from t5x_lite.nn.kernels import Kernels

POSITION_TERMS = ("c2p", "p2c")


def log_bucket_position(relative: jax.Array, buckets: int, max_position: int) -> jax.Array:
    """DeBERTa's bucketing of signed relative distances: exact within +-buckets/2, log-spaced beyond
    (up to `max_position`); `buckets <= 0` keeps the raw distances."""
    if buckets <= 0 or max_position <= 0:
        return relative
    mid = buckets // 2
    sign = jnp.sign(relative)
    near = (relative < mid) & (relative > -mid)
    distance = jnp.where(near, mid - 1, jnp.abs(relative)).astype(jnp.float32)
    log_ratio = jnp.log(distance / mid) / jnp.log(jnp.float32((max_position - 1) / mid))
    log_pos = jnp.ceil(log_ratio * (mid - 1)) + mid
    return jnp.where(distance <= mid, relative.astype(jnp.float32), log_pos * sign).astype(jnp.int32)


def relative_index(positions: jax.Array, span: int, buckets: int, max_position: int) -> jax.Array:
    """[b, q, k] rows of the relative-embedding table each query/key pair reads: bucket(q - k) + span, clipped."""
    relative = positions[:, :, None] - positions[:, None, :]
    return jnp.clip(log_bucket_position(relative, buckets, max_position) + span, 0, 2 * span - 1)


class DisentangledSelfAttention(nnx.Module):
    """Self-attention with DeBERTa's relative-position terms.

    `pos_att_type` lists the position terms ("c2p", "p2c"); with `share_att_key` the relative embeddings
    go through the content key/query projections, otherwise through own `pos_key`/`pos_query` ones.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int,
        *,
        pos_att_type: tuple[str, ...],
        share_att_key: bool,
        kernels: Kernels,
        dropout_rate: float = 0.0,
        implementation: str = "einsum",
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.attention = attention.MultiHeadAttention(
            d_model, num_heads, head_dim, kernels=kernels, dropout_rate=dropout_rate, scale_logits=True,
            use_bias=True, implementation=implementation, dtype=dtype, rngs=rngs,
        )
        self.pos_att_type = tuple(pos_att_type)
        self.share_att_key = share_att_key

        def projection() -> layers.Dense:
            return layers.Dense(
                (d_model,), (num_heads, head_dim), ("embed", "heads", "kv"), init=layers.variance_scaling("normal"),
                kernels=kernels, use_bias=True, dtype=dtype, rngs=rngs,
            )

        own = not share_att_key
        self.pos_key = projection() if own and "c2p" in self.pos_att_type else None
        self.pos_query = projection() if own and "p2c" in self.pos_att_type else None
        # The content scores' 1/sqrt(head_dim) is in the query projection; this is the rest.
        self.extra_scale = 1.0 / math.sqrt(1 + len(self.pos_att_type))
        self.head_scale = 1.0 / math.sqrt(head_dim)

    def position_bias(self, q: jax.Array, k: jax.Array, rel_index: jax.Array, rel_embeddings: jax.Array) -> jax.Array:
        """float32 [b, h, q, k] c2p + p2c scores from scaled queries `q` and keys `k` [b, s, h, d]."""
        scores = jnp.zeros((q.shape[0], q.shape[2], q.shape[1], k.shape[1]), jnp.float32)
        index = rel_index[:, None]  # [b, 1, q, k]
        table = rel_embeddings[None]  # [1, 2 * span, d_model]
        if "c2p" in self.pos_att_type:
            pos_key = (self.attention.key if self.share_att_key else self.pos_key)(table)[0]  # [r, h, d]
            c2p = jnp.einsum("bqhd,rhd->bhqr", q, pos_key, preferred_element_type=jnp.float32)
            scores = scores + jnp.take_along_axis(c2p, jnp.broadcast_to(index, scores.shape), axis=-1)
        if "p2c" in self.pos_att_type:
            pos_query = (self.attention.query if self.share_att_key else self.pos_query)(table)[0]
            scale = self.head_scale * self.extra_scale
            p2c = jnp.einsum("bkhd,rhd->bhkr", k, pos_query, preferred_element_type=jnp.float32) * scale
            # Key k reads row bucket(k - q) flipped, which is bucket(q - k) (the bucketing is odd): the transposed index.
            transposed = jnp.broadcast_to(jnp.swapaxes(index, -1, -2), p2c.shape[:-1] + (q.shape[1],))
            scores = scores + jnp.swapaxes(jnp.take_along_axis(p2c, transposed, axis=-1), -1, -2)
        return scores

    def __call__(
        self, x: jax.Array, bias: jax.Array, rel_index: jax.Array, rel_embeddings: jax.Array,
        *, query_states: jax.Array | None = None, dropout_rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """[b, s, d_model] -> [b, s, d_model]; `bias` is the mask's logit bias, `rel_index` [b, s, s]
        (`relative_index`), `rel_embeddings` the (normed) [2 * span, d_model] table. `query_states`
        [b, s, d_model] (default `x`) give the queries, so c2p reads their content, while `x` gives the keys and
        values, so p2c reads the keys' content (DeBERTa's enhanced mask decoder)."""
        q = self.attention.project_query(x if query_states is None else query_states)
        q = q * jnp.asarray(self.extra_scale, q.dtype)
        k, v = self.attention.project_key_value(x)
        bias = bias + self.position_bias(q, k, rel_index, rel_embeddings)
        return self.attention.attend(q, k, v, bias, dropout_rngs=dropout_rngs)
