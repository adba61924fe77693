"""T5's data-size-with-repeats experiment: train on only the first N tokens of a task's training text, repeated.

`token_limited_task(task, limit_tokens)` (gin; in Python `register_token_limited_task`) registers
`<task>_first_<N>_tokens`: the same task, whose `train` split keeps only the first `limit_tokens` tokens of
the source after tokenization (the documents in source order, the last one cut to the exact count) and then
goes on as before (packing, noise, EOS). Training reads the split with `num_epochs=None`, so SeqIO repeats those N tokens for as many epochs
as the run needs, with new noise every epoch; the other splits (validation) are the task's own, whole.

  MIXTURE_OR_TASK_NAME = @token_limited_task()
  token_limited_task.task = 'bundled_span_corruption'    # or 'c4_span_corruption', @text_files_task(), ...
  token_limited_task.limit_tokens = 1048576              # 2**20

Works on any task whose preprocessors tokenize a text field with `seqio.preprocessors.tokenize` (every
pre-training objective here, over the bundled corpus, C4 or your files). The source is read in order, not
shuffled, so that "first" names the same tokens every epoch and in every run; examples are still
shuffled afterwards. With several processes each reads the first N tokens of its own shard.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import gin
import seqio
import tensorflow as tf

from t5x_lite.data import pipeline

LIMITED_SPLIT = "train"


def limit_tokens(dataset: tf.data.Dataset, max_tokens: int, key: str = "targets") -> tf.data.Dataset:
    """The tokenized documents of `dataset` up to `max_tokens` tokens of `key` in all: whole documents, then the
    first part of the one that reaches the limit; reading stops there. Fewer if the dataset has fewer."""

    def count(before: tf.Tensor, example: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tuple]:
        return before + tf.cast(tf.size(example[key]), tf.int64), (example, before)

    def cut(example: dict[str, tf.Tensor], before: tf.Tensor) -> dict[str, tf.Tensor]:
        return {**example, key: example[key][: tf.cast(max_tokens - before, tf.int32)]}

    counted = dataset.scan(tf.constant(0, tf.int64), count)
    return counted.take_while(lambda example, before: before < max_tokens).map(cut)


def _is_tokenize(step: Callable) -> bool:
    return getattr(step, "func", step) is seqio.preprocessors.tokenize


def limited_preprocessors(preprocessors: Sequence[Callable], max_tokens: int, task: str) -> list[Callable]:
    """`preprocessors` with `limit_tokens` right after the tokenize step, before SeqIO's repeat: the cache
    placeholder must come after it (one is added there if the task has none)."""
    steps = list(preprocessors)
    tokenize = next((i for i, step in enumerate(steps) if _is_tokenize(step)), None)
    if tokenize is None:
        raise ValueError(f"Task {task!r} has no seqio.preprocessors.tokenize step: limit_tokens applies to tasks that "
                         "tokenize a text field (the pre-training objectives).")
    placeholder = next((i for i, step in enumerate(steps) if isinstance(step, seqio.CacheDatasetPlaceholder)), None)
    if placeholder is not None and placeholder < tokenize:
        raise ValueError(f"Task {task!r} caches before it tokenizes; limit_tokens must run before SeqIO's repeat.")
    limit = [functools.partial(limit_tokens, max_tokens=max_tokens)]
    if placeholder is None:
        limit.append(seqio.CacheDatasetPlaceholder())
    return steps[: tokenize + 1] + limit + steps[tokenize + 1:]


class InOrderSource(seqio.DataSource):
    """`source`, always read unshuffled: the "first N tokens" are then the same every epoch and every run."""

    def __init__(self, source: seqio.DataSource):
        super().__init__(splits=source.splits, caching_permitted=source.caching_permitted)
        self.source = source

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return self.source.supports_arbitrary_sharding

    def list_shards(self, split: str) -> Sequence[str]:
        return self.source.list_shards(split)

    def get_dataset(self, split: str = LIMITED_SPLIT, shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None, **unused) -> tf.data.Dataset:
        return self.source.get_dataset(split=split, shuffle=False, seed=seed, shard_info=shard_info)


class TokenLimitedTask(seqio.Task):
    """`base` with its train split cut to the first `max_tokens` tokens (see the module docstring); every other
    split is `base`'s own."""

    def __init__(self, name: str, base: seqio.Task, max_tokens: int):
        super().__init__(
            name,
            source=InOrderSource(base.source),
            output_features=base.output_features,
            preprocessors=limited_preprocessors(base.preprocessors, max_tokens, base.name),
            postprocess_fn=base.postprocessor,
            metric_fns=list(base.metric_fns),
            shuffle_buffer_size=base.shuffle_buffer_size,
        )
        self.base = base
        self.max_tokens = max_tokens

    def get_dataset(self, sequence_length=None, split: str = LIMITED_SPLIT, *args, **kwargs) -> tf.data.Dataset:
        if split != LIMITED_SPLIT:
            return self.base.get_dataset(sequence_length, split, *args, **kwargs)
        return super().get_dataset(sequence_length, split, *args, **kwargs)


def limited_task_name(task: str, limit_tokens: int) -> str:
    return f"{task}_first_{limit_tokens}_tokens"


def register_token_limited_task(task: str, limit_tokens: int) -> str:
    """Registers `task` limited to its first `limit_tokens` training tokens as `<task>_first_<N>_tokens` and returns
    that name; again with the same task, it only returns the name. A bad argument is a ValueError."""
    if isinstance(limit_tokens, bool) or not isinstance(limit_tokens, int) or limit_tokens < 1:
        raise ValueError(f"token_limited_task.limit_tokens must be a whole number of tokens >= 1, got {limit_tokens!r}.")
    name = limited_task_name(task, limit_tokens)
    base = pipeline.get_mixture_or_task(task)
    if isinstance(base, seqio.Mixture):
        raise ValueError(f"token_limited_task.task {task!r} is a mixture; name one of its tasks.")  # noqa: TRY004 (a user error, one line in the CLI)
    if LIMITED_SPLIT not in base.splits:
        raise ValueError(f"Task {task!r} has no {LIMITED_SPLIT!r} split to limit; its splits are {list(base.splits)}.")
    if name in seqio.TaskRegistry.names():
        existing = seqio.TaskRegistry.get(name)
        if not isinstance(existing, TokenLimitedTask):
            raise ValueError(f"token_limited_task: the task name {name!r} is already registered by other code.")
        if existing.base is base:
            return name
        seqio.TaskRegistry.remove(name)  # the base task was registered again (e.g. other files): follow it
    seqio.TaskRegistry.add_provider(name, TokenLimitedTask(name, base, limit_tokens))
    return name


@gin.configurable
def token_limited_task(task: str = gin.REQUIRED, limit_tokens: int = gin.REQUIRED) -> str:
    """For gin, `MIXTURE_OR_TASK_NAME = @token_limited_task()`: the name `<task>_first_<N>_tokens`, whose task
    `register_token_limited_task` registers at the first lookup of the name (where the CLI reports a bad
    argument in one line)."""
    name = limited_task_name(task, limit_tokens)
    pipeline.register_on_lookup(name, lambda: register_token_limited_task(task, limit_tokens))
    return name


def count_tokens(task: str | seqio.Task, split: str = LIMITED_SPLIT) -> int:
    """Tokens of `split` after tokenization (after the limit, for a `TokenLimitedTask`'s train split): the sum of
    the `targets` lengths that the task's steps up to the cache placeholder give, the source read in order."""
    provider = pipeline.get_mixture_or_task(task) if isinstance(task, str) else task
    if isinstance(provider, TokenLimitedTask) and split != LIMITED_SPLIT:
        provider = provider.base
    if not provider.supports_caching:
        raise ValueError(f"Task {provider.name!r} has no cache placeholder: count_tokens counts the tokens before it.")
    ds = provider.preprocess_precache(InOrderSource(provider.source).get_dataset(split, shuffle=False))
    sizes = ds.map(lambda example: tf.cast(tf.size(example["targets"]), tf.int64))
    return int(sizes.reduce(tf.constant(0, tf.int64), lambda total, size: total + size))
