"""The data of end-task-aware training: one batch per objective per step, and the end task's dev slice.

`objectives_iterator` zips the objectives' batched train pipelines into ONE tf.data pipeline whose elements stack
the objectives on the second axis ({feature: [batch, n_objectives, length]}: batch-first, so the data layout,
process sharding and the checkpointed iterator position work as for one task, and resume is exact).

`slice_task` registers a task's train split cut in two disjoint parts by a hash of each example's tokenized
inputs: the dev part (about `dev_fraction` of the examples) trains META-TARTAN's dev head, the rest the end task.
The hash decides per example, whatever the file order, shuffling or process count, so the parts never overlap.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import seqio
import tensorflow as tf

from t5x_lite.data import pipeline, position

SLICE_BUCKETS = 10_000
PARTS = ("train", "dev")


def in_part(example: Mapping[str, tf.Tensor], part: str, dev_fraction: float) -> tf.Tensor:
    """Whether `example` (tokenized `inputs`) falls in `part`: its inputs' hash bucket is below the dev cut or not."""
    text = tf.strings.reduce_join(tf.strings.as_string(example["inputs"]), separator=" ")
    is_dev = tf.strings.to_hash_bucket_fast(text, SLICE_BUCKETS) < round(dev_fraction * SLICE_BUCKETS)
    return is_dev if part == "dev" else tf.logical_not(is_dev)


def keep_part(dataset: tf.data.Dataset, part: str, dev_fraction: float) -> tf.data.Dataset:
    """A seqio preprocessor that keeps the examples of `part` (see `in_part`)."""
    return dataset.filter(functools.partial(in_part, part=part, dev_fraction=dev_fraction))


def slice_task_name(task_name: str, part: str, dev_fraction: float) -> str:
    """E.g. `bundled_qa_extractive_dev20`, `bundled_qa_extractive_minus_dev20` (dev_fraction 0.2)."""
    percent = f"{dev_fraction * 100:g}".replace(".", "_")
    return f"{task_name}_dev{percent}" if part == "dev" else f"{task_name}_minus_dev{percent}"


def slice_task(task_name: str, part: str, dev_fraction: float) -> str:
    """Registers (once) the `part` ("train" or "dev") of the task `task_name` and returns its name; both parts keep
    the task's splits, source and preprocessors, then filter by `in_part`."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}.")
    if not 0 < dev_fraction < 1:
        raise ValueError(f"dev_fraction must be between 0 and 1, got {dev_fraction}.")
    name = slice_task_name(task_name, part, dev_fraction)
    if name not in seqio.TaskRegistry.names():
        task = pipeline.get_mixture_or_task(task_name)
        if not isinstance(task, seqio.Task) or "inputs" not in task.output_features:
            raise ValueError(f"The end task {task_name!r} must be a seqio Task with `inputs` to cut a dev slice from.")
        seqio.TaskRegistry.add(
            name, source=task.source, output_features=task.output_features, metric_fns=[],
            preprocessors=[*task.preprocessors, functools.partial(keep_part, part=part, dev_fraction=dev_fraction)],
        )
    return name


def stack_objectives(*batches: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """The objectives' batches {feature: [b, length]} -> {feature: [b, n_objectives, length]}."""
    return {key: tf.stack([batch[key] for batch in batches], axis=1) for key in batches[0]}


def objectives_iterator(
    task_names: Sequence[str], task_feature_lengths: Mapping[str, int], batch_size: int,
    feature_converter_cls: type[seqio.FeatureConverter], seed: int | None,
) -> position.DataIterator:
    """This process's train batches of every task in `task_names` (shuffled, repeated), zipped and stacked on axis 1,
    as one checkpointable iterator. Every task must give the same features (same converter and lengths)."""
    specs = [
        pipeline.data_spec(name, task_feature_lengths, batch_size, feature_converter_cls, split="train",
                           shuffle=True, num_epochs=None, seed=seed)
        for name in task_names
    ]

    def make_shard(layout: position.DataLayout, index: int) -> tf.data.Dataset:
        shards = tuple(spec.shard(layout, index) for spec in specs)
        keys = [sorted(shard.element_spec) for shard in shards]
        if any(k != keys[0] for k in keys):
            raise ValueError(f"The objectives' batches differ in features: {dict(zip(task_names, keys))}.")
        return tf.data.Dataset.zip(shards).map(stack_objectives).prefetch(tf.data.AUTOTUNE)

    return position.DataIterator(make_shard, specs[0].fresh_layout(), jax.process_index(), jax.process_count())
