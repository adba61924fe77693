"""UnifiedQA-style fine-tuning tasks: your own QA files in one call, the bundled QA sets, SQuAD, BoolQ.

Importing this module registers (all text-to-text, `inputs`/`targets`, bundled vocabulary):

| name | data | metrics |
| --- | --- | --- |
| `bundled_qa_extractive` | `bundled/qa/extractive_{train,validation}.jsonl` | SQuAD `em`, `f1` |
| `bundled_qa_abstractive` | `bundled/qa/abstractive_*.jsonl` | `rouge1`, `rouge2`, `rougeL`, SQuAD `f1` |
| `bundled_qa_multiple_choice` | `bundled/qa/multiple_choice_*.jsonl` | `accuracy` |
| `bundled_qa_yes_no` | `bundled/qa/yes_no_*.jsonl` | `accuracy` |
| `bundled_qa_mixture` | the four above, examples-proportional (`qa_mixing_rate`) | each task's |
| `squad_v1_1_unifiedqa` | TFDS `squad/v1.1:3.0.0` (extractive, every reference answer kept) | SQuAD `em`, `f1` |
| `boolq_unifiedqa` | TFDS `super_glue/boolq:1.0.2` (yes/no) | `accuracy` |

The TFDS tasks read data prepared beforehand (`--tfds_data_dir`); absent data fails at once, offline.

Your own data: `register_qa_task("my_qa", {"train": "train.jsonl", "validation": "dev.jsonl"},
format="extractive")`, then `--gin.MIXTURE_OR_TASK_NAME="'my_qa'"` with the module named in
`MIXTURE_OR_TASK_MODULE`. File formats (picked by extension):

* `.jsonl`: one JSON object per line: `{"question": ..., "context": ..., "answers": [...]}`;
  multiple choice adds `"options": [...]` (context optional) and its answer is the correct option's
  text (or its 0-based index); yes/no answers are `true`/`false` or "yes"/"no". `answer` (one value)
  may replace `answers`. Blank lines are skipped.
* `.tsv`: a header row naming the columns (`question`, `context`, `options`, `answers` or `answer`),
  then one record per row; list cells (`options`, `answers`) separate items with `|`.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import pathlib
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import numpy as np
import seqio
import tensorflow as tf

from t5x_lite.data import pipeline, qa_metrics, unifiedqa, vocab
from t5x_lite.data.tasks import PreparedTfdsDataSource

QA_DIR = pathlib.Path(__file__).parent / "bundled" / "qa"
BUNDLED_FORMATS = unifiedqa.FORMATS
BUNDLED_MIXTURE = "bundled_qa_mixture"
BUNDLED_MIXTURE_MAXIMUM = 1000
SQUAD_TFDS_NAME = "squad/v1.1:3.0.0"
BOOLQ_TFDS_NAME = "super_glue/boolq:1.0.2"

# Fields each format needs ("answers" may be given as "answer").
REQUIRED_FIELDS = {
    "extractive": ("question", "context", "answers"),
    "abstractive": ("question", "context", "answers"),
    "multiple_choice": ("question", "options", "answers"),
    "yes_no": ("question", "context", "answers"),
}
TSV_LIST_SEPARATOR = "|"
_EXAMPLE_RECORDS = {
    "extractive": '{"question": "Who wrote it?", "context": "It was written by Ann.", "answers": ["Ann"]}',
    "abstractive": '{"question": "Why?", "context": "...", "answers": ["because ..."]}',
    "multiple_choice": '{"question": "Which?", "options": ["red", "blue"], "answers": ["blue"]}',
    "yes_no": '{"question": "Is it?", "context": "...", "answers": [true]}',
}


# ------------------------------------------------------------------ reading and checking records


class QaRecordError(ValueError):
    """A QA file that cannot be read as records of its format (names the file, line and field)."""


def read_qa_file(path: str, format: str) -> list[dict[str, Any]]:
    """Reads and checks one `.jsonl` or `.tsv` file of QA records.

    Returns records `{"question": str, "context": str, "options": [str], "answers": [str]}` with
    yes/no answers as "yes"/"no" and a multiple-choice answer index replaced by the option's text.

    Raises:
      QaRecordError: for an unknown extension, an empty file, a line that is not a record, or a
        record without a field its format needs (the message names file, line and field).
    """
    unifiedqa._check_format(format)
    suffix = pathlib.PurePath(path).suffix.lower()
    if suffix not in (".jsonl", ".tsv"):
        raise QaRecordError(f"{path}: unknown QA file type {suffix!r}; use .jsonl (JSON lines) or .tsv (with a header row).")
    with tf.io.gfile.GFile(path, "r") as f:
        text = f.read()
    rows = _jsonl_rows(path, text) if suffix == ".jsonl" else _tsv_rows(path, text)
    records = [_check_record(path, line, row, format) for line, row in rows]
    if not records:
        raise QaRecordError(
            f"{path}: no records (the file is empty). A {format} file needs one record per line, e.g. "
            f"{_EXAMPLE_RECORDS[format]}" + (" (or a .tsv with a header row)" if suffix == ".tsv" else "")
        )
    return records


def _jsonl_rows(path: str, text: str) -> list[tuple[int, dict]]:
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise QaRecordError(f"{path}, line {line}: not valid JSON ({e.msg}): {raw[:80]!r}") from None
        if not isinstance(row, dict):
            raise QaRecordError(f"{path}, line {line}: expected a JSON object per line, got {type(row).__name__}.")
        rows.append((line, row))
    return rows


def _tsv_rows(path: str, text: str) -> list[tuple[int, dict]]:
    lines = list(csv.reader(io.StringIO(text), delimiter="\t"))
    if not lines:
        return []
    header = [h.strip() for h in lines[0]]
    rows = []
    for line, cells in enumerate(lines[1:], start=2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) > len(header):
            raise QaRecordError(f"{path}, line {line}: {len(cells)} cells but the header (line 1) names {len(header)} columns {header}.")
        row = {}
        for key, cell in zip(header, cells):
            if not cell.strip():
                continue  # an empty cell counts as a missing field
            if key in ("options", "answers"):
                row[key] = [item.strip() for item in cell.split(TSV_LIST_SEPARATOR)]
            else:
                row[key] = cell
        rows.append((line, row))
    return rows


def _check_record(path: str, line: int, row: Mapping[str, Any], format: str) -> dict[str, Any]:
    def fail(message: str) -> QaRecordError:
        return QaRecordError(f"{path}, line {line}: {message} (fields present: {sorted(row)}).")

    for field in REQUIRED_FIELDS[format]:
        value = row.get(field)
        if field == "answers" and value is None:
            value = row.get("answer")
        if value is None or (isinstance(value, (str, list)) and not value):
            alias = " (or 'answer')" if field == "answers" else ""
            raise fail(f"the record has no '{field}' field{alias}, which the '{format}' format needs")
    question = row["question"]
    context = row.get("context") or ""
    if not isinstance(question, str) or not isinstance(context, str):
        raise fail("'question' and 'context' must be strings")
    options = row.get("options") or []
    if format == "multiple_choice" and (
        not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options)
    ):
        raise fail(f"'options' must be a list of at least 2 strings, got {options!r}")
    answers = row["answers"] if "answers" in row else row["answer"]
    if not isinstance(answers, list):
        answers = [answers]
    if not answers:
        raise fail("'answers' is an empty list")
    if format == "yes_no":
        try:
            answers = [unifiedqa.yes_no_answer(a) for a in answers]
        except ValueError as e:
            raise fail(str(e)) from None
    elif format == "multiple_choice":
        answers = [_option_text(a, options, fail) for a in answers]
    elif not all(isinstance(a, str) for a in answers):
        raise fail(f"answers must be strings, got {answers!r}")
    return {"question": question, "context": context, "options": list(options) if format == "multiple_choice" else [],
            "answers": answers}


def _option_text(answer: Any, options: list[str], fail: Callable[[str], Exception]) -> str:
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(options):
            raise fail(f"answer index {answer} is out of range for {len(options)} options")
        return options[answer]
    if not isinstance(answer, str) or unifiedqa.format_answer(answer) not in [unifiedqa.format_answer(o) for o in options]:
        raise fail(f"the answer {answer!r} is not one of the options {options!r}")
    return answer


def records_to_dataset(records: Sequence[Mapping[str, Any]]) -> tf.data.Dataset:
    """A dataset of records: `question`, `context` (scalars), `options`, `answers` (1-D strings)."""

    def ragged(lists):
        values = [item for items in lists for item in items]
        return tf.RaggedTensor.from_row_lengths(
            tf.constant(values, dtype=tf.string, shape=[len(values)]), [len(items) for items in lists]
        )

    return tf.data.Dataset.from_tensor_slices({
        "question": tf.constant([r["question"] for r in records], dtype=tf.string),
        "context": tf.constant([r["context"] for r in records], dtype=tf.string),
        "options": ragged([r["options"] for r in records]),
        "answers": ragged([r["answers"] for r in records]),
    })


class QaFileDataSource(seqio.DataSource):
    """QA records from `.jsonl`/`.tsv` files (see `read_qa_file`), one file pattern per split.

    The files are read and checked when a dataset is built (they are small: records are held in
    memory, and the dataset is checkpointable with `tf.train.Checkpoint`).
    """

    def __init__(self, split_to_filepattern: Mapping[str, str | Sequence[str]], format: str):
        unifiedqa._check_format(format)
        self._patterns = {split: [p] if isinstance(p, str) else list(p) for split, p in split_to_filepattern.items()}
        self._format = format
        self._counts: dict[str, int] = {}
        super().__init__(splits=tuple(self._patterns))

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str) -> list[str]:
        files = sorted({f for p in self._patterns[split] for f in tf.io.gfile.glob(p)})
        if not files:
            raise FileNotFoundError(f"No file matches {self._patterns[split]} for split {split!r}.")
        return files

    def read_records(self, split: str, files: Sequence[str] | None = None) -> list[dict[str, Any]]:
        return [r for f in (files or self.list_shards(split)) for r in read_qa_file(f, self._format)]

    def num_input_examples(self, split: str) -> int:
        if split not in self._counts:
            self._counts[split] = len(self.read_records(split))
        return self._counts[split]

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None) -> tf.data.Dataset:
        files = self.list_shards(split)
        if shuffle:
            random.Random(seed).shuffle(files)
        ds = records_to_dataset(self.read_records(split, files))
        if shard_info and shard_info.num_shards > 1:
            ds = ds.shard(shard_info.num_shards, shard_info.index)
        return ds

    def __repr__(self):
        return f"{type(self).__name__}({self._patterns}, format={self._format!r})"


# ------------------------------------------------------------------ postprocessing and metrics


def _to_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def postprocess_text(output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False) -> str:
    """Decoded text with whitespace collapsed and lower-cased (for exact-match accuracy)."""
    del example, is_target
    return " ".join(_to_str(output).split()).lower()


def postprocess_with_references(output: Any, example: Mapping[str, Any] | None = None,
                                is_target: bool = False) -> str | list[str]:
    """Predictions: the decoded text. Targets: every reference in the example's `answers`."""
    if is_target and example is not None and "answers" in example:
        return [_to_str(a) for a in np.asarray(example["answers"]).reshape(-1)]
    return _to_str(output).strip()


DEFAULT_METRICS: dict[str, list[Callable[..., dict[str, float]]]] = {
    "extractive": [qa_metrics.squad],
    "abstractive": [qa_metrics.rouge, qa_metrics.squad_f1],
    "multiple_choice": [qa_metrics.accuracy],
    "yes_no": [qa_metrics.accuracy],
}
POSTPROCESSORS = {
    "extractive": postprocess_with_references,
    "abstractive": postprocess_with_references,
    "multiple_choice": postprocess_text,
    "yes_no": postprocess_text,
}


# ------------------------------------------------------------------ registering tasks


def qa_output_features(vocabulary: seqio.Vocabulary | None = None) -> dict[str, seqio.Feature]:
    """`inputs`/`targets` over the (default: bundled) vocabulary, each ending in EOS."""
    vocabulary = vocabulary or vocab.get_vocabulary()
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
    }


def _add_task(name, source, format, record_preprocessors, vocabulary, metric_fns, lowercase, overwrite):
    if overwrite:
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[
            *record_preprocessors,
            functools.partial(unifiedqa.to_text_to_text, format=format, lowercase=lowercase),
            seqio.preprocessors.tokenize,
            pipeline.fit_to_length,  # gin: fit_to_length.long_sequences = "truncate" or "error"
        ],
        output_features=qa_output_features(vocabulary),
        postprocess_fn=POSTPROCESSORS[format],
        metric_fns=list(DEFAULT_METRICS[format] if metric_fns is None else metric_fns),
    )


def postprocess_rank_target(output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False):
    """Targets of a rank-classification task: `(idx, is_correct)` of the option's row."""
    if is_target and example is not None:
        return int(example["idx"]), bool(example["is_correct"])
    return output


def register_rank_classification_task(
    name: str, source: seqio.DataSource, vocabulary: seqio.Vocabulary | None = None, lowercase: bool = True
) -> seqio.Task:
    """Multiple choice by rank classification: one row per option, scored by the model's
    log-likelihood of the option text; the best-scoring option per question is the answer."""
    return seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[
            functools.partial(unifiedqa.multiple_choice_rank_classification, lowercase=lowercase),
            seqio.preprocessors.tokenize,
            pipeline.fit_to_length,  # gin: fit_to_length.long_sequences = "truncate" or "error"
        ],
        output_features=qa_output_features(vocabulary),
        postprocess_fn=postprocess_rank_target,
        metric_fns=[qa_metrics.rank_classification],
    )


def register_qa_task(
    name: str,
    split_to_filepattern: Mapping[str, str | Sequence[str]],
    format: str,
    vocabulary: seqio.Vocabulary | None = None,
    metric_fns: Sequence[Callable[..., Any]] | None = None,
    lowercase: bool = True,
    validate: bool = True,
    overwrite: bool = False,
) -> seqio.Task:
    """Registers a UnifiedQA text-to-text task over your `.jsonl`/`.tsv` QA files.

    Args:
      name: the task name (for `MIXTURE_OR_TASK_NAME`).
      split_to_filepattern: e.g. `{"train": "/data/qa/train*.jsonl", "validation": "/data/qa/dev.tsv"}`.
      format: one of "extractive", "abstractive", "multiple_choice", "yes_no".
      vocabulary: default: the bundled SentencePiece vocabulary.
      metric_fns: default per format: extractive SQuAD EM/F1; abstractive ROUGE + SQuAD F1;
        multiple choice and yes/no accuracy (the generated text equals the answer).
      lowercase: lower-case inputs and targets (as UnifiedQA does).
      validate: read every file now, so a bad record fails here rather than at the first batch.
      overwrite: replace a task of the same name.

    Raises:
      ValueError: unknown format; QaRecordError (a ValueError) for a bad or empty file.
      FileNotFoundError: a split's pattern matches no file.
    """
    unifiedqa._check_format(format)
    source = QaFileDataSource(split_to_filepattern, format)
    for split in source.splits:
        try:
            source.list_shards(split)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"Task {name!r}: {e}") from None
        if validate:
            source.num_input_examples(split)
    return _add_task(name, source, format, [], vocabulary, metric_fns, lowercase, overwrite)


@gin.configurable
def qa_mixing_rate(task: seqio.Task, maximum: int | None = BUNDLED_MIXTURE_MAXIMUM, temperature: float = 1.0,
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


# ------------------------------------------------------------------ TFDS record adapters


def squad_to_records(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """TFDS SQuAD v1.1 (`question`, `context`, `answers/text`) -> records with all references."""

    def fn(x):
        return {"question": x["question"], "context": x["context"], "options": tf.constant([], tf.string),
                "answers": x["answers"]["text"]}

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def boolq_to_records(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """TFDS SuperGLUE BoolQ (`question`, `passage`, `label`) -> yes/no records.

    BoolQ's questions carry no question mark; one is added, as in UnifiedQA's BoolQ inputs.
    """

    def fn(x):
        question = tf.strings.strip(x["question"])
        question = tf.cond(tf.strings.regex_full_match(question, r".*\?"), lambda: question,
                           lambda: tf.strings.join([question, "?"]))
        answer = tf.where(tf.equal(x["label"], 1), "yes", "no")
        return {"question": question, "context": x["passage"], "options": tf.constant([], tf.string),
                "answers": tf.reshape(answer, [1])}

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _register_defaults() -> None:
    names = set(seqio.TaskRegistry.names())
    for format in BUNDLED_FORMATS:
        name = f"bundled_qa_{format}"
        if name not in names:
            splits = {split: str(QA_DIR / f"{format}_{split}.jsonl") for split in ("train", "validation")}
            _add_task(name, QaFileDataSource(splits, format), format, [], None, None, True, False)
    if "bundled_qa_multiple_choice_rank" not in names:
        splits = {split: str(QA_DIR / f"multiple_choice_{split}.jsonl") for split in ("train", "validation")}
        register_rank_classification_task("bundled_qa_multiple_choice_rank", QaFileDataSource(splits, "multiple_choice"))
    if BUNDLED_MIXTURE not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(BUNDLED_MIXTURE, [f"bundled_qa_{f}" for f in BUNDLED_FORMATS],
                                  default_rate=qa_mixing_rate)
    if "squad_v1_1_unifiedqa" not in names:
        _add_task("squad_v1_1_unifiedqa", PreparedTfdsDataSource(tfds_name=SQUAD_TFDS_NAME, splits=("train", "validation")),
                  "extractive", [squad_to_records], None, None, True, False)
    if "boolq_unifiedqa" not in names:
        _add_task("boolq_unifiedqa", PreparedTfdsDataSource(tfds_name=BOOLQ_TFDS_NAME, splits=("train", "validation")),
                  "yes_no", [boolq_to_records], None, None, True, False)


_register_defaults()
