"""Task metrics through `seqio.Evaluator`: batched, jitted predict and score functions.

The evaluator owns the data (unpacked, in order, with the task's postprocessors and metric
functions); this module turns a model and its parameters into the `predict_fn`/`score_fn`
it calls, and flattens the results into `eval/<task>/<metric>` scalars.

Across processes the examples are shared out: every process reads the same batches, and each
batch is split over the mesh's data axes, so a process decodes only the rows its own devices hold
(on a data-parallel mesh, one contiguous block of each batch per process).
The outputs are gathered back whole and in order; process 0 computes the metrics and shares them.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator, Mapping
from typing import Any

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from t5x_lite import partitioning
from t5x_lite.decoding import DecodeConfig
from t5x_lite.models.base import BaseModel


@gin.configurable(denylist=["model", "graphdef", "mesh", "rules", "eos_id"])
class ModelRunner:
    """Predicts tokens and scores targets for batches of converted features, jitted once per shape.

    Each batch is split over the data axes (each process decodes its rows) and its outputs gathered whole
    on every process. `batch_size` is rounded up to a multiple of the devices the batch is split over.
    """

    def __init__(
        self,
        model: BaseModel,
        graphdef: nnx.GraphDef,
        mesh: Mesh,
        rules: partitioning.Rules,
        batch_size: int = 32,
        method: str = "greedy",
        beam_size: int = 4,
        alpha: float = 0.6,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_id: int = 1,
    ):
        sharding = partitioning.batch_sharding(mesh, rules)
        self.batch_size = rows_per_batch(batch_size, sharding)
        if jax.process_count() > 1:
            announce_split(self.batch_size, rows_on_this_process(self.batch_size, sharding))
        self.predict_features = model.predict_features
        self._to_device = functools.partial(partitioning.split_batch_to_mesh, mesh=mesh, rules=rules)
        decode = DecodeConfig(method, beam_size, alpha, temperature, top_k, top_p, eos_id)

        def predict(params, batch, rng, max_decode_length):
            network = nnx.merge(graphdef, params)
            return model.predict_batch(network, batch, max_decode_length=max_decode_length, decode=decode, rng=rng)

        def score(params, batch):
            return model.score_batch(nnx.merge(graphdef, params), batch)

        # Decoding and scoring constrain their activations as the train step does (partitioning.constrain).
        self._predict = jax.jit(partitioning.with_activation_sharding(predict, mesh, rules), static_argnums=3)
        self._score = jax.jit(partitioning.with_activation_sharding(score, mesh, rules))

    def _batches(self, ds: tf.data.Dataset) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], int]]:
        """(indices, batch padded to `batch_size` rows, number of real rows) over an enumerated dataset."""
        batches = ds.batch(self.batch_size).as_numpy_iterator()
        # disable=None: no bar where stderr is not a terminal (a redirected log keeps no escape codes).
        shown = jax.process_index() == 0
        for indices, batch in tqdm(batches, desc="eval", unit="batch", leave=False, disable=None if shown else True):
            rows = len(indices)
            padded = {k: np.pad(v, [(0, self.batch_size - rows)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}
            yield indices, padded, rows

    def predict(self, params: dict, ds: tf.data.Dataset, max_decode_length: int, seed: int = 0) -> list[tuple[int, list[int]]]:
        """(index, predicted token ids) for every example of an enumerated dataset."""
        outputs = []
        for i, (indices, batch, rows) in enumerate(self._batches(ds)):
            features = self.predict_features(batch)
            rng = jax.random.fold_in(jax.random.key(seed), i)
            tokens = partitioning.gather_to_host(self._predict(params, self._to_device(features), rng, max_decode_length))
            outputs.extend((int(idx), row.tolist()) for idx, row in zip(indices[:rows], tokens[:rows]))
        return outputs

    def score(self, params: dict, ds: tf.data.Dataset) -> list[tuple[int, float]]:
        """(index, log-likelihood of the targets) for every example of an enumerated dataset."""
        outputs = []
        for indices, batch, rows in self._batches(ds):
            scores = partitioning.gather_to_host(self._score(params, self._to_device(batch)))
            outputs.extend((int(idx), float(s)) for idx, s in zip(indices[:rows], scores[:rows]))
        return outputs


def rows_per_batch(batch_size: int, sharding: NamedSharding) -> int:
    """`batch_size` rounded up to a multiple of the devices a batch's rows are split over (e.g. 32 -> 36 over 12),
    so that every device holds whole rows (the extra rows are padding)."""
    axes = sharding.spec[0] if len(sharding.spec) else None
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    shards = math.prod(sharding.mesh.shape[name] for name in names)
    return -(-batch_size // shards) * shards


def rows_on_this_process(batch_size: int, sharding: NamedSharding) -> int:
    """How many rows of a batch this process's devices hold: its share (all rows where the data axes do not
    span processes, e.g. tensor parallelism across hosts)."""
    indices = sharding.addressable_devices_indices_map((batch_size, 1)).values()
    return len({row for index in indices for row in range(batch_size)[index[0]]})


def announce_split(batch_size: int, rows: int) -> None:
    """Says how the processes share the decoding: in each process's log, and on process 0's console."""
    message = (f"Decoding shares each batch of {batch_size} examples out over {jax.process_count()} processes: "
               f"process {jax.process_index()} decodes {rows} rows of each.")
    logging.info(message)
    if jax.process_index() == 0 and logging.get_verbosity() < logging.INFO:
        tqdm.write(message)


def targets_eos_id(provider: seqio.Task | seqio.Mixture) -> int:
    """The id that ends a decoded target: the targets vocabulary's EOS (1 for SentencePiece; e.g. 2 for
    BART's and 50256 for GPT-2's Hugging Face tokenizers), so decoding stops where the text ends."""
    eos_id = provider.output_features["targets"].vocabulary.eos_id
    return 1 if eos_id is None else int(eos_id)


def has_metrics(provider: seqio.Task | seqio.Mixture) -> bool:
    """Whether any task of a task/mixture defines metric functions (pre-training tasks do not)."""
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    return any(task.metric_fns or task.metric_objs for task in tasks)


@gin.configurable(denylist=["mixture_or_task_name", "task_feature_lengths", "feature_converter_cls"])
def make_evaluator(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    feature_converter_cls: type[seqio.FeatureConverter],
    split: str = "validation",
    num_examples: int | None = None,
) -> seqio.Evaluator:
    """A seqio Evaluator over unpacked examples of the split (all of them unless `num_examples`)."""
    return seqio.Evaluator(
        mixture_or_task_name=mixture_or_task_name,
        feature_converter=feature_converter_cls(pack=False),
        eval_split=split,
        sequence_length=dict(task_feature_lengths),
        num_examples=num_examples,
        use_memory_cache=True,
        async_compute_metrics=False,
    )


TaskEval = tuple[seqio.Evaluator, ModelRunner]


def task_evaluation(
    provider: seqio.Task | seqio.Mixture, model: BaseModel, graphdef: nnx.GraphDef, mesh: Mesh,
    rules: partitioning.Rules, task_feature_lengths: Mapping[str, int], split: str = "validation",
) -> TaskEval | None:
    """The evaluator and model runner of the tasks' metric functions; None for tasks without (pre-training)."""
    if not has_metrics(provider):
        return None
    evaluator = make_evaluator(provider.name, task_feature_lengths, model.feature_converter_cls, split=split)
    return evaluator, ModelRunner(model, graphdef, mesh, rules, eos_id=targets_eos_id(provider))


def evaluate(
    evaluator: seqio.Evaluator, runner: ModelRunner, params: dict, max_decode_length: int, step: int | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Runs the evaluator; returns flat `eval/<task>/<metric>` scalars and the raw outputs per task."""
    metrics_future, outputs = evaluator.evaluate(
        compute_metrics=jax.process_index() == 0,
        step=step,
        predict_fn=lambda ds: runner.predict(params, ds, max_decode_length),
        score_fn=lambda ds: runner.score(params, ds),
    )
    results = metrics_future.result() if metrics_future is not None else {}
    flat = {
        f"eval/{task}/{name}": float(value)
        for task, task_metrics in (results or {}).items()
        for name, value in task_metrics.items()
        if np.ndim(value) == 0
    }
    return from_process_0(flat), outputs


def from_process_0(metrics: dict[str, float]) -> dict[str, float]:
    """Process 0's metrics (only it computes them) on every process, so that all processes log the same and
    decide alike where a decision depends on them (keeping the best checkpoint is a collective save)."""
    if jax.process_count() == 1:
        return metrics
    encoded = np.frombuffer(json.dumps(metrics).encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(encoded.size)))
    received = multihost_utils.broadcast_one_to_all(encoded if jax.process_index() == 0 else np.zeros(size, np.uint8))
    return json.loads(received.tobytes())

