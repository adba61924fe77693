"""Training modes: what `train()` builds its state, data and step with (`train.training_mode` in gin).

The standard mode trains the model on MIXTURE_OR_TASK_NAME; another mode (end-task-aware training,
`training/end_task_aware.py`) swaps in its own state, data and step and keeps the rest of the loop (resume,
checkpoints, evaluation, logging) unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import optax
import seqio
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from t5x_lite import partitioning
from t5x_lite.data import pipeline
from t5x_lite.data.position import DataIterator
from t5x_lite.models.base import BaseModel
from t5x_lite.training import steps, train_state
from t5x_lite.training.train_state import TrainState


class TrainingMode(Protocol):
    """The three things a mode decides: the fresh state (and its shardings, graphdef), the data, the step."""

    def create_train_state(
        self, model: BaseModel, optimizer: optax.GradientTransformation, seed: int, mesh: Mesh,
        rules: partitioning.Rules,
    ) -> tuple[TrainState, TrainState, nnx.GraphDef]: ...

    def train_iterator(
        self, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], batch_size: int,
        feature_converter_cls: type[seqio.FeatureConverter], seed: int | None,
    ) -> DataIterator: ...

    def make_train_step(
        self, model: BaseModel, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
        learning_rate: optax.Schedule, state_shardings: TrainState, batch_sharding: NamedSharding,
        num_microbatches: int,
    ) -> steps.StepFn: ...


class StandardTraining:
    """The model trained on the task's batches (`train_state`, `pipeline.train_iterator`, `steps.make_train_step`)."""

    def create_train_state(self, model, optimizer, seed, mesh, rules):
        return train_state.create_train_state(model, optimizer, seed, mesh, rules)

    def train_iterator(self, mixture_or_task_name, task_feature_lengths, batch_size, feature_converter_cls, seed):
        return pipeline.train_iterator(mixture_or_task_name, task_feature_lengths, batch_size, feature_converter_cls,
                                       seed)

    def make_train_step(self, model, graphdef, optimizer, learning_rate, state_shardings, batch_sharding,
                        num_microbatches):
        return steps.make_train_step(model, graphdef, optimizer, learning_rate, state_shardings, batch_sharding,
                                     num_microbatches)
