"""From a seqio task/mixture name to batches of model features for this process.

Every lookup by name goes through `get_mixture_or_task`, which first imports `t5x_lite.tasks`: the
bundled tasks register on first lookup, not when `t5x_lite` is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

import gin
import jax
import seqio
import tensorflow as tf

from t5x_lite.data import position

# What a too-long example's pipeline error says (`fit_to_length`'s "error" mode); the trainer matches it.
from t5x_lite.data.preprocessors.text import LONG_SEQUENCE_ERROR  # noqa: F401

DEFAULT_TASKS_MODULE = "t5x_lite.tasks"


def import_default_tasks() -> None:
    """Registers t5x_lite's own tasks and mixtures (once: a second import does nothing)."""
    importlib.import_module(DEFAULT_TASKS_MODULE)


def import_task_module(module: str | None) -> None:
    """Imports the user's module that registers tasks (T5X's `MIXTURE_OR_TASK_MODULE`).

    The default tasks come first, so that the user's mixtures may name them.
    """
    import_default_tasks()
    if not module:
        return
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"MIXTURE_OR_TASK_MODULE {module!r} could not be imported ({e}). Put the module on the "
            f"Python path (run from its folder or set PYTHONPATH); sys.path is {sys.path}."
        ) from e


# Tasks a gin factory named (e.g. `@token_limited_task()`), registered at their first lookup by name: there a
# problem with one (a ValueError) is reported as the CLI reports an unknown task, in one line.
_REGISTER_ON_LOOKUP: dict[str, Callable[[], object]] = {}


def register_on_lookup(name: str, register: Callable[[], object]) -> None:
    """`register()` registers the task `name`; it runs at the first `get_mixture_or_task(name)`."""
    _REGISTER_ON_LOOKUP[name] = register


def get_mixture_or_task(name: str) -> seqio.Task | seqio.Mixture:
    """Looks up a registered task or mixture; an unknown name gets close-name suggestions."""
    import_default_tasks()
    if name in _REGISTER_ON_LOOKUP:
        _REGISTER_ON_LOOKUP.pop(name)()
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


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What a run reads (a task's split, converted, in global batches of `batch_size`) and how its processes
    split it (`host_sharding`): `get_dataset`'s settings, from which a process builds its pipelines."""

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    batch_size: int
    feature_converter_cls: type[seqio.FeatureConverter]
    split: str
    shuffle: bool
    num_epochs: int | None
    seed: int | None
    pack: bool
    host_sharding: str

    def fresh_layout(self) -> position.DataLayout:
        """The data shards a run starting on this process count reads."""
        return position.DataLayout.fresh(self.host_sharding, self.batch_size, jax.process_count())

    def shard(self, layout: position.DataLayout, index: int) -> tf.data.Dataset:
        """Shard `index` of `layout`: its rows of every global batch (the same batches on any process)."""
        by_shard = layout.host_sharding == "shard_info"
        ds = seqio.get_dataset(
            get_mixture_or_task(self.mixture_or_task_name),
            task_feature_lengths=self.task_feature_lengths,
            feature_converter=self.feature_converter_cls(pack=self.pack),
            dataset_split=self.split,
            shuffle=self.shuffle,
            num_epochs=self.num_epochs,
            shard_info=seqio.ShardInfo(index=index, num_shards=layout.num_shards) if by_shard else None,
            seed=self.seed,
            verbose=False,
        )
        return ds.batch(layout.shard_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def process_dataset(self) -> tf.data.Dataset:
        """This process's batches of a fresh layout: its own shard, or its rows of the one pipeline's batches."""
        layout = self.fresh_layout()
        [(index, rows)] = layout.rows(jax.process_index(), jax.process_count())
        ds = self.shard(layout, index)
        if rows == slice(0, layout.shard_batch_size):
            return ds
        return ds.map(lambda batch: {k: v[rows] for k, v in batch.items()})

    def iterator(self) -> position.DataIterator:
        """This process's batches as a checkpointable iterator that resumes on any process count."""
        return position.DataIterator(self.shard, self.fresh_layout(), jax.process_index(), jax.process_count())


# gin names it `get_dataset` (the bindings `get_dataset.pack`, `get_dataset.host_sharding` configure every pipeline).
@gin.configurable("get_dataset", denylist=["split", "shuffle", "num_epochs"])
def data_spec(
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
) -> DataSpec:
    """The checked settings of a run's data.

    With a seed the pipeline is deterministic (file order, preprocessor randomness, shuffle
    and mixture sampling), which with an iterator checkpoint makes resumes exact.
    `host_sharding` says how processes split the data: "shard_info" (each reads its own shard
    of the source, T5X's way, scales to pods) or "slice" (each runs the whole pipeline and keeps
    its rows of every global batch: the global batches are the same for any process count).
    """
    provider = get_mixture_or_task(mixture_or_task_name)
    check_feature_lengths(provider, task_feature_lengths)
    if split not in provider.splits:
        raise ValueError(f"Task {provider.name!r} has no split {split!r}; its splits are {list(provider.splits)}.")
    spec = DataSpec(mixture_or_task_name, task_feature_lengths, batch_size, feature_converter_cls, split, shuffle,
                    num_epochs, seed, pack, host_sharding)
    spec.fresh_layout()  # checks host_sharding and that the processes divide the batch
    return spec


def get_dataset(
    mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], batch_size: int,
    feature_converter_cls: type[seqio.FeatureConverter], **options: Any,
) -> tf.data.Dataset:
    """This process's batches (global `batch_size` / process count) of converted features; `options` are
    `data_spec`'s (split, shuffle, num_epochs, seed, pack, host_sharding), the unset ones from gin."""
    spec = data_spec(mixture_or_task_name, task_feature_lengths, batch_size, feature_converter_cls, **options)
    return spec.process_dataset()


def train_iterator(
    mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], batch_size: int,
    feature_converter_cls: type[seqio.FeatureConverter], seed: int | None,
) -> position.DataIterator:
    """This process's train batches (shuffled, repeated), as an iterator whose position a checkpoint saves."""
    return data_spec(mixture_or_task_name, task_feature_lengths, batch_size, feature_converter_cls, split="train",
                     shuffle=True, num_epochs=None, seed=seed).iterator()
