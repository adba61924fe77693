"""Pure, jitted train and eval steps over the `TrainState` pytree.

The steps trace their networks inside `partitioning.activation_sharding`, so the activations carry the
sharding constraints of the same rule table as the parameters (on the batch sharding's mesh).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from t5x_lite import partitioning
from t5x_lite.models.base import BaseModel
from t5x_lite.training.train_state import TrainState

Batch = Mapping[str, jax.Array]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]


def split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
    """[B, ...] -> [num_microbatches, B / num_microbatches, ...], strided so every device's rows
    are spread over all microbatches (each microbatch stays balanced across the data axes)."""

    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % num_microbatches:
            raise ValueError(f"Batch size {x.shape[0]} is not divisible by NUM_MICROBATCHES={num_microbatches}.")
        return x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def skip_nonfinite_updates(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wraps an optimizer so a step whose loss or gradients hold a NaN or Inf changes nothing.

    optax.apply_if_finite drops that update: parameters and optimizer state (including its
    schedule count) keep their values, while the train step counter and the data move on.
    It never gives up and applies a non-finite update; the trainer stops the run instead
    after too many skips in a row. Its counters (`total_notfinite`) are checkpointed.
    """
    return optax.apply_if_finite(optimizer, max_consecutive_errors=int(jnp.iinfo(jnp.int32).max))


def make_train_step(
    model: BaseModel,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    learning_rate: optax.Schedule,
    state_shardings: TrainState,
    batch_sharding: NamedSharding,
    num_microbatches: int = 1,
    *,
    rules: partitioning.Rules | None = None,
) -> StepFn:
    """Builds `train_step(state, batch) -> (state, metrics)`, jitted with donated state.

    Activations are constrained by `rules` (default: the gin-bound table, `partitioning.logical_axis_rules()`,
    which the parameters follow) on `batch_sharding`'s mesh.

    Gradients are those of the summed token loss divided by the batch's target-token count, so
    with `num_microbatches > 1` (accumulated in a scan, memory of one microbatch) the update
    equals the full-batch update. With an optimizer from `skip_nonfinite_updates` the metrics
    also say whether this step was skipped, how many in a row, and how many in total.
    """

    def grads_and_sums(params: dict, batch: Batch, dropout_key: jax.Array):
        def loss_sum_of(params: dict):
            # Rngs are stateful: made inside the differentiated function, at its trace level.
            dropout_rngs = nnx.Rngs(dropout=dropout_key) if model.dropout_rate > 0 or model.trains_with_rng else None
            _, sums = model.loss_fn(nnx.merge(graphdef, params), batch, dropout_rngs)
            return sums["loss_sum"], sums

        (_, sums), grads = jax.value_and_grad(loss_sum_of, has_aux=True)(params)
        return grads, sums

    def accumulate(params: dict, batch: Batch, dropout_key: jax.Array):
        if num_microbatches == 1:
            return grads_and_sums(params, batch, dropout_key)

        def body(carry, microbatch_and_index):
            microbatch, index = microbatch_and_index
            microbatch = jax.lax.with_sharding_constraint(microbatch, batch_sharding)
            grads, sums = grads_and_sums(params, microbatch, jax.random.fold_in(dropout_key, index))
            return jax.tree.map(jnp.add, carry, (grads, sums)), None

        # The model's summed terms: the four every loss has, and whatever else its loss_fn sums.
        first = jax.tree.map(lambda x: x[0], split_microbatches(batch, num_microbatches))
        zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grads_and_sums, params, first, dropout_key)[1])
        init = (jax.tree.map(jnp.zeros_like, params), zero_sums)
        microbatches = (split_microbatches(batch, num_microbatches), jnp.arange(num_microbatches))
        return jax.lax.scan(body, init, microbatches)[0]

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        grad_sums, sums = accumulate(state.params, batch, state.dropout_key)
        tokens = jnp.maximum(sums["weight_sum"], 1.0)
        grads = jax.tree.map(lambda g: g / tokens, grad_sums)
        loss = sums["loss_sum"] / tokens
        if isinstance(state.opt_state, optax.ApplyIfFiniteState):  # a non-finite loss skips the step too
            grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "accuracy": sums["correct_sum"] / tokens,
            "z_loss": sums["z_loss_sum"] / tokens,
            "target_tokens": sums["weight_sum"],
            "learning_rate": jnp.asarray(learning_rate(state.step), jnp.float32),
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params),
            "model": model.sum_metrics(sums),  # the model's own metrics (ELECTRA's discriminator accuracy, ...)
        }
        if isinstance(opt_state, optax.ApplyIfFiniteState):
            metrics["skipped"] = jnp.logical_not(opt_state.last_finite).astype(jnp.float32)
            metrics["consecutive_skips"] = opt_state.notfinite_count
            metrics["skipped_steps"] = opt_state.total_notfinite
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(
        partitioning.with_activation_sharding(train_step, batch_sharding.mesh, rules),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )


def make_eval_step(
    model: BaseModel, graphdef: nnx.GraphDef, state_shardings: TrainState, batch_sharding: NamedSharding,
    *, rules: partitioning.Rules | None = None,
) -> Callable[[dict, Batch], dict[str, jax.Array]]:
    """Builds `eval_step(params, batch) -> summed loss terms` (no dropout), jitted; activations are constrained
    as in `make_train_step`."""

    def eval_step(params: dict, batch: Batch) -> dict[str, jax.Array]:
        _, sums = model.loss_fn(nnx.merge(graphdef, params), batch, None)
        return sums

    return jax.jit(
        partitioning.with_activation_sharding(eval_step, batch_sharding.mesh, rules),
        in_shardings=(state_shardings.params, batch_sharding),
    )


def replicated_dimensions(
    train_step: StepFn, state: TrainState, graphdef: nnx.GraphDef, batch: Mapping[str, jax.ShapeDtypeStruct],
    rules: partitioning.Rules,
) -> list[partitioning.Replicated]:
    """Every parameter and activation dimension of `train_step` that its mesh axes do not divide, so that it is
    replicated. Traces the step on `batch`'s shapes (with their sharding): jit reuses that trace at the first call
    with arrays of those shapes, so asking before the first step costs no extra trace."""
    mesh = next(iter(batch.values())).sharding.mesh
    params = nnx.state(nnx.merge(graphdef, state.params), nnx.Param)
    found = partitioning.replicated_parameters(params, mesh, rules)
    with partitioning.record_replicated() as activations:
        train_step.trace(state, batch)
    return found + activations
