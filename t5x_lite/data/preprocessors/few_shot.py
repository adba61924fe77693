"""k-shot prompts: k solved examples of a task's train split before each query, within the inputs length.

`few_shot_task(provider, k, seed, lengths)` registers `<name>_<k>shot_seed<seed>` (a mixture: one such task
per task), the task with `prepend_shots` as its last preprocessor. Each query's `inputs` become

    shot_1 inputs, EOS, shot_1 targets, EOS, ..., shot_k targets, EOS, query inputs, EOS

in token ids, exactly as the task tokenises its examples (EOS where its features end in one, as the QA tasks'
do), so a decoder-only model reads solved examples laid
out as it reads the query and its answer (seqio's decoder converters put the targets right after the inputs);
an encoder-decoder model gets them in its encoder input. The metrics, postprocessing and scoring are the
task's: generation, or rank classification for a rank task (`bundled_qa_multiple_choice_rank`,
`bundled_qa_yes_no_rank`), whose shots are the correct rows only and are the same for every option of a
question.

The shots of each query are drawn from the train split by `numpy.random.default_rng((seed, query))`
(query: the record's `idx` where the task has one, else its position): the first k examples of that random
order that are not the query itself and fit in the inputs length the query leaves (each taken only if the
shortest examples could still complete the prompt). The same seed gives the same prompts; shots never come
from the evaluated split unless that split is `train`, and then never the query. Where no k examples fit,
`ShotsDoNotFit` says how long the query and the shortest shots are.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

SHOTS_SPLIT = "train"

# A solved example: its (inputs, targets) token ids, each ending in EOS as the task makes them.
Shot = tuple[np.ndarray, np.ndarray]


class ShotsDoNotFit(ValueError):
    """A k-shot prompt that cannot be built: no train split, or k examples do not fit in the inputs length."""


def few_shot_task_name(name: str, num_shots: int, seed: int) -> str:
    """The name `few_shot_task` registers for task or mixture `name`."""
    return f"{name}_{num_shots}shot_seed{seed}"


def few_shot_task(
    provider: seqio.Task | seqio.Mixture, num_shots: int, seed: int, sequence_length: Mapping[str, int]
) -> str:
    """Registers (again, if it exists) the k-shot version of a task, or a mixture of its tasks' k-shot versions;
    returns its name. The shots come from each task's train split, tokenised at `sequence_length`."""
    if num_shots < 1:
        raise ValueError(f"A k-shot task needs num_shots >= 1, got {num_shots}.")
    name = few_shot_task_name(provider.name, num_shots, seed)
    if isinstance(provider, seqio.Mixture):
        names = [few_shot_task(task, num_shots, seed, sequence_length) for task in provider.tasks]
        seqio.MixtureRegistry.remove(name)
        seqio.MixtureRegistry.add(name, names, default_rate=1.0)
        return name
    prepend = functools.partial(prepend_shots, pool=shot_pool(provider, sequence_length), num_shots=num_shots,
                                shots_seed=seed, task_name=provider.name)
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add_provider(name, provider.replace(name=name, preprocessors=[*provider.preprocessors, prepend]))
    return name


def shot_pool(task: seqio.Task, sequence_length: Mapping[str, int]) -> list[Shot]:
    """The solved examples of the task's train split, in order (a rank-classification task: its correct rows)."""
    if SHOTS_SPLIT not in task.splits:
        raise ShotsDoNotFit(f"Task {task.name!r} has no {SHOTS_SPLIT!r} split to draw k-shot examples from "
                            f"(splits: {list(task.splits)}).")
    dataset = task.get_dataset(dict(sequence_length), split=SHOTS_SPLIT, shuffle=False)
    pool = [(ex["inputs"], ex["targets"]) for ex in dataset.as_numpy_iterator() if ex.get("is_correct", True)]
    if not pool:
        raise ShotsDoNotFit(f"Task {task.name!r} has no {SHOTS_SPLIT!r} examples to draw k-shot examples from.")
    return pool


def choose_shots(
    pool: Sequence[Shot], num_shots: int, seed: int, query: int, query_inputs: np.ndarray, budget: int
) -> list[int]:
    """Indices into `pool` of the shots of query number `query`: in a random order seeded by (seed, query), the
    first `num_shots` that are not the query and fit in `budget` tokens together, each taken only if the shortest
    examples could still complete the prompt. Fewer than `num_shots` where they cannot fit."""
    lengths = np.array([shot_length(shot) for shot in pool])
    shortest = np.concatenate([[0], np.cumsum(np.sort(lengths))])  # shortest[m]: the m shortest examples' tokens
    chosen, used = [], 0
    for i in np.random.default_rng((seed, query)).permutation(len(pool)):
        still_needed = shortest[num_shots - len(chosen) - 1]
        if used + lengths[i] + still_needed <= budget and not np.array_equal(pool[i][0], query_inputs):
            chosen.append(int(i))
            used += int(lengths[i])
            if len(chosen) == num_shots:
                break
    return chosen


def shot_length(shot: Shot) -> int:
    """Tokens a shot takes in a prompt: its inputs and its targets."""
    return len(shot[0]) + len(shot[1])


def prompt_inputs(pool: Sequence[Shot], chosen: Sequence[int], query_inputs: np.ndarray) -> np.ndarray:
    """The chosen shots' inputs and targets, in order, then the query's inputs."""
    parts = [part for i in chosen for part in pool[i]]
    return np.concatenate([*parts, query_inputs]).astype(query_inputs.dtype)


def prepend_shots(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    *,
    pool: Sequence[Shot],
    num_shots: int,
    shots_seed: int,
    task_name: str,
) -> tf.data.Dataset:
    """seqio preprocessor (the last one, after tokenising): puts `num_shots` solved examples of `pool` before
    each example's `inputs` (see the module docstring). Reads the whole split at once (an evaluation split),
    so a prompt that cannot fit raises `ShotsDoNotFit` here, before any model runs."""
    length = sequence_length["inputs"]
    examples = []
    for position, ex in enumerate(dataset.as_numpy_iterator()):
        query = int(ex["idx"]) if "idx" in ex else position
        chosen = choose_shots(pool, num_shots, shots_seed, query, ex["inputs"], length - len(ex["inputs"]))
        if len(chosen) < num_shots:
            raise ShotsDoNotFit(_no_fit_message(pool, num_shots, task_name, position, len(ex["inputs"]), length))
        examples.append({**ex, "inputs": prompt_inputs(pool, chosen, ex["inputs"])})
    return _from_examples(examples, dataset.element_spec)


def _no_fit_message(pool: Sequence[Shot], num_shots: int, task: str, position: int, query: int, length: int) -> str:
    shortest = sum(sorted(shot_length(shot) for shot in pool)[:num_shots])
    return (f"NUM_SHOTS = {num_shots}: {num_shots} solved examples of {task!r} do not fit before query {position} in "
            f"TASK_FEATURE_LENGTHS['inputs'] = {length} (the query takes {query} tokens, the {num_shots} shortest "
            f"train examples {shortest}); lower NUM_SHOTS or raise the inputs length.")


def _from_examples(examples: list[dict[str, Any]], spec: Mapping[str, tf.TensorSpec]) -> tf.data.Dataset:
    def generate() -> Iterator[dict[str, Any]]:
        yield from examples

    return tf.data.Dataset.from_generator(generate, output_signature=dict(spec))
