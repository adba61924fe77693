"""XLNet's two-stream self-attention (Yang et al. 2019, section 2.3) over the existing attention module.

A permutation LM predicts each token from the tokens before it in a factorization order, so the
representation that predicts position i must know i's position but not its token, while the
representation that later positions read must hold i's token. Two streams share every parameter:

  content stream h_i: attends to the content of every position j with rank(j) <= rank(i) (itself included)
  query stream   g_i: attends to the content of every position j with rank(j) <  rank(i) (never itself)

Keys and values always come from the content stream; the query stream is never read by anyone, so a
position's own token reaches its query-stream output by no path. Both streams travel as one
[b, 2s, e] array, content rows first: per-token layers (norms, MLPs) run on it unchanged, and one
attention call serves both streams with queries over all 2s rows and keys over the first s.

The first position of an order has nothing it may see in the query stream. A softmax over a fully
masked row would spread evenly over every key, its own token included, so such a row attends to
nothing instead: its attention output is what the output projection makes of zeros (its bias). Its
prediction then rests on its position alone: p(x_i) for the first token of the order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_lite.nn import layers
from t5x_lite.nn.attention import MultiHeadAttention


def permutation_masks(rank: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[b, 1, 2s, s] bool: the content rows' mask (key rank <= query rank) over the query rows' mask (key
    rank < query rank), each within one packed segment and over non-padding keys (segment id 0)."""
    key_rank, query_rank = rank[:, None, None, :], rank[:, None, :, None]
    same = layers.segment_mask(segment_ids, segment_ids) & layers.padding_mask(segment_ids)
    return jnp.concatenate([(key_rank <= query_rank) & same, (key_rank < query_rank) & same], axis=2)


def split_streams(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[b, 2s, ...] -> (content stream [b, s, ...], query stream [b, s, ...])."""
    length = x.shape[1] // 2
    return x[:, :length], x[:, length:]


def two_stream_attention(
    attention: MultiHeadAttention, x: jax.Array, bias: jax.Array, *, dropout_rngs: nnx.Rngs | None = None
) -> jax.Array:
    """Self-attention of both streams `x` [b, 2s, e] (content rows first) over the content stream's keys and
    values, with `bias` [b, 1, 2s, s] (from `permutation_masks`); returns [b, 2s, e]. A row whose keys
are all masked attends to nothing (see the module docstring)."""
    content, _ = split_streams(x)
    q = attention.project_query(x)
    out = attention.attend(q, attention.key(content), attention.value(content), bias, dropout_rngs=dropout_rngs)
    sees_something = jnp.max(bias, axis=-1)[:, 0, :, None] > layers.NEG_INF / 2  # [b, 2s, 1]
    return jnp.where(sees_something, out, attention.out(jnp.zeros_like(q[:1, :1])))
