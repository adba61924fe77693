"""BERT inputs for sequence classification and token tagging as SeqIO preprocessors.

  classification: text fields + label -> `inputs` = `[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` (pairs
                  truncated longest first to fit), `targets` = `[label id]`
  tagging:        words + one tag name each -> word pieces; `targets` holds one tag id per input
                  token: 1..n at a word's first piece, 0 at [CLS], [SEP] and later pieces

[CLS]/[SEP] come from `special_tokens.bert_special_ids`. The converters that turn these task
features into model features are `ClassificationFeatureConverter` and `TaggingFeatureConverter`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

from t5x_lite.data import special_tokens


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


def select_fields(dataset: tf.data.Dataset, text_keys: Sequence[str], label_key: str = "label") -> tf.data.Dataset:
    """Keeps only the text fields and the label of each example (e.g. of a TFDS GLUE record)."""
    return dataset.map(lambda ex: {**{k: ex[k] for k in text_keys}, label_key: ex[label_key]},
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
    *,
    tag_names: Sequence[str],
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
