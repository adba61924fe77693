"""Where task examples come from: file checks, prepared TFDS datasets, QA record files and text-to-text pairs.

QA file formats (picked by extension; `read_qa_file` reads and checks them):

* `.jsonl`: one JSON object per line: `{"question": ..., "context": ..., "answers": [...]}`;
  multiple choice adds `"options": [...]` (context optional) and its answer is the correct option's
  text (or its 0-based index); yes/no answers are `true`/`false` or "yes"/"no". `answer` (one value)
  may replace `answers`. Blank lines are skipped.
* `.tsv`: a header row naming the columns (`question`, `context`, `options`, `answers` or `answer`),
  then one record per row; list cells (`options`, `answers`) separate items with `|`.

Text-to-text files (`read_text_to_text_file`) hold `inputs`/`targets` pairs: `.tsv` with the header row
`inputs<TAB>targets`, or `.jsonl` objects with `inputs` and `targets` strings.
"""

from __future__ import annotations

import csv
import functools
import glob
import io
import json
import pathlib
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from t5x_lite import storage
from t5x_lite.data.preprocessors import unifiedqa

BUNDLED_DIR = pathlib.Path(__file__).resolve().parent / "bundled"

# Fields each QA format needs ("answers" may be given as "answer").
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


def check_files(name: str, split_to_filepattern: Mapping[str, str | Sequence[str]]) -> None:
    """Raises FileNotFoundError, naming task `name` and the split, when a split's pattern matches no file."""
    for split, pattern in split_to_filepattern.items():
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        if not any(storage.glob(p) for p in patterns):
            raise FileNotFoundError(f"Task {name!r}: no file matches {pattern!r} for split {split!r}.")


class TextLineFiles(seqio.TextLineDataSource):
    """seqio's text-line source over local or gs:// files: tf.data reads local files only, so a file in a bucket
    is read from a local copy made once per process (`storage.local_file`), in the order of the bucket's names."""

    def list_shards(self, split: str) -> list[str]:
        patterns = self._split_to_filepattern[split]
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        files = [f for p in patterns for f in (storage.glob(p) if glob.has_magic(p) else [p])]  # as seqio lists them
        return [storage.local_file(f) for f in files]


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


# ------------------------------------------------------------------ QA records


class QaRecordError(ValueError):
    """A QA file that cannot be read as records of its format (names the file, line and field)."""


def read_qa_file(path: str, format: str) -> list[dict[str, Any]]:
    """Reads and checks one `.jsonl` or `.tsv` file of QA records.

    Returns records `{"question": str, "context": str, "options": [str], "answers": [str]}` with
    yes/no answers as "yes"/"no" and a multiple-choice answer index replaced by the option's text.
    An unknown extension, an empty file, a line that is not a record or a record without a field its
    format needs is a `QaRecordError` naming file, line and field.
    """
    unifiedqa.check_format(format)
    suffix = pathlib.PurePath(path).suffix.lower()
    if suffix not in (".jsonl", ".tsv"):
        raise QaRecordError(f"{path}: unknown QA file type {suffix!r}; use .jsonl (JSON lines) or .tsv (with a header row).")
    text = storage.path(path).read_text(encoding="utf-8")
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
        row = {  # an empty cell counts as a missing field
            key: [item.strip() for item in cell.split(TSV_LIST_SEPARATOR)] if key in ("options", "answers") else cell
            for key, cell in zip(header, cells) if cell.strip()
        }
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


class RecordFileDataSource(seqio.DataSource):
    """Records that `read_file(path)` reads and checks, from files matched by one pattern (or list) per split.

    The files are read when a dataset is built and the records held in memory (fine-tuning sets are small), so
    the dataset is checkpointable with `tf.train.Checkpoint`; `to_dataset` turns the records into tensors.
    """

    def __init__(self, split_to_filepattern: Mapping[str, str | Sequence[str]],
                 read_file: Callable[[str], list[dict[str, Any]]],
                 to_dataset: Callable[[Sequence[Mapping[str, Any]]], tf.data.Dataset]):
        self._patterns = {split: [p] if isinstance(p, str) else list(p) for split, p in split_to_filepattern.items()}
        self._read_file = read_file
        self._to_dataset = to_dataset
        self._counts: dict[str, int] = {}
        super().__init__(splits=tuple(self._patterns))

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str) -> list[str]:
        files = sorted({f for p in self._patterns[split] for f in storage.glob(p)})
        if not files:
            raise FileNotFoundError(f"No file matches {self._patterns[split]} for split {split!r}.")
        return files

    def read_records(self, split: str, files: Sequence[str] | None = None) -> list[dict[str, Any]]:
        return [r for f in (files or self.list_shards(split)) for r in self._read_file(f)]

    def num_input_examples(self, split: str) -> int:
        if split not in self._counts:
            self._counts[split] = len(self.read_records(split))
        return self._counts[split]

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None) -> tf.data.Dataset:
        files = self.list_shards(split)
        if shuffle:
            random.Random(seed).shuffle(files)
        ds = self._to_dataset(self.read_records(split, files))
        if shard_info and shard_info.num_shards > 1:
            ds = ds.shard(shard_info.num_shards, shard_info.index)
        return ds

    def __repr__(self):
        return f"{type(self).__name__}({self._patterns})"


class QaFileDataSource(RecordFileDataSource):
    """QA records from `.jsonl`/`.tsv` files (see `read_qa_file`), one file pattern per split."""

    def __init__(self, split_to_filepattern: Mapping[str, str | Sequence[str]], format: str):
        unifiedqa.check_format(format)
        self._format = format
        super().__init__(split_to_filepattern, functools.partial(read_qa_file, format=format), records_to_dataset)

    def __repr__(self):
        return f"{type(self).__name__}({self._patterns}, format={self._format!r})"


# ------------------------------------------------------------------ text-to-text pairs

TEXT_TO_TEXT_FORMATS = ("tsv", "jsonl")
TEXT_TO_TEXT_FIELDS = ("inputs", "targets")
TSV_HEADER = "\t".join(TEXT_TO_TEXT_FIELDS)
_TEXT_TO_TEXT_EXAMPLES = {
    "tsv": "the header row 'inputs<TAB>targets', then one example per line",
    "jsonl": 'one JSON object per line, e.g. {"inputs": "translate: Good night", "targets": "Gute Nacht"}',
}


class TextToTextFileError(ValueError):
    """A file that cannot be read as `inputs`/`targets` text pairs (names the file and line)."""


def check_text_to_text_format(format: str) -> None:
    """Raises ValueError for a format other than `TEXT_TO_TEXT_FORMATS`."""
    if format not in TEXT_TO_TEXT_FORMATS:
        raise ValueError(f"Unknown text-to-text file format {format!r}; use one of {list(TEXT_TO_TEXT_FORMATS)}.")


def read_text_to_text_file(path: str, format: str) -> list[dict[str, str]]:
    """Reads and checks one file of `{"inputs": str, "targets": str}` pairs (`format` "tsv" or "jsonl").

    TSV: the header row `inputs<TAB>targets`, then one example per line with exactly one tab (a text holds
    no tab or newline; use JSONL for those). JSONL: one object per line with string `inputs` and `targets`
    (other fields are ignored). Blank lines are skipped; a line that breaks these rules, an empty text or
    a file without examples is a `TextToTextFileError` naming the file and line.
    """
    check_text_to_text_format(format)
    lines = storage.path(path).read_text(encoding="utf-8").split("\n")  # not splitlines(): a text may hold U+2028
    numbered = [(number, line.removesuffix("\r")) for number, line in enumerate(lines, start=1) if line.strip()]
    pairs = _tsv_pairs(path, numbered) if format == "tsv" else [_jsonl_pair(path, n, line) for n, line in numbered]
    if not pairs:
        found = "only the header row" if numbered else "the file is empty"
        raise TextToTextFileError(f"{path}: no examples ({found}); a .{format} file needs {_TEXT_TO_TEXT_EXAMPLES[format]}.")
    return pairs


def _tsv_pairs(path: str, numbered: Sequence[tuple[int, str]]) -> list[dict[str, str]]:
    if not numbered:
        return []
    header_number, header = numbered[0]
    if header.strip() != TSV_HEADER:
        raise TextToTextFileError(
            f"{path}, line {header_number}: the first row must be the header 'inputs<TAB>targets', got {header[:80]!r}.")
    pairs = []
    for number, line in numbered[1:]:
        cells = line.split("\t")
        if len(cells) != 2:
            problem = "the targets column is missing" if len(cells) == 1 else "a text may not contain a tab (use .jsonl)"
            raise TextToTextFileError(
                f"{path}, line {number}: {len(cells)} tab-separated cells, expected 2 (inputs<TAB>targets); {problem}.")
        pairs.append(_check_pair(path, number, dict(zip(TEXT_TO_TEXT_FIELDS, cells))))
    return pairs


def _jsonl_pair(path: str, number: int, line: str) -> dict[str, str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise TextToTextFileError(f"{path}, line {number}: not valid JSON ({e.msg}): {line[:80]!r}.") from None
    if not isinstance(row, dict):
        raise TextToTextFileError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}.")
    for field in TEXT_TO_TEXT_FIELDS:
        if field not in row:
            raise TextToTextFileError(f"{path}, line {number}: no '{field}' field (fields present: {sorted(row)}).")
        if not isinstance(row[field], str):
            raise TextToTextFileError(
                f"{path}, line {number}: '{field}' must be a string, got {type(row[field]).__name__}.")
    return _check_pair(path, number, {field: row[field] for field in TEXT_TO_TEXT_FIELDS})


def _check_pair(path: str, number: int, pair: dict[str, str]) -> dict[str, str]:
    for field, value in pair.items():
        if not value.strip():
            raise TextToTextFileError(f"{path}, line {number}: the '{field}' text is empty.")
    return pair


def pairs_to_dataset(pairs: Sequence[Mapping[str, str]]) -> tf.data.Dataset:
    """A dataset of `{"inputs": string, "targets": string}` examples."""
    return tf.data.Dataset.from_tensor_slices(
        {field: tf.constant([p[field] for p in pairs], dtype=tf.string, shape=[len(pairs)]) for field in TEXT_TO_TEXT_FIELDS})


class TextToTextFileDataSource(RecordFileDataSource):
    """`inputs`/`targets` pairs from `.tsv` or `.jsonl` files (see `read_text_to_text_file`), one pattern per split."""

    def __init__(self, split_to_filepattern: Mapping[str, str | Sequence[str]], format: str):
        check_text_to_text_format(format)
        self._format = format
        super().__init__(split_to_filepattern, functools.partial(read_text_to_text_file, format=format),
                         pairs_to_dataset)

    def __repr__(self):
        return f"{type(self).__name__}({self._patterns}, format={self._format!r})"
