"""Helpers that register seqio tasks over your own files; importing this module registers nothing.

| helper | task | files |
| --- | --- | --- |
| `register_family_task` | one of `OBJECTIVES` (span corruption, MLM (+NSP), LM, prefix LM, BART, UL2) | text, one document per line |
| `register_span_corruption_task`, `text_files_task` (gin) | T5 span corruption | text, one document per line |
| `register_text_to_text_task` | your own `inputs` -> `targets` pairs, metrics by name | `.tsv` (header row) / `.jsonl` |
| `register_qa_task` | UnifiedQA text-to-text (extractive, abstractive, multiple choice, yes/no) | `.jsonl` / `.tsv` records |
| `add_qa_inputs_task` | one of `OBJECTIVES` over a QA source's inputs (TAPT data) | any QA record source |
| `register_rank_classification_task` | multiple choice by scoring each option | any QA record source |
| `register_qa_mixture` | examples-proportional mixture of QA tasks | - |
| `register_objective_space` | AANG's objective space: one task per D/T/R/O combination | an end task, in-domain text, the bundled corpus |
| `register_classification_task` | `[CLS] A [SEP] (B [SEP])` -> label | TSV with a header row |
| `register_tagging_task` | one tag per word | TSV with a header row |

t5x_lite's own tasks (`t5x_lite.tasks`) are built with these helpers. Register yours in a module
named by `MIXTURE_OR_TASK_MODULE`, then train with `--gin.MIXTURE_OR_TASK_NAME="'my_task'"`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import gin
import seqio
import tensorflow as tf

from t5x_lite.data import objective_stages, pipeline, sources, vocab
from t5x_lite.data.metrics import classification as classification_metrics
from t5x_lite.data.metrics import qa as qa_metrics
from t5x_lite.data.preprocessors import (
    bart_noise,
    classification,
    lm,
    mlm,
    objective_space,
    span_corruption,
    text,
    ul2,
    unifiedqa,
)
from t5x_lite.data.preprocessors.permutation_lm import permutation_lm_preprocessors

SplitFiles = Mapping[str, str | Sequence[str]]
QA_MIXING_MAXIMUM = 1000


def _features(names: Sequence[str], add_eos: bool, vocabulary: seqio.Vocabulary | None) -> dict[str, seqio.Feature]:
    vocabulary = vocabulary or vocab.get_vocabulary()
    return {name: seqio.Feature(vocabulary=vocabulary, add_eos=add_eos) for name in names}


def _add(name: str, overwrite: bool, **task_args: Any) -> seqio.Task:
    if overwrite:
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(name, **task_args)


# ------------------------------------------------------------------ pre-training objectives


def span_corruption_output_features(vocabulary: seqio.Vocabulary | None = None) -> dict[str, seqio.Feature]:
    """`inputs`/`targets` features over the (default: bundled) SentencePiece vocabulary."""
    vocabulary = vocabulary or vocab.get_vocabulary()
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=False),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
    }


# objective -> (preprocessors over a `text` field, output features for a vocabulary).
OBJECTIVES: dict[str, tuple[Callable[[], list], Callable[[seqio.Vocabulary | None], dict[str, seqio.Feature]]]] = {
    "span_corruption": (span_corruption.span_corruption_preprocessors, span_corruption_output_features),
    "mlm": (mlm.mlm_preprocessors, lambda v: _features(["inputs", "targets"], False, v)),
    "mlm_nsp": (
        lambda: mlm.mlm_preprocessors(next_sentence_prediction=True),
        lambda v: _features(["inputs", "targets"], False, v),
    ),
    "lm": (lm.lm_preprocessors, lambda v: _features(["targets"], False, v)),
    "prefix_lm": (lm.prefix_lm_preprocessors, lambda v: _features(["inputs", "targets"], False, v)),
    "permutation_lm": (permutation_lm_preprocessors, lambda v: _features(["targets"], False, v)),
    "bart_denoising": (bart_noise.bart_preprocessors, lambda v: _features(["inputs", "targets"], True, v)),
    "ul2": (ul2.ul2_preprocessors, lambda v: _features(["inputs", "targets"], True, v)),
    # Decoder-only (PrefixLMModel): the targets follow the inputs directly, then EOS.
    "ul2_prefix_lm": (
        ul2.ul2_preprocessors,
        lambda v: {**_features(["inputs"], False, v), **_features(["targets"], True, v)},
    ),
}


def register_family_task(
    name: str,
    objective: str,
    split_to_filepattern: SplitFiles,
    vocabulary: seqio.Vocabulary | None = None,
    overwrite: bool = False,
) -> seqio.Task:
    """Registers `objective` (one of `OBJECTIVES`) over plain-text files, one document per line.

    Example: `register_family_task("my_mlm", "mlm", {"train": "/data/train*.txt", "validation": "/data/valid.txt"})`.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown objective {objective!r}; pick one of {sorted(OBJECTIVES)}.")
    preprocessors, output_features = OBJECTIVES[objective]
    sources.check_files(name, split_to_filepattern)
    return _add(
        name,
        overwrite,
        source=sources.TextLineFiles(split_to_filepattern=dict(split_to_filepattern)),
        preprocessors=[text.lines_to_text_examples, *preprocessors()],
        output_features=output_features(vocabulary),
        metric_fns=[],
    )


def register_span_corruption_task(
    name: str,
    split_to_filepattern: SplitFiles,
    vocabulary: seqio.Vocabulary | None = None,
    overwrite: bool = False,
) -> seqio.Task:
    """Registers a span-corruption task over plain-text files (one document per line).

    Example: `register_span_corruption_task("my_corpus", {"train": "/data/train*.txt",
    "validation": "/data/valid.txt"})`, then train with `--gin.MIXTURE_OR_TASK_NAME="'my_corpus'"`.
    """
    return register_family_task(name, "span_corruption", split_to_filepattern, vocabulary, overwrite)


# Tasks registered by `text_files_task`: name -> the split patterns they were registered with.
_TEXT_FILES_TASKS: dict[str, dict[str, tuple[str, ...]]] = {}


@gin.configurable
def text_files_task(
    name: str = gin.REQUIRED,
    train_files: str | Sequence[str] = gin.REQUIRED,
    validation_files: str | Sequence[str] | None = None,
) -> str:
    """Registers a span-corruption task over your text files (one document per line); returns its name.

    For gin, so that a run names its own corpus without a Python module (continued pre-training, as in
    gin_configs/examples/dapt.gin): `MIXTURE_OR_TASK_NAME = @text_files_task()` with `text_files_task.name`,
    `.train_files` and `.validation_files`, each a file pattern (glob) or a list of them. Without
    `validation_files` the task has only a `train` split: set `train.eval_period = 0`. Calling it again with the
    same files returns the name; with other files it re-registers the task (only a task it registered itself: a
    name taken by another task, e.g. `bundled_span_corruption`, is a ValueError). A split's pattern that matches
    no file is a FileNotFoundError.
    """
    splits = {"train": train_files} if validation_files is None else {"train": train_files, "validation": validation_files}
    patterns = {split: (p,) if isinstance(p, str) else tuple(p) for split, p in splits.items()}
    pipeline.import_default_tasks()  # their names are taken
    if name in seqio.TaskRegistry.names():
        if name not in _TEXT_FILES_TASKS:
            raise ValueError(f"text_files_task: the task name {name!r} is already registered by other code; pick another name.")
        if _TEXT_FILES_TASKS[name] == patterns:
            return name
    register_span_corruption_task(name, {split: list(p) for split, p in patterns.items()}, overwrite=True)
    _TEXT_FILES_TASKS[name] = patterns
    return name


# ------------------------------------------------------------------ AANG's objective space


class TextData(NamedTuple):
    """A text source of the objective space: a seqio source and the preprocessors that make its examples
    `{"text": string}` (or, for the end task, `{"inputs", "targets"}` strings)."""

    source: seqio.DataSource
    preprocessors: tuple[Callable[..., Any], ...] = ()


def text_lines(split_to_filepattern: SplitFiles) -> TextData:
    """Plain-text files, one document per line."""
    return TextData(sources.TextLineFiles(split_to_filepattern=dict(split_to_filepattern)),
                    (text.lines_to_text_examples,))


def qa_contexts(split_to_filepattern: SplitFiles, format: str) -> TextData:
    """The contexts of QA record files (`sources.QaFileDataSource`): unlabelled in-domain text."""
    rekey = functools.partial(seqio.preprocessors.rekey, key_map={"text": "context"})
    return TextData(sources.QaFileDataSource(split_to_filepattern, format), (rekey,))


def end_task_strings(task_name: str) -> TextData:
    """The end task's `inputs`/`targets` strings: its source and its preprocessors before tokenization (the same
    shards, so the objectives built on it read exactly the end task's examples)."""
    task = seqio.get_mixture_or_task(task_name)
    if not isinstance(task, seqio.Task):
        raise TypeError(f"The objective space's end task must be a task, not the mixture {task_name!r}.")
    steps = list(task.preprocessors)
    tokenizes = [i for i, p in enumerate(steps) if getattr(p, "func", p) is seqio.preprocessors.tokenize]
    if not tokenizes:
        raise ValueError(f"End task {task_name!r} has no seqio tokenize step: the objective space needs its text.")
    return TextData(task.source, tuple(steps[: tokenizes[0]]))


def register_objective_space(
    prefix: str,
    end_task: str,
    combinations: Sequence[objective_stages.Combination],
    domain: TextData | None = None,
    general: TextData | None = None,
    vocabulary: seqio.Vocabulary | None = None,
    overwrite: bool = False,
) -> dict[str, str]:
    """Registers one task `<prefix>_<combination>` per combination (`objective_stages.combinations()`); returns
    {combination name: task name}. D=task reads `end_task`'s inputs (O=task: its inputs and targets), D=domain
    `domain` (required if a combination uses it), D=general `general` (default: the bundled corpus)."""
    general = general or text_lines({s: str(sources.BUNDLED_DIR / f"{s}.txt") for s in ("train", "validation")})
    task_text = end_task_strings(end_task)
    to_text = functools.partial(seqio.preprocessors.rekey, key_map={"text": "inputs"})
    data = {"task": TextData(task_text.source, (*task_text.preprocessors, to_text)), "domain": domain,
            "general": general}
    names = {}
    for combination in combinations:
        reason = objective_stages.exclusion_reason(combination)
        if reason is not None:
            raise ValueError(f"objective {combination.name} is excluded: {reason}.")
        if data[combination.data] is None:
            raise ValueError(f"objective {combination.name} reads in-domain text: pass `domain`.")
        if combination.output == "task":
            source, steps = task_text.source, [*task_text.preprocessors,
                                               *objective_space.task_output_preprocessors(combination)]
        else:
            source = data[combination.data].source
            steps = [*data[combination.data].preprocessors, *objective_space.text_preprocessors(combination)]
        name = f"{prefix}_{combination.name}"
        _add(name, overwrite, source=source, preprocessors=steps, output_features=qa_output_features(vocabulary),
             metric_fns=[])
        names[combination.name] = name
    return names


# ------------------------------------------------------------------ text-to-text pairs

# Metrics `register_text_to_text_task` takes by name (seqio's `fn(targets, predictions) -> {name: percent}`).
TEXT_METRICS: dict[str, Callable[..., dict[str, float]]] = {
    "accuracy": qa_metrics.accuracy,  # exact match, ignoring case and extra spaces: `accuracy`
    "squad": qa_metrics.squad,  # SQuAD's normalised exact match and token F1: `em`, `f1`
    "f1": qa_metrics.squad_f1,  # SQuAD's token F1 only: `f1`
    "rouge": qa_metrics.rouge,  # ROUGE-1/2/L F-measures: `rouge1`, `rouge2`, `rougeL`
}
MetricSpec = str | Callable[..., Mapping[str, float]]


def text_metric_fns(metrics: MetricSpec | Sequence[MetricSpec]) -> list[Callable[..., Mapping[str, float]]]:
    """The metric functions `metrics` names: keys of `TEXT_METRICS` or seqio metric callables."""
    fns = []
    for metric in [metrics] if isinstance(metrics, str) or callable(metrics) else metrics:
        if callable(metric):
            fns.append(metric)
        elif metric in TEXT_METRICS:
            fns.append(TEXT_METRICS[metric])
        else:
            raise ValueError(f"Unknown metric {metric!r}; use one of {sorted(TEXT_METRICS)} or a function "
                             "fn(targets, predictions) -> {name: value}.")
    return fns


def register_text_to_text_task(
    name: str,
    split_to_filepattern: SplitFiles,
    format: str = "tsv",
    metrics: MetricSpec | Sequence[MetricSpec] = ("accuracy",),
    vocabulary: seqio.Vocabulary | None = None,
    validate: bool = True,
    overwrite: bool = False,
) -> seqio.Task:
    """Registers a text-to-text task over your files of `inputs` -> `targets` pairs, e.g.
    `register_text_to_text_task("my_task", {"train": "data/train*.tsv", "validation": "data/dev.tsv"}, metrics=["squad"])`.

    `format` "tsv": the header row `inputs<TAB>targets`, then one example per line; "jsonl": one object per line
    with `inputs` and `targets` strings (`sources.read_text_to_text_file`). `metrics`: names from `TEXT_METRICS`
    ("accuracy", "squad", "f1", "rouge") or callables, scored on the greedy decodes of the validation split.
    Inputs and targets each end in EOS, cut to TASK_FEATURE_LENGTHS as the QA tasks are (`text.fit_to_length`).
    A split's pattern that matches no file is a FileNotFoundError; `validate` reads every file now, so a bad or
    empty one fails here (a `TextToTextFileError`, a ValueError naming the file and line).
    """
    fns = text_metric_fns(metrics)
    source = sources.TextToTextFileDataSource(split_to_filepattern, format)
    sources.check_files(name, split_to_filepattern)
    if validate:
        for split in source.splits:
            source.num_input_examples(split)
    return _add(
        name,
        overwrite,
        source=source,
        preprocessors=[
            seqio.preprocessors.tokenize,
            text.fit_to_length,  # gin: fit_to_length.long_sequences = "truncate" or "error"
        ],
        output_features=qa_output_features(vocabulary),
        postprocess_fn=qa_metrics.postprocess_with_references,  # the decoded text, stripped
        metric_fns=fns,
    )


def records_task(
    records: Sequence[Mapping[str, str]], vocabulary: seqio.Vocabulary | None = None, name: str = "records",
    split: str = "infer",
) -> seqio.Task:
    """An unregistered text-to-text task over in-memory `{"inputs": ..., "targets": ...}` records (one `split`):
    what `t5x_lite.infer` predicts for a file of inputs, and the Python API for a list of them."""
    columns = {k: [r[k] for r in records] for k in ("inputs", "targets")}
    source = seqio.FunctionDataSource(
        lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices(columns), splits=[split],
    )
    return seqio.Task(
        name, source, output_features=qa_output_features(vocabulary),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
    )


# ------------------------------------------------------------------ question answering

QA_METRICS: dict[str, list[Callable[..., dict[str, float]]]] = {
    "extractive": [qa_metrics.squad],
    "abstractive": [qa_metrics.rouge, qa_metrics.squad_f1],
    "multiple_choice": [qa_metrics.accuracy],
    "yes_no": [qa_metrics.accuracy],
}
QA_POSTPROCESSORS = {
    "extractive": qa_metrics.postprocess_with_references,
    "abstractive": qa_metrics.postprocess_with_references,
    "multiple_choice": qa_metrics.postprocess_text,
    "yes_no": qa_metrics.postprocess_text,
}


def qa_output_features(vocabulary: seqio.Vocabulary | None = None) -> dict[str, seqio.Feature]:
    """`inputs`/`targets` over the (default: bundled) vocabulary, each ending in EOS."""
    return _features(["inputs", "targets"], True, vocabulary)


def add_qa_task(
    name: str,
    source: seqio.DataSource,
    format: str,
    record_preprocessors: Sequence[Callable[..., Any]] = (),
    vocabulary: seqio.Vocabulary | None = None,
    metric_fns: Sequence[Callable[..., Any]] | None = None,
    lowercase: bool = True,
    overwrite: bool = False,
) -> seqio.Task:
    """Registers a UnifiedQA task over any source of QA records (after `record_preprocessors`).

    The records have `question`, `context`, `options`, `answers` (see `preprocessors.unifiedqa`);
    `metric_fns` default to `QA_METRICS[format]`.
    """
    return _add(
        name,
        overwrite,
        source=source,
        preprocessors=[
            *record_preprocessors,
            functools.partial(unifiedqa.to_text_to_text, format=format, lowercase=lowercase),
            seqio.preprocessors.tokenize,
            text.fit_to_length,  # gin: fit_to_length.long_sequences = "truncate" or "error"
        ],
        output_features=qa_output_features(vocabulary),
        postprocess_fn=QA_POSTPROCESSORS[format],
        metric_fns=list(QA_METRICS[format] if metric_fns is None else metric_fns),
    )


def add_qa_inputs_task(
    name: str, source: seqio.DataSource, format: str, objective: str, vocabulary: seqio.Vocabulary | None = None,
    overwrite: bool = False,
) -> seqio.Task:
    """Registers `objective` (one of `OBJECTIVES`) over the UnifiedQA inputs of a QA record source: the task's own
    text without its answers (TAPT data, Gururangan et al. 2020; an auxiliary of end-task-aware training)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown objective {objective!r}; pick one of {sorted(OBJECTIVES)}.")
    preprocessors, output_features = OBJECTIVES[objective]
    return _add(
        name,
        overwrite,
        source=source,
        preprocessors=[functools.partial(unifiedqa.to_text_to_text, format=format), text.inputs_as_text,
                       *preprocessors()],
        output_features=output_features(vocabulary),
        metric_fns=[],
    )


def register_qa_task(
    name: str,
    split_to_filepattern: SplitFiles,
    format: str,
    vocabulary: seqio.Vocabulary | None = None,
    metric_fns: Sequence[Callable[..., Any]] | None = None,
    lowercase: bool = True,
    validate: bool = True,
    overwrite: bool = False,
) -> seqio.Task:
    """Registers a UnifiedQA text-to-text task over your `.jsonl`/`.tsv` QA files (formats: `sources`), e.g.
    `register_qa_task("my_qa", {"train": "/data/qa/train*.jsonl", "validation": "/data/qa/dev.tsv"}, "extractive")`.

    `format` is one of `unifiedqa.FORMATS`; `metric_fns` default to `QA_METRICS[format]` (extractive SQuAD EM/F1,
    abstractive ROUGE + SQuAD F1, multiple choice and yes/no accuracy), the vocabulary to the bundled one;
    `lowercase` lower-cases inputs and targets, as UnifiedQA does. `validate` reads every file now, so a bad or
    empty file fails here (a `QaRecordError`, a ValueError) rather than at the first batch; a split's pattern
    that matches no file is a FileNotFoundError.
    """
    unifiedqa.check_format(format)
    source = sources.QaFileDataSource(split_to_filepattern, format)
    for split in source.splits:
        try:
            source.list_shards(split)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"Task {name!r}: {e}") from None
        if validate:
            source.num_input_examples(split)
    return add_qa_task(name, source, format, (), vocabulary, metric_fns, lowercase, overwrite)


# format -> the preprocessor that makes one row per option of a record (rank classification).
RANK_CLASSIFICATION_ROWS = {
    "multiple_choice": unifiedqa.multiple_choice_rank_classification,
    "yes_no": unifiedqa.yes_no_rank_classification,
}


def register_rank_classification_task(
    name: str, source: seqio.DataSource, vocabulary: seqio.Vocabulary | None = None, lowercase: bool = True,
    format: str = "multiple_choice",
) -> seqio.Task:
    """Multiple choice (or yes/no: the options `yes` and `no`) by rank classification: one row per option,
    scored by the model's log-likelihood of the option text; the best-scoring option per question is the answer."""
    if format not in RANK_CLASSIFICATION_ROWS:
        raise ValueError(f"Rank classification takes the formats {sorted(RANK_CLASSIFICATION_ROWS)}, not {format!r}.")
    return _add(
        name,
        False,
        source=source,
        preprocessors=[
            functools.partial(RANK_CLASSIFICATION_ROWS[format], lowercase=lowercase),
            seqio.preprocessors.tokenize,
            text.fit_to_length,  # gin: fit_to_length.long_sequences = "truncate" or "error"
        ],
        output_features=qa_output_features(vocabulary),
        postprocess_fn=qa_metrics.postprocess_rank_target,
        metric_fns=[qa_metrics.rank_classification],
    )


@gin.configurable
def qa_mixing_rate(task: seqio.Task, maximum: int | None = QA_MIXING_MAXIMUM, temperature: float = 1.0,
                   scale: float = 1.0) -> float:
    """Examples-proportional rate: `min(scale * n_train_examples, maximum) ** (1 / temperature)`.

    The rate of `bundled_qa_mixture`; change it in gin, e.g. `qa_mixing_rate.maximum = 500` or
    `qa_mixing_rate.temperature = 2.0` (rates are computed when the dataset is built).
    """
    return seqio.mixing_rate_num_examples(task, maximum=maximum, scale=scale, temperature=temperature)


def register_qa_mixture(
    name: str,
    task_names: Sequence[str],
    maximum: int | None = None,
    temperature: float = 1.0,
    scale: float = 1.0,
    overwrite: bool = False,
) -> seqio.Mixture:
    """Registers an examples-proportional mixture (T5's "examples-proportional mixing" with cap
    `maximum` and temperature) of QA tasks that share output features."""
    if overwrite:
        seqio.MixtureRegistry.remove(name)
    rate = functools.partial(seqio.mixing_rate_num_examples, maximum=maximum, temperature=temperature, scale=scale)
    return seqio.MixtureRegistry.add(name, list(task_names), default_rate=rate)


# ------------------------------------------------------------------ classification and tagging


def classification_output_features(
    label_names: Sequence[str], vocabulary: seqio.Vocabulary | None = None, first_id: int = 0
) -> dict[str, seqio.Feature]:
    """`inputs` (word pieces, no EOS: BERT ends with [SEP]) and `targets` (label or tag ids, named)."""
    return {
        **_features(["inputs"], False, vocabulary),
        "targets": seqio.Feature(vocabulary=vocab.LabelVocabulary(label_names, first_id), add_eos=False),
    }


def add_classification_task(
    name: str,
    source: seqio.DataSource,
    record_preprocessors: Sequence[Callable[..., Any]],
    label_names: Sequence[str],
    text_keys: Sequence[str],
    vocabulary: seqio.Vocabulary | None = None,
    overwrite: bool = False,
) -> seqio.Task:
    """Registers a classification task over any source whose records (after `record_preprocessors`)
    hold the `text_keys` strings and an int `label` (an index in `label_names`)."""
    return _add(
        name,
        overwrite,
        source=source,
        preprocessors=[*record_preprocessors, functools.partial(classification.to_bert_inputs, text_keys=tuple(text_keys))],
        output_features=classification_output_features(label_names, vocabulary),
        postprocess_fn=classification_metrics.postprocess_label,
        metric_fns=[classification_metrics.classification_metrics],
    )


def register_classification_task(
    name: str,
    split_to_filepattern: SplitFiles,
    label_names: Sequence[str],
    pair: bool = False,
    vocabulary: seqio.Vocabulary | None = None,
    overwrite: bool = False,
) -> seqio.Task:
    """Registers a classification task over TSV files with a header row and columns
    `label<TAB>sentence` (or `label<TAB>sentence1<TAB>sentence2` with `pair=True`); labels are
    names from `label_names` (ids in that order). Fine-tune with `EncoderClassificationModel`,
    `BertConfig.num_labels = len(label_names)`, `TASK_FEATURE_LENGTHS = {'inputs': L, 'targets': 1}`.
    """
    sources.check_files(name, split_to_filepattern)
    columns = ("label", "sentence1", "sentence2") if pair else ("label", "sentence")
    return add_classification_task(
        name,
        sources.TextLineFiles(split_to_filepattern=dict(split_to_filepattern), skip_header_lines=1),
        [
            functools.partial(text.parse_tsv_lines, columns=columns),
            functools.partial(classification.label_names_to_ids, label_names=tuple(label_names)),
        ],
        label_names,
        columns[1:],
        vocabulary,
        overwrite,
    )


def register_tagging_task(
    name: str,
    split_to_filepattern: SplitFiles,
    tag_names: Sequence[str],
    vocabulary: seqio.Vocabulary | None = None,
    overwrite: bool = False,
) -> seqio.Task:
    """Registers a tagging task over TSV files with a header row and columns `tokens<TAB>tags`
    (space-separated words, one tag name from `tag_names` per word; BIO names like `B-PER` give
    entity F1). Fine-tune with `EncoderTaggingModel`, `BertConfig.num_labels = len(tag_names)`,
    `TASK_FEATURE_LENGTHS = {'inputs': L, 'targets': L}`.
    """
    sources.check_files(name, split_to_filepattern)
    return _add(
        name,
        overwrite,
        source=sources.TextLineFiles(split_to_filepattern=dict(split_to_filepattern), skip_header_lines=1),
        preprocessors=[
            functools.partial(text.parse_tsv_lines, columns=("tokens", "tags")),
            functools.partial(classification.to_tagging_inputs, tag_names=tuple(tag_names)),
        ],
        output_features=classification_output_features(tag_names, vocabulary, first_id=1),
        postprocess_fn=classification_metrics.postprocess_tags,
        metric_fns=[classification_metrics.tagging_metrics_fn(tuple(tag_names))],
    )
