"""Optimizers and learning-rate schedules, all from optax, configurable in gin.

A run binds `train.optimizer` to one of the factories below (called with the schedule)
and `train.learning_rate` to a schedule, so the trainer can also log the learning rate.
"""

from __future__ import annotations

from typing import Literal

import gin
import jax.numpy as jnp
import optax


@gin.configurable
def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> optax.Schedule:
    """T5's pre-training schedule: `base / sqrt(max(step, warmup_steps))` (0.01 for 10k steps)."""
    if warmup_steps < 1:
        raise ValueError(f"rsqrt_schedule.warmup_steps must be >= 1, got {warmup_steps}.")

    def schedule(step):
        return base_learning_rate / jnp.sqrt(jnp.maximum(jnp.asarray(step, jnp.float32), warmup_steps))

    return schedule


@gin.configurable
def constant_schedule(learning_rate: float = 1e-3) -> optax.Schedule:
    """A constant learning rate (T5's fine-tuning default is 1e-3 with Adafactor)."""
    return optax.constant_schedule(learning_rate)


@gin.configurable
def warmup_decay_schedule(
    peak_learning_rate: float = 1e-4,
    warmup_steps: int = 1_000,
    total_steps: int = gin.REQUIRED,
    decay: Literal["linear", "cosine"] = "linear",
    end_learning_rate: float = 0.0,
) -> optax.Schedule:
    """Linear warmup to the peak, then linear ("triangular") or cosine decay to the end value."""
    if decay == "linear":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, peak_learning_rate, warmup_steps),
                optax.linear_schedule(peak_learning_rate, end_learning_rate, max(total_steps - warmup_steps, 1)),
            ],
            boundaries=[warmup_steps],
        )
    if decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak_learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), end_learning_rate
        )
    raise ValueError(f"warmup_decay_schedule.decay must be 'linear' or 'cosine', got {decay!r}.")


@gin.configurable
def adafactor(
    learning_rate: optax.Schedule,
    decay_rate: float = 0.8,
    clipping_threshold: float | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    factored: bool = True,
    min_dim_size_to_factor: int = 128,
    weight_decay_rate: float | None = None,
) -> optax.GradientTransformation:
    """Adafactor with T5's defaults: factored second moments, decay 0.8, update clipping 1.0."""
    return optax.adafactor(
        learning_rate=learning_rate,
        decay_rate=decay_rate,
        clipping_threshold=clipping_threshold,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
        factored=factored,
        min_dim_size_to_factor=min_dim_size_to_factor,
        weight_decay_rate=weight_decay_rate,
    )


@gin.configurable
def adamw(
    learning_rate: optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    max_grad_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """AdamW with optional global-norm gradient clipping (BERT-style fine-tuning)."""
    adam = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if max_grad_norm is None:
        return adam
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adam)
