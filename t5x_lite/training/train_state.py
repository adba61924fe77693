"""The train state pytree and its creation directly in its final sharding."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from t5x_lite import adapters, partitioning
from t5x_lite.models.base import BaseModel


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: params and optimizer state as plain dicts, step, RNG."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data (checkpoint friendly); dropout keys fold in the step

    @property
    def dropout_key(self) -> jax.Array:
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def build_network(model: BaseModel, rngs: nnx.Rngs) -> nnx.Module:
    """The model's network with the gin-configured adapters attached (`adapters.add_adapters`); the base
    parameters draw first, so they are the same with or without adapters."""
    return adapters.add_adapters(model.build_network(rngs), rngs)


def network_graphdef(model: BaseModel) -> tuple[nnx.GraphDef, nnx.State]:
    """The network's static structure and its abstract parameters (no memory allocated)."""
    return nnx.split(nnx.eval_shape(lambda: build_network(model, nnx.Rngs(0))), nnx.Param)


def state_shardings(
    abstract_state: TrainState, abstract_params: nnx.State, mesh: Mesh, rules: partitioning.Rules
) -> TrainState:
    """Params follow the logical-axis rules, optimizer state follows its params, the rest is replicated."""
    replicated = partitioning.replicated(mesh)
    params = partitioning.param_shardings(abstract_params, mesh, rules)
    return TrainState(
        step=replicated,
        params=params,
        opt_state=partitioning.optimizer_state_shardings(abstract_state.opt_state, abstract_state.params, params, mesh),
        rng=replicated,
    )


def create_train_state(
    model: BaseModel,
    optimizer: optax.GradientTransformation,
    seed: int,
    mesh: Mesh,
    rules: partitioning.Rules,
) -> tuple[TrainState, TrainState, nnx.GraphDef]:
    """Initialises the state inside `jit` with `out_shardings`, so no host holds it whole.

    Returns the state, its shardings, and the network graphdef to merge params into.
    """
    graphdef, abstract_params = network_graphdef(model)

    def init(seed: jax.Array) -> TrainState:
        params_key, dropout_key = jax.random.split(jax.random.key(seed))
        network = build_network(model, nnx.Rngs(params=params_key))
        params = nnx.to_pure_dict(nnx.state(network, nnx.Param))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=jax.random.key_data(dropout_key),
        )

    seed_array = jnp.asarray(seed, jnp.uint32)
    abstract_state = jax.eval_shape(init, seed_array)
    shardings = state_shardings(abstract_state, abstract_params, mesh, rules)
    state = jax.jit(init, out_shardings=shardings)(seed_array)
    return state, shardings, graphdef


def abstract_train_state(state_or_shapes: Any, shardings: TrainState) -> TrainState:
    """`ShapeDtypeStruct`s with shardings, the restore target for a checkpoint."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_or_shapes, shardings)
