"""Sequence classification and token tagging tasks for encoder-only (BERT) fine-tuning.

Importing this module (or `t5x_lite`) registers (bundled vocabulary; [CLS]/[SEP] from
`special_tokens.bert_special_ids`):

| task | data | labels | metrics |
| --- | --- | --- | --- |
| `bundled_cls_single` | `bundled/cls/author_*.tsv`: who wrote the excerpt | `shakespeare`, `milton` | accuracy, macro F1 |
| `bundled_cls_pair` | `bundled/cls/next_*.tsv`: does sentence 2 follow sentence 1? | `random`, `next` | accuracy, macro F1 |
| `bundled_tagging` | `bundled/cls/speakers_*.tsv`: speaker labels and names | `O`, `B-SPK`, `I-SPK`, `B-PER` | entity F1, token accuracy |
| `glue_sst2` | TFDS `glue/sst2:2.0.0` | `negative`, `positive` | accuracy, macro F1 |
| `glue_mnli` | TFDS `glue/mnli:2.0.0` (`validation` = matched, `validation_mismatched`) | `entailment`, `neutral`, `contradiction` | accuracy, macro F1 |
| `glue_rte` | TFDS `glue/rte:2.0.0` | `entailment`, `not_entailment` | accuracy, macro F1 |

(see `bundled/cls/README.md` for how the bundled sets were built). The GLUE tasks read data
prepared beforehand (`--tfds_data_dir`); absent data fails at once, offline.

Task features: `inputs` = `[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` (pairs truncated longest
first to fit), and `targets` = `[label id]` (classification, `TASK_FEATURE_LENGTHS` targets 1) or
one tag id per input token (tagging, targets length = inputs length; tag ids are 1..n and 0 marks
[CLS], [SEP], padding and every word piece after a word's first, which carry no label).

seqio has no feature converter for either layout (its `EncoderFeatureConverter` weights the loss
at [MASK] inputs and has no labels or token types), hence `ClassificationFeatureConverter` and
`TaggingFeatureConverter` below. Your own TSV files: `register_classification_task` and
`register_tagging_task`.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import seqio
import tensorflow as tf

from t5x_lite.data import special_tokens, vocab
from t5x_lite.data.tasks import PreparedTfdsDataSource

CLS_DIR = pathlib.Path(__file__).parent / "bundled" / "cls"
AUTHOR_LABELS = ("shakespeare", "milton")
NEXT_LABELS = ("random", "next")
SPEAKER_TAGS = ("O", "B-SPK", "I-SPK", "B-PER")
GLUE_TFDS = {
    "glue_sst2": ("glue/sst2:2.0.0", ("sentence",), ("negative", "positive")),
    "glue_mnli": ("glue/mnli:2.0.0", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction")),
    "glue_rte": ("glue/rte:2.0.0", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
}
# seqio split name -> TFDS split (the GLUE test splits have no labels and are not registered).
GLUE_SPLITS = {
    "glue_sst2": {"train": "train", "validation": "validation"},
    "glue_mnli": {"train": "train", "validation": "validation_matched", "validation_mismatched": "validation_mismatched"},
    "glue_rte": {"train": "train", "validation": "validation"},
}

_INT = seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)


# ------------------------------------------------------------------ feature converters


class ClassificationFeatureConverter(seqio.FeatureConverter):
    """One labelled sequence per row: `inputs` -> `encoder_input_tokens`, token types (0 up to and
    including the first [SEP], 1 after it) -> `encoder_token_type_ids`, `targets` -> `labels` [1].

    Rows are never packed, whatever `pack` says (the trainer passes `pack=True`): the pooler reads
    one [CLS] at position 0 of every row. `sep_id` defaults to the [SEP] of `vocab.get_vocabulary()`.
    """

    TASK_FEATURES: ClassVar[dict[str, seqio.FeatureConverter.FeatureSpec]] = {"inputs": _INT, "targets": _INT}
    MODEL_FEATURES: ClassVar[dict[str, seqio.FeatureConverter.FeatureSpec]] = {"encoder_input_tokens": _INT, "encoder_token_type_ids": _INT, "labels": _INT}
    PACKING_FEATURE_DTYPES: ClassVar[dict[str, tf.dtypes.DType]] = {}

    def __init__(self, sep_id: int | None = None, **kwargs):
        kwargs["pack"] = False
        super().__init__(**kwargs)
        self.sep_id = special_tokens.bert_special_ids(vocab.get_vocabulary()).sep if sep_id is None else sep_id

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        if task_feature_lengths["targets"] != 1:
            raise ValueError(
                f"Classification targets hold one label id, so TASK_FEATURE_LENGTHS needs 'targets': 1; got "
                f"{dict(task_feature_lengths)}."
            )
        ds = self._pack_or_pad(ds, task_feature_lengths)

        def convert(features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            tokens = features["inputs"]
            seps_before = tf.cumsum(tf.cast(tf.equal(tokens, self.sep_id), tf.int32), exclusive=True)
            token_types = tf.minimum(seps_before, 1) * tf.cast(tokens > 0, tf.int32)
            return {"encoder_input_tokens": tokens, "encoder_token_type_ids": token_types, "labels": features["targets"]}

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        length = task_feature_lengths["inputs"]
        return {"encoder_input_tokens": length, "encoder_token_type_ids": length, "labels": 1}


class TaggingFeatureConverter(seqio.FeatureConverter):
    """Aligned tokens and tags: `inputs` -> `encoder_input_tokens`, `targets` (tag ids) ->
    `encoder_target_tokens`, loss weight 1 where the tag id is > 0; packs like seqio's converters
    (`encoder_segment_ids`, `encoder_positions`)."""

    TASK_FEATURES: ClassVar[dict[str, seqio.FeatureConverter.FeatureSpec]] = {"inputs": _INT, "targets": _INT}
    MODEL_FEATURES: ClassVar[dict[str, seqio.FeatureConverter.FeatureSpec]] = {"encoder_input_tokens": _INT, "encoder_target_tokens": _INT, "encoder_loss_weights": _INT}
    PACKING_FEATURE_DTYPES: ClassVar[dict[str, tf.dtypes.DType]] = {"encoder_segment_ids": tf.int32, "encoder_positions": tf.int32}

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        if task_feature_lengths["targets"] != task_feature_lengths["inputs"]:
            length = task_feature_lengths["inputs"]
            raise ValueError(
                f"Tagging targets hold one tag per input token, so their lengths must be equal; got "
                f"{dict(task_feature_lengths)}. Set TASK_FEATURE_LENGTHS={{'inputs': {length}, 'targets': {length}}}."
            )
        # seqio's packing keeps only as many leading tokens of a feature as it has nonzero ones (it
        # takes 0 for trailing padding), so the tag ids travel shifted by one: no zero inside a row.
        ds = ds.map(lambda ex: {"inputs": ex["inputs"], "targets": ex["targets"] + 1})
        ds = self._pack_or_pad(ds, task_feature_lengths)

        def convert(features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            tags = tf.maximum(features["targets"] - 1, 0)
            converted = {
                "encoder_input_tokens": features["inputs"],
                "encoder_target_tokens": tags,
                "encoder_loss_weights": tf.cast(tags > 0, tf.int32),
            }
            if self.pack:
                converted["encoder_segment_ids"] = features["inputs_segment_ids"]
                converted["encoder_positions"] = features["inputs_positions"]
            return converted

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        names = list(self.MODEL_FEATURES) + (list(self.PACKING_FEATURE_DTYPES) if self.pack else [])
        return {name: task_feature_lengths["inputs"] for name in names}


# ------------------------------------------------------------------ preprocessors


def parse_tsv_lines(dataset: tf.data.Dataset, columns: Sequence[str]) -> tf.data.Dataset:
    """Lines `a<TAB>b<TAB>...` (from `seqio.TextLineDataSource`) -> `{column: string}`."""

    def parse(line: tf.Tensor) -> dict[str, tf.Tensor]:
        fields = tf.strings.split(line, "\t")
        check = tf.debugging.assert_equal(
            tf.size(fields), len(columns), message=f"a TSV line does not have the {len(columns)} columns {list(columns)}"
        )
        with tf.control_dependencies([check]):
            return {name: fields[i] for i, name in enumerate(columns)}

    return dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE)


def _name_to_id(names: tf.Tensor, known: Sequence[str], what: str, offset: int = 0) -> tf.Tensor:
    """Label/tag names -> ids (index in `known` + offset); an unknown name fails the pipeline."""
    matches = tf.equal(tf.expand_dims(names, -1), tf.constant(list(known)))
    check = tf.debugging.assert_equal(
        tf.reduce_all(tf.reduce_any(matches, axis=-1)), True, message=f"a {what} is not one of {list(known)}"
    )
    with tf.control_dependencies([check]):
        return tf.cast(tf.argmax(tf.cast(matches, tf.int32), axis=-1), tf.int32) + offset


def label_names_to_ids(dataset: tf.data.Dataset, label_names: Sequence[str], key: str = "label") -> tf.data.Dataset:
    """Replaces the string label in `key` by its index in `label_names`."""
    return dataset.map(lambda ex: {**ex, key: _name_to_id(ex[key], label_names, "label")},
                       num_parallel_calls=tf.data.AUTOTUNE)


def truncate_pair(a: tf.Tensor, b: tf.Tensor, budget: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Longest-first truncation (BERT's): drop tokens from the end of the longer sequence until the
    two fit in `budget` tokens together; two long ones end with ceil/floor of half the budget."""
    la, lb = tf.size(a), tf.size(b)
    half_low, half_high = budget // 2, budget - budget // 2
    keep_a = tf.where(la + lb <= budget, la, tf.where(la <= half_low, la, tf.where(lb <= half_low, budget - lb, half_high)))
    keep_b = tf.minimum(lb, budget - keep_a)
    return a[:keep_a], b[:keep_b]


def to_bert_inputs(
    dataset: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature],
    sequence_length: Mapping[str, int] | None = None,
    text_keys: Sequence[str] = ("sentence",),
    label_key: str = "label",
) -> tf.data.Dataset:
    """Text fields + an int label -> `inputs` `[CLS] A [SEP] (B [SEP])` and `targets` `[label]`.

    Truncates to `sequence_length['inputs']` keeping the special tokens (pairs longest first).
    `inputs_pretokenized` keeps the text (sentences joined by " [SEP] ").
    """
    if len(text_keys) not in (1, 2):
        raise ValueError(f"to_bert_inputs takes one or two text fields, got {list(text_keys)}.")
    vocabulary = output_features["inputs"].vocabulary
    special = special_tokens.bert_special_ids(vocabulary)
    length = (sequence_length or {}).get("inputs")
    budget = None if length is None else length - len(text_keys) - 1
    if budget is not None and budget < len(text_keys):
        raise ValueError(f"inputs length {length} leaves no room for text besides [CLS]/[SEP]; use at least 8.")

    def convert(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        pieces = [tf.cast(vocabulary.encode_tf(ex[k]), tf.int32) for k in text_keys]
        if budget is not None:
            pieces = [pieces[0][:budget]] if len(pieces) == 1 else list(truncate_pair(*pieces, budget))
        cls, sep = tf.constant([special.cls]), tf.constant([special.sep])
        parts = [cls, pieces[0], sep] + ([pieces[1], sep] if len(pieces) == 2 else [])
        return {
            "inputs": tf.concat(parts, axis=0),
            "targets": tf.reshape(tf.cast(ex[label_key], tf.int32), [1]),
            "inputs_pretokenized": tf.strings.reduce_join([ex[k] for k in text_keys], separator=" [SEP] "),
        }

    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def to_tagging_inputs(
    dataset: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature],
    sequence_length: Mapping[str, int] | None = None,
    tag_names: Sequence[str] = SPEAKER_TAGS,
) -> tf.data.Dataset:
    """`tokens`/`tags` (space-separated words and one tag name each) -> word pieces with tags.

    Each word is tokenized on its own; its first piece carries the tag id (index in `tag_names` + 1),
    later pieces and [CLS]/[SEP] carry 0. Truncates to `sequence_length['inputs']` keeping [SEP].
    """
    vocabulary = output_features["inputs"].vocabulary
    special = special_tokens.bert_special_ids(vocabulary)
    length = (sequence_length or {}).get("inputs")

    def convert(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        words, names = tf.strings.split(ex["tokens"]), tf.strings.split(ex["tags"])
        check = tf.debugging.assert_equal(tf.size(words), tf.size(names), message="tokens and tags differ in count")
        with tf.control_dependencies([check]):
            tag_ids = _name_to_id(names, tag_names, "tag", offset=1)
        pieces = tf.cast(vocabulary.encode_tf(words), tf.int32)  # ragged [words, pieces]
        flat = pieces.flat_values
        starts = pieces.row_splits[:-1]
        has_pieces = pieces.row_lengths() > 0
        piece_tags = tf.scatter_nd(
            tf.boolean_mask(starts, has_pieces)[:, None], tf.boolean_mask(tag_ids, has_pieces), tf.shape(flat, tf.int64)
        )
        if length is not None:
            flat, piece_tags = flat[: length - 2], piece_tags[: length - 2]
        zero = tf.zeros([1], tf.int32)
        return {
            "inputs": tf.concat([[special.cls], flat, [special.sep]], axis=0),
            "targets": tf.concat([zero, piece_tags, zero], axis=0),
            "inputs_pretokenized": ex["tokens"],
        }

    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


# ------------------------------------------------------------------ postprocessors and metrics


def postprocess_label(output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False) -> int:
    """A decoded `[label id]` (target or prediction) -> the int label id."""
    del example, is_target
    return int(np.asarray(output).reshape(-1)[0])


def postprocess_tags(output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False) -> list[int]:
    """Tag ids at the labelled positions (those whose gold tag id is > 0) of the example."""
    tags = np.asarray(output).reshape(-1)
    if example is None:
        return [int(t) for t in tags if t > 0]
    labelled = np.flatnonzero(np.asarray(example["targets"]).reshape(-1) > 0)
    return [int(tags[i]) if i < len(tags) else 0 for i in labelled]


def classification_metrics(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-averaged F1 over the classes present in targets or predictions (percent)."""
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions.")
    t, p = np.asarray(targets), np.asarray(predictions)
    f1s = []
    for label in np.union1d(t, p):
        tp = np.sum((p == label) & (t == label))
        denominator = np.sum(p == label) + np.sum(t == label)
        f1s.append(2 * tp / denominator if denominator else 0.0)
    return {"accuracy": 100.0 * float(np.mean(t == p)) if len(t) else 0.0,
            "macro_f1": 100.0 * float(np.mean(f1s)) if f1s else 0.0}


def bio_spans(tags: Sequence[str]) -> set[tuple[int, int, str]]:
    """(start, end, type) of the entities in a BIO tag sequence; an I-X without its B-X starts one."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        if start is not None and not (prefix == "I" and label == kind):
            spans.add((start, i, kind))
            start = None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, label
    return spans


def tagging_metrics_fn(tag_names: Sequence[str]) -> Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], dict]:
    """A seqio metric: entity-level precision/recall/F1 (exact spans, BIO) and token accuracy (percent)."""

    def tagging_metrics(targets: Sequence[Sequence[int]], predictions: Sequence[Sequence[int]]) -> dict[str, float]:
        def names(ids):
            return [tag_names[i - 1] if 1 <= i <= len(tag_names) else "O" for i in ids]

        found = correct = gold = tokens = right = 0
        for target, prediction in zip(targets, predictions, strict=True):
            gold_spans, predicted_spans = bio_spans(names(target)), bio_spans(names(prediction))
            gold, found, correct = gold + len(gold_spans), found + len(predicted_spans), correct + len(gold_spans & predicted_spans)
            tokens += len(target)
            right += sum(a == b for a, b in zip(target, prediction))
        precision = correct / found if found else 0.0
        recall = correct / gold if gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"f1": 100 * f1, "precision": 100 * precision, "recall": 100 * recall,
                "accuracy": 100 * right / tokens if tokens else 0.0}

    return tagging_metrics


# ------------------------------------------------------------------ registering tasks


class LabelVocabulary(seqio.PassThroughVocabulary):
    """Label or tag ids that pass through unchanged (as metrics want them) and know their names,
    which `t5x_lite.infer` writes. `first_id` is the id of `names[0]` (tags start at 1: 0 means
    "no label")."""

    def __init__(self, names: Sequence[str], first_id: int = 0):
        super().__init__(size=first_id + len(names))
        self.names = tuple(names)
        self.first_id = first_id

    def label_name(self, label_id: int) -> str:
        """The name of one label or tag id; a clear error for an id the task does not define."""
        index = int(label_id) - self.first_id
        if not 0 <= index < len(self.names):
            raise ValueError(
                f"Label id {label_id} is not one of this task's ids {self.first_id}..{self.size - 1} "
                f"({', '.join(self.names)}); does the model's BertConfig.num_labels ({len(self.names)} here) match the task?"
            )
        return self.names[index]

    def __str__(self) -> str:
        return f"LabelVocabulary({', '.join(self.names)}; first id {self.first_id})"


def classification_output_features(
    label_names: Sequence[str], vocabulary: seqio.Vocabulary | None = None, first_id: int = 0
) -> dict[str, seqio.Feature]:
    """`inputs` (word pieces, no EOS: BERT ends with [SEP]) and `targets` (label or tag ids, named)."""
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary or vocab.get_vocabulary(), add_eos=False),
        "targets": seqio.Feature(vocabulary=LabelVocabulary(label_names, first_id), add_eos=False),
    }


def _check_files(name: str, split_to_filepattern: Mapping[str, str | Sequence[str]]) -> None:
    for split, pattern in split_to_filepattern.items():
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        if not any(tf.io.gfile.glob(p) for p in patterns):
            raise FileNotFoundError(f"Task {name!r}: no file matches {pattern!r} for split {split!r}.")


def register_classification_task(
    name: str,
    split_to_filepattern: Mapping[str, str | Sequence[str]],
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
    _check_files(name, split_to_filepattern)
    columns = ("label", "sentence1", "sentence2") if pair else ("label", "sentence")
    if overwrite:
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=seqio.TextLineDataSource(split_to_filepattern=dict(split_to_filepattern), skip_header_lines=1),
        preprocessors=[
            functools.partial(parse_tsv_lines, columns=columns),
            functools.partial(label_names_to_ids, label_names=tuple(label_names)),
            functools.partial(to_bert_inputs, text_keys=columns[1:]),
        ],
        output_features=classification_output_features(label_names, vocabulary),
        postprocess_fn=postprocess_label,
        metric_fns=[classification_metrics],
    )


def register_tagging_task(
    name: str,
    split_to_filepattern: Mapping[str, str | Sequence[str]],
    tag_names: Sequence[str],
    vocabulary: seqio.Vocabulary | None = None,
    overwrite: bool = False,
) -> seqio.Task:
    """Registers a tagging task over TSV files with a header row and columns `tokens<TAB>tags`
    (space-separated words, one tag name from `tag_names` per word; BIO names like `B-PER` give
    entity F1). Fine-tune with `EncoderTaggingModel`, `BertConfig.num_labels = len(tag_names)`,
    `TASK_FEATURE_LENGTHS = {'inputs': L, 'targets': L}`.
    """
    _check_files(name, split_to_filepattern)
    if overwrite:
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=seqio.TextLineDataSource(split_to_filepattern=dict(split_to_filepattern), skip_header_lines=1),
        preprocessors=[
            functools.partial(parse_tsv_lines, columns=("tokens", "tags")),
            functools.partial(to_tagging_inputs, tag_names=tuple(tag_names)),
        ],
        output_features=classification_output_features(tag_names, vocabulary, first_id=1),
        postprocess_fn=postprocess_tags,
        metric_fns=[tagging_metrics_fn(tuple(tag_names))],
    )


def _glue_record(dataset: tf.data.Dataset, text_keys: Sequence[str]) -> tf.data.Dataset:
    return dataset.map(lambda ex: {**{k: ex[k] for k in text_keys}, "label": ex["label"]},
                       num_parallel_calls=tf.data.AUTOTUNE)


def _register_defaults() -> None:
    names = set(seqio.TaskRegistry.names())
    bundled = {
        "bundled_cls_single": ("author", AUTHOR_LABELS, False),
        "bundled_cls_pair": ("next", NEXT_LABELS, True),
    }
    for name, (stem, labels, pair) in bundled.items():
        if name not in names:
            files = {split: str(CLS_DIR / f"{stem}_{split}.tsv") for split in ("train", "validation")}
            register_classification_task(name, files, labels, pair=pair)
    if "bundled_tagging" not in names:
        files = {split: str(CLS_DIR / f"speakers_{split}.tsv") for split in ("train", "validation")}
        register_tagging_task("bundled_tagging", files, SPEAKER_TAGS)
    for name, (tfds_name, text_keys, labels) in GLUE_TFDS.items():
        if name not in names:
            seqio.TaskRegistry.add(
                name,
                source=PreparedTfdsDataSource(tfds_name=tfds_name, splits=GLUE_SPLITS[name]),
                preprocessors=[
                    functools.partial(_glue_record, text_keys=text_keys),
                    functools.partial(to_bert_inputs, text_keys=text_keys),
                ],
                output_features=classification_output_features(labels),
                postprocess_fn=postprocess_label,
                metric_fns=[classification_metrics],
            )


_register_defaults()
