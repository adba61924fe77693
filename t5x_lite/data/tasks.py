"""Registered seqio tasks for span-corruption pre-training, and a helper for your own text.

Importing this module (or `t5x_lite`) registers:
  * `bundled_span_corruption`: the corpus shipped in `t5x_lite/data/bundled` (offline).
  * `c4_span_corruption`: TFDS `c4/en`, when the user has prepared it (`--tfds_data_dir`).

`text_files_task` registers a task over your own text files from gin alone
(`MIXTURE_OR_TASK_NAME = @text_files_task()`, see `gin_configs/examples/dapt.gin`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import gin
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from t5x_lite.data import objectives, vocab

BUNDLED_DIR = Path(__file__).parent / "bundled"
C4_TFDS_NAME = "c4/en:3.1.0"


def span_corruption_output_features(vocabulary: seqio.Vocabulary | None = None) -> dict[str, seqio.Feature]:
    """`inputs`/`targets` features over the (default: bundled) SentencePiece vocabulary."""
    vocabulary = vocabulary or vocab.get_vocabulary()
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=False),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
    }


def lines_to_text_examples(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`TextLineDataSource` yields bare strings; the preprocessors expect `{"text": line}`."""
    return dataset.map(lambda line: {"text": line}, num_parallel_calls=tf.data.AUTOTUNE)


def register_span_corruption_task(
    name: str,
    split_to_filepattern: Mapping[str, str | Sequence[str]],
    vocabulary: seqio.Vocabulary | None = None,
    overwrite: bool = False,
) -> seqio.Task:
    """Registers a span-corruption task over plain-text files (one document per line).

    Example: `register_span_corruption_task("my_corpus", {"train": "/data/train*.txt",
    "validation": "/data/valid.txt"})`, then train with `--gin.MIXTURE_OR_TASK_NAME="'my_corpus'"`.
    """
    for split, pattern in split_to_filepattern.items():
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        if not any(tf.io.gfile.glob(p) for p in patterns):
            raise FileNotFoundError(f"Task {name!r}: no file matches {pattern!r} for split {split!r}.")
    if overwrite:
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=seqio.TextLineDataSource(split_to_filepattern=dict(split_to_filepattern)),
        preprocessors=[lines_to_text_examples, *objectives.span_corruption_preprocessors()],
        output_features=span_corruption_output_features(vocabulary),
        metric_fns=[],
    )


# Tasks registered by `text_files_task`: name -> the split patterns they were registered with.
_TEXT_FILES_TASKS: dict[str, dict[str, tuple[str, ...]]] = {}


@gin.configurable
def text_files_task(
    name: str = gin.REQUIRED,
    train_files: str | Sequence[str] = gin.REQUIRED,
    validation_files: str | Sequence[str] | None = None,
) -> str:
    """Registers a span-corruption task over your text files (one document per line); returns its name.

    For gin, so that a run names its own corpus without a Python module (continued pre-training):

        MIXTURE_OR_TASK_NAME = @text_files_task()
        text_files_task.name = 'my_domain_span_corruption'
        text_files_task.train_files = ['/data/domain/part-*.txt']
        text_files_task.validation_files = '/data/domain/valid.txt'

    Files are file patterns (globs), one or a list per split. Without `validation_files` the task
    has only a `train` split: set `train.eval_period = 0`. Calling it again with the same files
    returns the name; with other files it re-registers the task (only a task it registered itself:
    a name taken by another task, e.g. `bundled_span_corruption`, is an error).

    Raises:
      ValueError: `name` is taken by a task `text_files_task` did not register.
      FileNotFoundError: a split's pattern matches no file.
    """
    splits = {"train": train_files} if validation_files is None else {"train": train_files, "validation": validation_files}
    patterns = {split: (p,) if isinstance(p, str) else tuple(p) for split, p in splits.items()}
    if name in seqio.TaskRegistry.names():
        if name not in _TEXT_FILES_TASKS:
            raise ValueError(f"text_files_task: the task name {name!r} is already registered by other code; pick another name.")
        if _TEXT_FILES_TASKS[name] == patterns:
            return name
    register_span_corruption_task(name, {split: list(p) for split, p in patterns.items()}, overwrite=True)
    _TEXT_FILES_TASKS[name] = patterns
    return name


class PreparedTfdsDataSource(seqio.TfdsDataSource):
    """A TFDS source that fails at once, offline, when the data was never prepared.

    TFDS would otherwise try to download (and hang without network) at first read.
    """

    def get_dataset(self, *args, **kwargs):
        data_dir = self.tfds_dataset.data_dir
        builder = tfds.builder(self.tfds_dataset.name, data_dir=data_dir)
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {self.tfds_dataset.name!r} is not prepared in {builder.data_dir!r}. "
                "Prepare it once (`tfds build` or `tfds.builder(...).download_and_prepare()` on a "
                "machine with internet), then pass its location with --tfds_data_dir=/path/to/tensorflow_datasets."
            )
        return super().get_dataset(*args, **kwargs)


def _register_defaults() -> None:
    if "bundled_span_corruption" not in seqio.TaskRegistry.names():
        register_span_corruption_task(
            "bundled_span_corruption",
            {"train": str(BUNDLED_DIR / "train.txt"), "validation": str(BUNDLED_DIR / "validation.txt")},
        )
    if "c4_span_corruption" not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(
            "c4_span_corruption",
            source=PreparedTfdsDataSource(tfds_name=C4_TFDS_NAME, splits=("train", "validation")),
            preprocessors=objectives.span_corruption_preprocessors(),
            output_features=span_corruption_output_features(),
            metric_fns=[],
        )


_register_defaults()
