"""Token-level cross entropy with label smoothing and z-loss, without a one-hot matrix."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> dict[str, jax.Array]:
    """Weighted sums over tokens of the loss terms; divide by `weight_sum` to normalise.

    With label smoothing the target distribution puts `1 - label_smoothing` on the true
    token and spreads the rest evenly; its entropy is subtracted so a perfect model scores
    0. The z-loss term `z_loss * log(Z)^2` keeps the softmax normaliser near 1 (T5X/PaLM).
    Returns `loss_sum` (includes the z-loss), `z_loss_sum`, `weight_sum` and `correct_sum`.
    """
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    vocab_size = logits.shape[-1]
    # One max over the vocabulary serves both the normaliser and the prediction: the first index holding
    # the maximum is exactly argmax, without a second (value, index) reduction over the logits.
    max_logit = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    log_z = max_logit + jnp.log(jnp.sum(jnp.exp(logits - max_logit[..., None]), axis=-1))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    target_log_prob = target_logit - log_z
    if label_smoothing:
        confidence = 1.0 - label_smoothing
        low_confidence = label_smoothing / (vocab_size - 1)
        mean_log_prob = jnp.mean(logits, axis=-1) - log_z
        # Cross entropy against the smoothed distribution, minus its own entropy.
        token_loss = -(
            (confidence - low_confidence) * target_log_prob + low_confidence * vocab_size * mean_log_prob
        )
        token_loss -= -(confidence * math.log(confidence) + (vocab_size - 1) * low_confidence * math.log(low_confidence))
    else:
        token_loss = -target_log_prob
    token_z_loss = z_loss * jnp.square(log_z)
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    predicted = jnp.min(jnp.where(logits == max_logit[..., None], vocab_ids, vocab_size), axis=-1)
    correct = (predicted == targets).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum((token_loss + token_z_loss) * weights),
        "z_loss_sum": jnp.sum(token_z_loss * weights),
        "weight_sum": jnp.sum(weights),
        "correct_sum": jnp.sum(correct * weights),
    }
