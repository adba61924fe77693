"""The feature converters seqio lacks: task features -> model features for the encoder-only models.

seqio's own converters (`EncDecFeatureConverter`, `DecoderFeatureConverter`, ...) serve the T5, BART,
GPT and prefix-LM tasks; `MaskedLMFeatureConverter`, `ClassificationFeatureConverter` and
`TaggingFeatureConverter` serve BERT's; `PermutationLMFeatureConverter` serves XLNet's permutation LM;
`RankedEncDecFeatureConverter` carries the objective space's reading order (R) to T5's encoder.

**MLM.** seqio's `EncoderFeatureConverter` puts loss weight only where `inputs == mask_id`, which drops
BERT's 10% random-token and 10% unchanged positions from the loss (their inputs are not [MASK]).
The MLM tasks (`preprocessors.mlm`) instead mark every chosen position by a nonzero `targets`
(the original id there, 0 elsewhere), so `MaskedLMFeatureConverter` weights the loss by `targets > 0`.

  task features  inputs, targets [, token_type_ids, next_sentence_label]
  model features encoder_input_tokens, encoder_target_tokens, encoder_loss_weights
                 [+ encoder_segment_ids, encoder_positions when packed]
                 [+ encoder_token_type_ids, next_sentence_labels ([1] per example) with pairs]

Sentence-pair examples (with `next_sentence_label`) are never packed: each is already a full
[CLS] A [SEP] B [SEP] sequence and the NSP head reads one [CLS] per row; they are padded, and
carry no segment ids or positions, whatever `pack` says.

**Classification and tagging** (task features from `preprocessors.classification`): seqio has no
converter for either layout (its `EncoderFeatureConverter` has no labels or token types).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import seqio
import tensorflow as tf

from t5x_lite.data import special_tokens, vocab

_INT = seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
_SCALAR = seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=0)


def _check_aligned(task_feature_lengths: Mapping[str, int], what: str) -> int:
    length = task_feature_lengths["inputs"]
    if task_feature_lengths["targets"] != length:
        raise ValueError(
            f"{what}, so their lengths must be equal; got {dict(task_feature_lengths)}. "
            f"Set TASK_FEATURE_LENGTHS={{'inputs': {length}, 'targets': {length}}}."
        )
    return length


def _model_features(features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {
        "encoder_input_tokens": features["inputs"],
        "encoder_target_tokens": features["targets"],
        "encoder_loss_weights": tf.cast(features["targets"] > 0, tf.int32),
    }


class _AlignedTargetsFeatureConverter(seqio.FeatureConverter):
    """One target id per input token, 0 where no loss is taken; packs like seqio's converters.

    Subclasses name what the targets are in `ALIGNMENT` (for the error on unequal lengths).
    """

    ALIGNMENT: ClassVar[str]
    TASK_FEATURES: ClassVar = {"inputs": _INT, "targets": _INT}
    MODEL_FEATURES: ClassVar = {
        "encoder_input_tokens": _INT,
        "encoder_target_tokens": _INT,
        "encoder_loss_weights": _INT,
    }
    PACKING_FEATURE_DTYPES: ClassVar = {"encoder_segment_ids": tf.int32, "encoder_positions": tf.int32}

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        _check_aligned(task_feature_lengths, self.ALIGNMENT)

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


class MaskedLMFeatureConverter(_AlignedTargetsFeatureConverter):
    """BERT MLM: loss at every chosen position (`targets > 0`), not only at [MASK] inputs.

    Takes the usual constructor arguments (`pack`, `use_custom_packing_ops`, ...); see the module
    docstring for the features.
    """

    ALIGNMENT = "MLM inputs and targets align position by position"

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        # Delegating keeps seqio's validations: the pair converter runs them on its own features.
        if "next_sentence_label" in ds.element_spec:
            length = _check_aligned(task_feature_lengths, self.ALIGNMENT)
            pairs = _SentencePairMLMFeatureConverter(pack=False, apply_length_check=self._apply_length_check)
            return pairs(ds, {**task_feature_lengths, "token_type_ids": length, "next_sentence_label": 1})
        return super().__call__(ds, task_feature_lengths)


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


class TaggingFeatureConverter(_AlignedTargetsFeatureConverter):
    """Aligned tokens and tags: `inputs` -> `encoder_input_tokens`, `targets` (tag ids) ->
    `encoder_target_tokens`, loss weight 1 where the tag id is > 0; packs like seqio's converters
    (`encoder_segment_ids`, `encoder_positions`)."""

    ALIGNMENT = "Tagging targets hold one tag per input token"


class PermutationLMFeatureConverter(seqio.FeatureConverter):
    """XLNet's permutation LM (`preprocessors.permutation_lm`): the tokens are both the input and the
    targets (no shift: each position predicts its own token from the tokens before it in the order),
    with the order's ranks and loss weight 1 at the predicted positions; packs like seqio's converters.

      task features  targets (+ factorization_rank, predicted, made alongside it)
      model features decoder_input_tokens, decoder_target_tokens, decoder_loss_weights,
                     decoder_factorization_rank [+ decoder_segment_ids, decoder_positions when packed]
    """

    TASK_FEATURES: ClassVar = {"targets": _INT}
    MODEL_FEATURES: ClassVar = {
        "decoder_input_tokens": _INT,
        "decoder_target_tokens": _INT,
        "decoder_loss_weights": _INT,
        "decoder_factorization_rank": _INT,
    }
    PACKING_FEATURE_DTYPES: ClassVar = {"decoder_segment_ids": tf.int32, "decoder_positions": tf.int32}
    _ORDER_FEATURES = ("factorization_rank", "predicted")

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        missing = [k for k in self._ORDER_FEATURES if k not in ds.element_spec]
        if missing:
            raise ValueError(
                f"PermutationLMFeatureConverter needs the features {missing} of a permutation-LM task "
                "(preprocessors.permutation_lm, e.g. bundled_permutation_lm)."
            )
        length = task_feature_lengths["targets"]

        # Rank 0 and weight 0 are real values: they are packed shifted by one (padding stays 0), then shifted back.
        def convert(features):
            converted = {
                "decoder_input_tokens": features["targets"],
                "decoder_target_tokens": features["targets"],
                "decoder_loss_weights": tf.maximum(features["predicted"] - 1, 0),
                "decoder_factorization_rank": tf.maximum(features["factorization_rank"] - 1, 0),
            }
            if self.pack:
                converted["decoder_segment_ids"] = features["targets_segment_ids"]
                converted["decoder_positions"] = features["targets_positions"]
            return converted

        ds = ds.map(lambda ex: {"targets": ex["targets"], **{k: ex[k] + 1 for k in self._ORDER_FEATURES}})
        ds = self._pack_or_pad(ds, {"targets": length, **{k: length for k in self._ORDER_FEATURES}})
        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        length = task_feature_lengths["targets"]
        names = list(self.MODEL_FEATURES) + (list(self.PACKING_FEATURE_DTYPES) if self.pack else [])
        return {name: length for name in names}


class RankedEncDecFeatureConverter(seqio.EncDecFeatureConverter):
    """seqio's encoder-decoder features plus `encoder_attention_rank` [inputs length]: the objective space's
    `attention_rank` (`preprocessors.objective_space`: each input position's place in R's reading order), all
    zeros (bidirectional) for a task without one, so the end task and every combination of the space make
    batches of the same features. Packs like seqio's converter (ranks restart in each packed segment)."""

    MODEL_FEATURES: ClassVar = {**seqio.EncDecFeatureConverter.MODEL_FEATURES, "encoder_attention_rank": _INT}

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        has_rank = "attention_rank" in ds.element_spec

        # Rank 0 is a real value: packed shifted by one (padding stays 0), then shifted back.
        def shifted(features):
            rank = features["attention_rank"] if has_rank else tf.zeros_like(features["inputs"])
            return {"inputs": features["inputs"], "targets": features["targets"], "attention_rank": rank + 1}

        def convert(features):
            return {**self._convert_example(features),
                    "encoder_attention_rank": tf.maximum(features["attention_rank"] - 1, 0)}

        lengths = {**task_feature_lengths, "attention_rank": task_feature_lengths["inputs"]}
        ds = self._pack_or_pad(ds.map(shifted, num_parallel_calls=tf.data.AUTOTUNE), lengths)
        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        lengths = super().get_model_feature_lengths(task_feature_lengths)
        return {**lengths, "encoder_attention_rank": task_feature_lengths["inputs"]}
