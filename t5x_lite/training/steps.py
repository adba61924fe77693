"""Pure, jitted train and eval steps over the `TrainState` pytree."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from t5x_lite.models.base import BaseModel
from t5x_lite.training.train_state import TrainState

Batch = Mapping[str, jax.Array]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]


def _summarise(loss: jax.Array, sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-step metrics from the summed loss terms."""
    tokens = jnp.maximum(sums["weight_sum"], 1.0)
    return {
        "loss": loss,
        "accuracy": sums["correct_sum"] / tokens,
        "z_loss": sums["z_loss_sum"] / tokens,
        "target_tokens": sums["weight_sum"],
    }


def make_train_step(
    model: BaseModel,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    learning_rate: optax.Schedule,
    state_shardings: TrainState,
    batch_sharding: NamedSharding,
) -> StepFn:
    """Builds `train_step(state, batch) -> (state, metrics)`, jitted with donated state."""

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        def loss_of(params: dict):
            # Rngs are stateful: made inside the differentiated function, at its trace level.
            dropout_rngs = nnx.Rngs(dropout=state.dropout_key) if model.dropout_rate > 0 else None
            return model.loss_fn(nnx.merge(graphdef, params), batch, dropout_rngs)

        (loss, sums), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = _summarise(loss, sums)
        metrics["learning_rate"] = jnp.asarray(learning_rate(state.step), jnp.float32)
        metrics["grad_norm"] = optax.global_norm(grads)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )


def make_eval_step(
    model: BaseModel, graphdef: nnx.GraphDef, state_shardings: TrainState, batch_sharding: NamedSharding
) -> Callable[[dict, Batch], dict[str, jax.Array]]:
    """Builds `eval_step(params, batch) -> summed loss terms` (no dropout), jitted."""

    def eval_step(params: dict, batch: Batch) -> dict[str, jax.Array]:
        _, sums = model.loss_fn(nnx.merge(graphdef, params), batch, None)
        return sums

    return jax.jit(eval_step, in_shardings=(state_shardings.params, batch_sharding))
