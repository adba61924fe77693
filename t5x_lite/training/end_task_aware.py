"""End-task-aware training (TARTAN, Dery et al. 2021): the end task multitasked with auxiliary objectives.

Selected in gin with `train.training_mode = @EndTaskAware()` (gin_configs/examples/tartan_*.gin). The interface
other code builds on (stable):

- Objectives: `EndTaskAware.auxiliaries` maps each auxiliary's name to its seqio task (same feature converter and
  TASK_FEATURE_LENGTHS as the end task, MIXTURE_OR_TASK_NAME). `objective_names(mode)` is
  `[mode.end_task_name, *auxiliaries]` (the end task first): the order of every per-objective array.
- Data: one batch per objective per step, zipped in one pipeline (`data.multi_objective.objectives_iterator`),
  features [batch, slots, length]; the slots are the objectives, then the dev slice when the weighting needs one.
  With a dev head the end task trains on `multi_objective.slice_task(end, "train", dev_fraction)`, the dev head
  on its disjoint `"dev"` part.
- Parameters: `state.params` is the ordinary model with the END TASK's head at `head_key` (T5 v1.1's untied
  `logits_dense`), so every checkpoint loads as a plain model in eval/infer/fine-tuning. `state.heads` stacks the
  other heads [n_aux (+1 dev), ...]: auxiliary i's head is `heads[i]`, the dev head (if any) the last.
  `state.head_opt_state` is the optimizer's state of each of those heads (vmapped), `state.weighting` the
  weighting's state (`training.weighting`): all checkpointed, so resume is exact.
- Step: every slot's loss and body gradient in one program (`jax.vmap` over the slots); the body and each head
  follow the gradient of sum_i w_i * loss_i (w = `weighting.weights`), the dev head its own end-task loss; then
  `weighting.update(state, cosines, losses)` with cosine_i = cos(body grad of objective i, body grad of the dev
  loss). Metrics: `train/aux_weight/<name>`, `train/aux_loss/<name>`, `train/aux_cosine/<name>` (dev head only),
  `train/dev_loss`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import gin
import jax
import jax.numpy as jnp
import optax
import seqio
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5x_lite import cli, partitioning
from t5x_lite.data import multi_objective, pipeline
from t5x_lite.data.position import DataIterator
from t5x_lite.models.base import BaseModel
from t5x_lite.training import steps, train_state
from t5x_lite.training.train_state import TrainState
from t5x_lite.training.weighting import StaticWeighting, Weighting

HEADS_SALT = 0x7A27  # folded into the seed for the extra heads' initialisation


@flax.struct.dataclass
class EndTaskAwareState(TrainState):
    """The train state plus the auxiliary (and dev) heads, their optimizer state and the weighting's state."""

    heads: dict
    head_opt_state: optax.OptState
    weighting: Any


@gin.configurable(module="t5x_lite")
class EndTaskAware:
    """The training mode: the end task (MIXTURE_OR_TASK_NAME) and `auxiliaries` ({name: seqio task}) share the
    body; each has its own output head; `weighting` weights their losses (default: equal, static)."""

    def __init__(
        self,
        auxiliaries: Mapping[str, str] = gin.REQUIRED,
        weighting: Weighting | None = None,
        dev_fraction: float = 0.2,
        end_task_name: str = "end_task",
        head_key: str = "logits_dense",
    ):
        self.auxiliaries = dict(auxiliaries)
        self.weighting = weighting or StaticWeighting()
        self.dev_fraction = dev_fraction
        self.end_task_name = end_task_name
        self.head_key = head_key
        if not self.auxiliaries:
            raise cli.UserError("EndTaskAware.auxiliaries is empty; name at least one auxiliary objective.")
        if end_task_name in self.auxiliaries:
            raise cli.UserError(f"EndTaskAware.auxiliaries names {end_task_name!r}, the end task's own objective name.")

    @property
    def names(self) -> list[str]:
        """The objectives, the end task first: the order of every per-objective array."""
        return objective_names(self)

    @property
    def num_heads(self) -> int:
        """The heads in `state.heads`: one per auxiliary, and the dev head when the weighting needs one."""
        return len(self.auxiliaries) + int(self.weighting.needs_dev)

    def slot_tasks(self, end_task: str) -> list[str]:
        """The task of each data slot: the end task (its train part when a dev head is trained), the auxiliaries'
        tasks, then the end task's dev part when the weighting needs one."""
        if not self.weighting.needs_dev:
            return [end_task, *self.auxiliaries.values()]
        return [multi_objective.slice_task(end_task, "train", self.dev_fraction), *self.auxiliaries.values(),
                multi_objective.slice_task(end_task, "dev", self.dev_fraction)]

    def check_model(self, model: BaseModel) -> None:
        """The network must have an untied output head at `head_key` for the objectives to own copies of."""
        abstract = train_state.network_graphdef(model)[1]
        if self.head_key not in nnx.to_pure_dict(abstract):
            raise cli.UserError(
                f"End-task-aware training needs an output head of its own at {self.head_key!r} (T5 v1.1 with "
                f"T5Config.tie_word_embeddings = False); {type(model.config).__name__} has none."
            )

    def check_objectives(self) -> None:
        """Every auxiliary's task is registered and the weighting takes the objectives, checked before anything
        is built: a misspelt name is a `UserError` naming the objective and the close task names."""
        for name, task in self.auxiliaries.items():
            try:
                pipeline.get_mixture_or_task(task)
            except ValueError as e:
                raise cli.UserError(f"Auxiliary objective {name!r}: {e}") from None
        with cli.user_errors(ValueError):  # e.g. static weights of an objective that is not one
            self.weighting.init(self.names)

    # ------------------------------------------------------------------ the TrainingMode interface

    def create_train_state(
        self, model: BaseModel, optimizer: optax.GradientTransformation, seed: int, mesh: Mesh,
        rules: partitioning.Rules,
    ) -> tuple[EndTaskAwareState, EndTaskAwareState, nnx.GraphDef]:
        """The model's fresh state (as in standard training) plus fresh heads, their optimizer state and the
        weighting's state, created in their shardings (a head's: its own, the objective axis replicated)."""
        self.check_model(model)
        self.check_objectives()
        base, base_shardings, graphdef = train_state.create_train_state(model, optimizer, seed, mesh, rules)

        def init(seed: jax.Array) -> dict:
            keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), HEADS_SALT), self.num_heads)
            heads = jax.tree.map(lambda *h: jnp.stack(h), *[fresh_head(model, key, self.head_key) for key in keys])
            return {"heads": heads, "head_opt_state": jax.vmap(optimizer.init)(heads),
                    "weighting": self.weighting.init(self.names)}

        seed_array = jnp.asarray(seed, jnp.uint32)
        abstract = jax.eval_shape(init, seed_array)
        head_shardings = jax.tree.map(lambda s: NamedSharding(mesh, PartitionSpec(None, *s.spec)),
                                      base_shardings.params[self.head_key])
        extra_shardings = {
            "heads": head_shardings,
            "head_opt_state": partitioning.optimizer_state_shardings(
                abstract["head_opt_state"], abstract["heads"], head_shardings, mesh),
            "weighting": jax.tree.map(lambda _: partitioning.replicated(mesh), abstract["weighting"]),
        }
        extra = jax.jit(init, out_shardings=extra_shardings)(seed_array)
        state = EndTaskAwareState(**vars_of(base), **extra)
        return state, EndTaskAwareState(**vars_of(base_shardings), **extra_shardings), graphdef

    def train_iterator(
        self, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], batch_size: int,
        feature_converter_cls: type[seqio.FeatureConverter], seed: int | None,
    ) -> DataIterator:
        """The slots' batches, zipped (one checkpointable iterator)."""
        return multi_objective.objectives_iterator(
            self.slot_tasks(mixture_or_task_name), task_feature_lengths, batch_size, feature_converter_cls, seed)

    def make_train_step(
        self, model: BaseModel, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
        learning_rate: optax.Schedule, state_shardings: EndTaskAwareState, batch_sharding: NamedSharding,
        num_microbatches: int,
    ) -> steps.StepFn:
        """`train_step(state, batch) -> (state, metrics)`, jitted with donated state (see the module docstring)."""
        if num_microbatches != 1:
            raise cli.UserError(f"End-task-aware training runs whole batches; set NUM_MICROBATCHES = 1 (got "
                                f"{num_microbatches}).")
        step = tartan_step(model, graphdef, optimizer, learning_rate, self.weighting, self.names, self.head_key)
        return jax.jit(
            partitioning.with_activation_sharding(step, batch_sharding.mesh, None),
            in_shardings=(state_shardings, batch_sharding),
            out_shardings=(state_shardings, None),
            donate_argnums=(0,),
        )


def objective_names(mode: EndTaskAware) -> list[str]:
    """`[end_task_name, *auxiliaries]`: the order of weights, losses and cosines."""
    return [mode.end_task_name, *mode.auxiliaries]


def vars_of(state: TrainState) -> dict:
    """The fields of a `TrainState` as keyword arguments."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}


def fresh_head(model: BaseModel, key: jax.Array, head_key: str) -> dict:
    """A freshly initialised output head (the network's own initialiser; the unused body is never computed)."""
    network = model.build_network(nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.state(network, nnx.Param))[head_key]


def tree_dot(a: Any, b: Any) -> jax.Array:
    """The inner product of two same-structured pytrees, in float32."""
    return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)) for x, y in zip(jax.tree.leaves(a),
                                                                                       jax.tree.leaves(b)))


def cosines(body_grads: Any, dev_grad: Any) -> jax.Array:
    """[n] cosine of each objective's body gradient (leading axis of `body_grads`) with the dev gradient."""
    dots = jax.vmap(tree_dot, in_axes=(0, None))(body_grads, dev_grad)
    norms = jnp.sqrt(jax.vmap(lambda g: tree_dot(g, g))(body_grads) * tree_dot(dev_grad, dev_grad))
    return dots / jnp.maximum(norms, 1e-12)


def weighted_sum(weights: jax.Array, stacked: Any) -> Any:
    """sum_i weights[i] * stacked[i] over the leading axis of each leaf."""
    return jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), stacked)


def tartan_step(
    model: BaseModel, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, learning_rate: optax.Schedule,
    weighting: Weighting, names: Sequence[str], head_key: str,
):
    """The unjitted step: slot losses and gradients under `jax.vmap` (the body broadcast, heads and batches
    stacked), the weighted body and head updates, the dev head's update and the weighting's update."""
    num_objectives = len(names)

    def slot_loss(body: dict, head: dict, batch: steps.Batch, dropout_key: jax.Array):
        dropout_rngs = nnx.Rngs(dropout=dropout_key) if model.dropout_rate > 0 or model.trains_with_rng else None
        loss, sums = model.loss_fn(nnx.merge(graphdef, {**body, head_key: head}), batch, dropout_rngs)
        return loss, sums

    slot_grads = jax.vmap(jax.value_and_grad(slot_loss, argnums=(0, 1), has_aux=True), in_axes=(None, 0, 0, 0))

    def train_step(state: EndTaskAwareState, batch: steps.Batch) -> tuple[EndTaskAwareState, dict]:
        slots = {key: jnp.swapaxes(value, 0, 1) for key, value in batch.items()}  # [slots, batch, ...]
        body = {key: value for key, value in state.params.items() if key != head_key}
        heads = jax.tree.map(lambda end, rest: jnp.concatenate([end[None], rest]), state.params[head_key], state.heads)
        dropout_keys = jax.random.split(state.dropout_key, len(jax.tree.leaves(heads)[0]))
        (losses, sums), (body_grads, head_grads) = slot_grads(body, heads, slots, dropout_keys)
        weights = weighting.weights(state.weighting)
        loss = jnp.dot(weights, losses[:num_objectives])
        # The weighted loss's gradient; the dev head (the slot after the objectives, if any) follows its own loss.
        slot_weights = jnp.ones_like(losses).at[:num_objectives].set(weights)
        head_grads = jax.tree.map(lambda g: g * slot_weights.reshape(-1, *[1] * (g.ndim - 1)), head_grads)
        grads = {**weighted_sum(weights, jax.tree.map(lambda g: g[:num_objectives], body_grads)),
                 head_key: jax.tree.map(lambda g: g[0], head_grads)}
        if isinstance(state.opt_state, optax.ApplyIfFiniteState):  # a non-finite loss skips the step too
            grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        extra_grads = jax.tree.map(lambda g: g[1:], head_grads)
        head_updates, head_opt_state = jax.vmap(optimizer.update)(extra_grads, state.head_opt_state, state.heads)
        new_heads = optax.apply_updates(state.heads, head_updates)
        dev = len(losses) > num_objectives
        cos = (cosines(jax.tree.map(lambda g: g[:num_objectives], body_grads), jax.tree.map(lambda g: g[-1], body_grads))
               if dev else jnp.zeros((num_objectives,), jnp.float32))
        new_weighting = weighting.update(state.weighting, cos, losses[:num_objectives])
        end_sums = jax.tree.map(lambda s: s[0], sums)
        tokens = jnp.maximum(end_sums["weight_sum"], 1.0)
        metrics = {
            "loss": loss,
            "accuracy": end_sums["correct_sum"] / tokens,
            "z_loss": end_sums["z_loss_sum"] / tokens,
            "target_tokens": end_sums["weight_sum"],
            "learning_rate": jnp.asarray(learning_rate(state.step), jnp.float32),
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params),
            "model": {**model.sum_metrics(end_sums), **objective_metrics(names, weights, losses, cos, dev)},
        }
        if isinstance(opt_state, optax.ApplyIfFiniteState):
            metrics["skipped"] = jnp.logical_not(opt_state.last_finite).astype(jnp.float32)
            metrics["consecutive_skips"] = opt_state.notfinite_count
            metrics["skipped_steps"] = opt_state.total_notfinite
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, heads=new_heads,
                                  head_opt_state=head_opt_state, weighting=new_weighting)
        return new_state, metrics

    return train_step


def objective_metrics(
    names: Sequence[str], weights: jax.Array, losses: jax.Array, cos: jax.Array, dev: bool
) -> dict[str, jax.Array]:
    """`aux_weight/<name>`, `aux_loss/<name>` and, with a dev head, `aux_cosine/<name>` and `dev_loss`
    (logged under `train/`)."""
    metrics = {}
    for i, name in enumerate(names):
        metrics[f"aux_weight/{name}"] = weights[i]
        metrics[f"aux_loss/{name}"] = losses[i]
        if dev:
            metrics[f"aux_cosine/{name}"] = cos[i]
    if dev:
        metrics["dev_loss"] = losses[-1]
    return metrics
