"""`MaskedLMFeatureConverter`: BERT MLM task features -> encoder model features.

seqio's `EncoderFeatureConverter` puts loss weight only where `inputs == mask_id`, which drops
BERT's 10% random-token and 10% unchanged positions from the loss (their inputs are not [MASK]).
The MLM tasks (`t5x_lite.data.mlm`) instead mark every chosen position by a nonzero `targets`
(the original id there, 0 elsewhere), so this converter weights the loss by `targets > 0`.

  task features  inputs, targets [, token_type_ids, next_sentence_label]
  model features encoder_input_tokens, encoder_target_tokens, encoder_loss_weights
                 [+ encoder_segment_ids, encoder_positions when packed]
                 [+ encoder_token_type_ids, next_sentence_labels ([1] per example) with pairs]

Sentence-pair examples (with `next_sentence_label`) are never packed: each is already a full
[CLS] A [SEP] B [SEP] sequence and the NSP head reads one [CLS] per row; they are padded, and
carry no segment ids or positions, whatever `pack` says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import seqio
import tensorflow as tf

_INT = seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
_SCALAR = seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=0)


def _check_aligned(task_feature_lengths: Mapping[str, int]) -> int:
    length = task_feature_lengths["inputs"]
    if task_feature_lengths["targets"] != length:
        raise ValueError(
            f"MLM inputs and targets align position by position, so their lengths must be equal; got "
            f"{dict(task_feature_lengths)}. Set TASK_FEATURE_LENGTHS={{'inputs': {length}, 'targets': {length}}}."
        )
    return length


def _model_features(features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {
        "encoder_input_tokens": features["inputs"],
        "encoder_target_tokens": features["targets"],
        "encoder_loss_weights": tf.cast(features["targets"] > 0, tf.int32),
    }


class MaskedLMFeatureConverter(seqio.FeatureConverter):
    """BERT MLM: loss at every chosen position (`targets > 0`), not only at [MASK] inputs.

    Takes the usual constructor arguments (`pack`, `use_custom_packing_ops`, ...); see the module
    docstring for the features.
    """

    TASK_FEATURES: ClassVar = {"inputs": _INT, "targets": _INT}
    MODEL_FEATURES: ClassVar = {
        "encoder_input_tokens": _INT,
        "encoder_target_tokens": _INT,
        "encoder_loss_weights": _INT,
    }
    PACKING_FEATURE_DTYPES: ClassVar = {"encoder_segment_ids": tf.int32, "encoder_positions": tf.int32}

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        # Delegating keeps seqio's validations: the pair converter runs them on its own features.
        if "next_sentence_label" in ds.element_spec:
            length = _check_aligned(task_feature_lengths)
            pairs = _SentencePairMLMFeatureConverter(pack=False, apply_length_check=self._apply_length_check)
            return pairs(ds, {**task_feature_lengths, "token_type_ids": length, "next_sentence_label": 1})
        return super().__call__(ds, task_feature_lengths)

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        _check_aligned(task_feature_lengths)

        # seqio's packing takes a feature's length to be its count of nonzero ids, so the zeros
        # inside `targets` would cut it short: it is packed shifted by one, then shifted back.
        def convert(features):
            converted = _model_features({**features, "targets": tf.maximum(features["targets"] - 1, 0)})
            if self.pack:
                converted["encoder_segment_ids"] = features["inputs_segment_ids"]
                converted["encoder_positions"] = features["inputs_positions"]
            return converted

        ds = ds.map(lambda ex: {"inputs": ex["inputs"], "targets": ex["targets"] + 1})
        ds = self._pack_or_pad(ds, task_feature_lengths)
        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        length = task_feature_lengths["inputs"]
        names = list(self.MODEL_FEATURES) + (list(self.PACKING_FEATURE_DTYPES) if self.pack else [])
        return {name: length for name in names}


class _SentencePairMLMFeatureConverter(seqio.FeatureConverter):
    """MLM with next-sentence pairs, unpacked; built by `MaskedLMFeatureConverter` when it sees pairs."""

    TASK_FEATURES: ClassVar = {"inputs": _INT, "targets": _INT, "token_type_ids": _INT, "next_sentence_label": _SCALAR}
    MODEL_FEATURES: ClassVar = {
        **MaskedLMFeatureConverter.MODEL_FEATURES,
        "encoder_token_type_ids": _INT,
        "next_sentence_labels": _INT,
    }
    PACKING_FEATURE_DTYPES: ClassVar = {}

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        sequence_lengths = {k: task_feature_lengths[k] for k in ("inputs", "targets", "token_type_ids")}
        ds = seqio.utils.trim_and_pad_dataset(ds, sequence_lengths)

        def convert(features):
            return {
                **_model_features(features),
                "encoder_token_type_ids": features["token_type_ids"],
                # A length-1 vector, not a scalar: every batch feature is sharded as [batch, length].
                "next_sentence_labels": tf.reshape(features["next_sentence_label"], [1]),
            }

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        length = task_feature_lengths["inputs"]
        return {name: length for name in self.MODEL_FEATURES} | {"next_sentence_labels": 1}
