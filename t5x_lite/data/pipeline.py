"""From a seqio task/mixture name to batches of model features for this process."""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Mapping

import gin
import jax
import seqio
import tensorflow as tf

# TF only reads data here; it must never take accelerator memory from JAX.
tf.config.set_visible_devices([], "GPU")


def import_task_module(module: str | None) -> None:
    """Imports the user's module that registers tasks (T5X's `MIXTURE_OR_TASK_MODULE`)."""
    if not module:
        return
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"MIXTURE_OR_TASK_MODULE {module!r} could not be imported ({e}). Put the module on the "
            f"Python path (run from its folder or set PYTHONPATH); sys.path is {sys.path}."
        ) from e


def get_mixture_or_task(name: str) -> seqio.Task | seqio.Mixture:
    """Looks up a registered task or mixture; an unknown name gets close-name suggestions."""
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"Unknown task or mixture {name!r}.{hint} Register it in a module and pass "
            "--gin.MIXTURE_OR_TASK_MODULE=\"'my_module'\", or pick one of the registered names "
            "(tools/show_task.py lists them)."
        ) from None


def check_feature_lengths(provider: seqio.Task | seqio.Mixture, task_feature_lengths: Mapping[str, int]) -> None:
    """Every output feature of the task needs a length in `TASK_FEATURE_LENGTHS`."""
    missing = sorted(set(provider.output_features) - set(task_feature_lengths))
    if missing:
        example = dict(task_feature_lengths, **{k: 128 for k in missing})
        raise ValueError(
            f"TASK_FEATURE_LENGTHS {dict(task_feature_lengths)} has no length for {missing} of task "
            f"{provider.name!r}; set e.g. --gin.TASK_FEATURE_LENGTHS=\"{example}\"."
        )


LONG_SEQUENCE_ERROR = "is longer than TASK_FEATURE_LENGTHS allows"


@gin.configurable(denylist=["dataset", "output_features", "sequence_length"])
def fit_to_length(
    dataset: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature],
    sequence_length: Mapping[str, int] | None = None,
    long_sequences: str = "truncate",
) -> tf.data.Dataset:
    """The last preprocessor of a text-to-text task: appends EOS, fitting each feature to its length.

    `long_sequences` (gin) chooses what an example longer than its length (EOS included) gets:
    "truncate" keeps its first tokens (seqio's `append_eos_after_trim`, T5's choice), "error"
    fails the pipeline with a message naming the feature and the length.
    """
    if long_sequences not in ("truncate", "error"):
        raise ValueError(f"fit_to_length.long_sequences must be 'truncate' or 'error', got {long_sequences!r}.")
    if long_sequences == "truncate" or sequence_length is None:
        return seqio.preprocessors.append_eos_after_trim(dataset, output_features, sequence_length)

    @seqio.map_over_dataset
    def check(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        for key, length in sequence_length.items():
            if key in features and key in output_features and output_features[key].add_eos and length is not None:
                tf.debugging.assert_less_equal(
                    tf.shape(features[key])[-1] + 1, length,
                    message=f"An example's {key!r} (with EOS) {LONG_SEQUENCE_ERROR} ({length} tokens)",
                )
        return features

    return seqio.preprocessors.append_eos(check(dataset), output_features)


@gin.configurable(denylist=["split", "shuffle", "num_epochs"])
def get_dataset(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    feature_converter_cls: type[seqio.FeatureConverter],
    split: str = "train",
    shuffle: bool = True,
    num_epochs: int | None = None,
    seed: int | None = None,
    pack: bool = True,
    host_sharding: str = "shard_info",
) -> tf.data.Dataset:
    """This process's batches (global `batch_size` / process count) of converted features.

    With a seed the pipeline is deterministic (file order, preprocessor randomness, shuffle
    and mixture sampling), which with an iterator checkpoint makes resumes exact.
    `host_sharding` says how processes split the data: "shard_info" (each reads its own shard
    of the source, T5X's way, scales to pods) or "slice" (each runs the whole pipeline and keeps
    its rows of every global batch: the global batches are the same for any process count).
    """
    provider = get_mixture_or_task(mixture_or_task_name)
    check_feature_lengths(provider, task_feature_lengths)
    num_processes = jax.process_count()
    if batch_size % num_processes:
        raise ValueError(f"BATCH_SIZE {batch_size} must be divisible by the process count {num_processes}.")
    if split not in provider.splits:
        raise ValueError(f"Task {provider.name!r} has no split {split!r}; its splits are {list(provider.splits)}.")
    if host_sharding not in ("shard_info", "slice"):
        raise ValueError(f"get_dataset.host_sharding must be 'shard_info' or 'slice', got {host_sharding!r}.")
    by_shard = host_sharding == "shard_info"
    ds = seqio.get_dataset(
        provider,
        task_feature_lengths=task_feature_lengths,
        feature_converter=feature_converter_cls(pack=pack),
        dataset_split=split,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_info=seqio.ShardInfo(index=jax.process_index(), num_shards=num_processes) if by_shard else None,
        seed=seed,
        verbose=False,
    )
    local_batch_size = batch_size // num_processes
    if by_shard:
        ds = ds.batch(local_batch_size, drop_remainder=True)
    else:
        start = jax.process_index() * local_batch_size
        ds = ds.batch(batch_size, drop_remainder=True)
        ds = ds.map(lambda batch: {k: v[start : start + local_batch_size] for k, v in batch.items()})
    return ds.prefetch(tf.data.AUTOTUNE)
