"""UL2's mixture of denoisers (Tay et al., 2022) as one SeqIO preprocessor, `ul2_denoise`.

The token stream is cut into chunks (`pack_tokens_for_ul2`); each chunk draws ONE denoiser, with
probabilities proportional to `ul2_mixture.rates` (default: equal), and becomes `inputs` = the denoiser's
mode token + its corrupted text, `targets` = what it hid. The defaults are the paper's seven denoisers:

  R (regular)    span corruption, rate 0.15, mean span 3 or 8                      mode token [NLU]
  X (extreme)    span corruption, rate 0.5 with mean span 3, 8 or 64; 0.15 with 64   mode token [NLG]
  S (sequential) prefix LM: the chunk split at a uniformly random point            mode token [S2S]

R and X are T5's span corruption (`span_corruption.random_noise_mask` and `corrupt_spans`: exactly
round(rate * n) noise tokens in round(noise / mean span) spans, one sentinel per span, counting down from
`<extra_id_0>`); S is the prefix LM's split (`lm.random_split_point`). The mode tokens are the vocabulary's
three lowest extra ids (`special_tokens.ul2_mode_ids`: 8000-8002, `<extra_id_99..97>`, with the bundled
vocabulary), so the sentinels may use all extra ids but those three.

One chunk length serves every denoiser: the longest for which each one's inputs (mode token + text + EOS if
the feature adds one) and targets fit their lengths, and its spans have sentinels (`ul2_chunk_length`).
The same preprocessors serve the encoder-decoder (`bundled_ul2`: inputs and targets end in EOS) and the
decoder-only prefix LM (`bundled_ul2_prefix_lm`: inputs without EOS, so the targets follow the inputs
directly). Documents are concatenated without separators, as in T5. All randomness is stateless and
seeded by SeqIO, drawn after the cache placeholder: a chunk gets a new denoiser every epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import gin
import seqio
import tensorflow as tf

from t5x_lite.data import special_tokens
from t5x_lite.data.preprocessors import lm, span_corruption, text

MODE_TOKENS = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}


class Denoiser(NamedTuple):
    """One denoiser: `mode` "R", "X" (span corruption with these parameters) or "S" (prefix LM; the two
    numbers are unused)."""

    mode: str
    noise_density: float = 0.0
    mean_noise_span_length: float = 0.0


# The UL2 paper's seven denoisers.
UL2_DENOISERS = (
    Denoiser("R", 0.15, 3.0),
    Denoiser("R", 0.15, 8.0),
    Denoiser("X", 0.5, 3.0),
    Denoiser("X", 0.5, 8.0),
    Denoiser("X", 0.15, 64.0),
    Denoiser("X", 0.5, 64.0),
    Denoiser("S"),
)


def _check_denoiser(denoiser: Denoiser) -> None:
    if denoiser.mode not in MODE_TOKENS:
        raise ValueError(f"UL2 denoiser {tuple(denoiser)!r}: the mode must be one of {sorted(MODE_TOKENS)}.")
    if denoiser.mode != "S":
        span_corruption.check_noise_args(denoiser.noise_density, denoiser.mean_noise_span_length)


@gin.configurable
def ul2_mixture(
    denoisers: Sequence[Sequence] = UL2_DENOISERS, rates: Sequence[float] | None = None
) -> tuple[tuple[Denoiser, ...], tuple[float, ...]]:
    """The denoisers and their probabilities, read by both the packer and `ul2_denoise` (which must agree).

    gin: `ul2_mixture.denoisers = [('R', 0.15, 3.0), ('X', 0.5, 32.0), ('S',)]`, `ul2_mixture.rates = [2, 1, 1]`
    (relative rates; default: equal).
    """
    found = tuple(Denoiser(*d) for d in denoisers)
    if not found:
        raise ValueError("ul2_mixture.denoisers is empty; give at least one denoiser.")
    for denoiser in found:
        _check_denoiser(denoiser)
    rates = tuple(float(r) for r in (rates if rates is not None else [1.0] * len(found)))
    if len(rates) != len(found) or min(rates) < 0 or sum(rates) <= 0:
        raise ValueError(f"ul2_mixture.rates {list(rates)} must be {len(found)} non-negative numbers, not all 0 "
                         "(one per denoiser).")
    return found, tuple(r / sum(rates) for r in rates)


def _budgets(sequence_length: Mapping[str, int] | None, output_features: Mapping[str, seqio.Feature]) -> tuple[int, int]:
    """(tokens of text the inputs hold besides the mode token and EOS, tokens the targets hold besides EOS)."""
    if not sequence_length or not sequence_length.get("inputs") or not sequence_length.get("targets"):
        raise ValueError(
            f"UL2 needs sequence_length['inputs'] and ['targets'] (got {sequence_length!r}); set both in "
            "TASK_FEATURE_LENGTHS."
        )
    inputs = sequence_length["inputs"] - 1 - int(output_features["inputs"].add_eos)
    targets = sequence_length["targets"] - int(output_features["targets"].add_eos)
    return inputs, targets


def _fits(length: int, denoiser: Denoiser, inputs_budget: int, targets_budget: int, num_sentinels: int) -> bool:
    if denoiser.mode == "S":  # a split leaving a non-empty prefix within the inputs and the rest within the targets
        return inputs_budget >= 1 and length <= inputs_budget + targets_budget
    num_noise, num_spans = span_corruption.noise_counts(length, denoiser.noise_density, denoiser.mean_noise_span_length)
    return (length - num_noise + num_spans <= inputs_budget and num_noise + num_spans <= targets_budget
            and num_spans <= num_sentinels)


def num_sentinels(vocabulary: seqio.Vocabulary) -> int:
    """Sentinels span corruption may use under UL2: the extra ids but the three mode tokens."""
    return vocabulary.vocab_size - 1 - max(special_tokens.ul2_mode_ids(vocabulary).values())


def ul2_chunk_length(
    sequence_length: Mapping[str, int] | None,
    output_features: Mapping[str, seqio.Feature],
    denoisers: Sequence[Denoiser],
) -> int:
    """The longest chunk every denoiser turns into inputs and targets within their lengths (each length is
    non-decreasing in the chunk length, so every shorter chunk fits too). E.g. 128/128 with EOS: 140."""
    inputs_budget, targets_budget = _budgets(sequence_length, output_features)
    sentinels = num_sentinels(output_features["targets"].vocabulary)
    for length in range(inputs_budget + targets_budget, 1, -1):
        if all(_fits(length, d, inputs_budget, targets_budget, sentinels) for d in denoisers):
            return length
    raise ValueError(f"TASK_FEATURE_LENGTHS {dict(sequence_length)} are too short for UL2's denoisers: no chunk of "
                     "2 or more tokens fits every one of them; use longer inputs and targets.")


@gin.configurable
def pack_tokens_for_ul2(
    dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None, output_features: Mapping[str, seqio.Feature]
) -> tf.data.Dataset:
    """Concatenates the documents' `targets` and cuts chunks of `ul2_chunk_length` tokens; drops a last chunk under
    2 tokens (nothing to split or corrupt)."""
    chunk_length = ul2_chunk_length(sequence_length, output_features, ul2_mixture()[0])
    chunks = text.split_token_stream(dataset, chunk_length)
    return chunks.filter(lambda ex: tf.size(ex["targets"]) >= 2)


def denoise(
    tokens: tf.Tensor,
    seed: tf.Tensor,
    vocabulary: seqio.Vocabulary,
    inputs_budget: int,
    targets_budget: int,
    denoisers: Sequence[Denoiser],
    probabilities: Sequence[float],
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """`(inputs, targets, index)` of one chunk of 2+ tokens: `index` is the denoiser drawn (with `probabilities`),
    `inputs` its mode token then the corrupted tokens, `targets` what they hide; no EOS.

    The checks (a split point exists, the spans have sentinels) run outside the per-denoiser branches: a
    branch with an assertion would make the branch op stateful, and the data iterator uncheckpointable.
    """
    choice_seed, noise_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    index = tf.cast(tf.random.stateless_categorical(tf.math.log([list(probabilities)]), 1, choice_seed)[0, 0], tf.int32)
    length = tf.size(tokens)
    split = lm.random_split_point(length, inputs_budget, targets_budget, noise_seed)
    mode_ids = special_tokens.ul2_mode_ids(vocabulary)

    def branch(denoiser: Denoiser) -> Callable[[], tuple[tf.Tensor, tf.Tensor]]:
        mode = tf.constant([mode_ids[MODE_TOKENS[denoiser.mode]]], tokens.dtype)

        def corrupt() -> tuple[tf.Tensor, tf.Tensor]:
            if denoiser.mode == "S":
                return tf.concat([mode, tokens[:split]], 0), tokens[split:]
            is_noise = span_corruption.random_noise_mask(
                length, noise_seed, denoiser.noise_density, denoiser.mean_noise_span_length
            )
            inputs, targets = span_corruption.corrupt_spans(tokens, is_noise, vocabulary.vocab_size)
            return tf.concat([mode, inputs], 0), targets

        return corrupt

    inputs, targets = tf.switch_case(index, [branch(d) for d in denoisers])
    num_spans = tf.gather(tf.stack([_num_spans(length, d) for d in denoisers]), index)
    inputs = span_corruption.check_sentinel_count(inputs, num_spans, num_sentinels(vocabulary), "the vocabulary's free")
    return inputs, targets, index


def _num_spans(length: tf.Tensor, denoiser: Denoiser) -> tf.Tensor:
    if denoiser.mode == "S":
        return tf.constant(0, tf.int32)
    return span_corruption.noise_counts_tf(length, denoiser.noise_density, denoiser.mean_noise_span_length)[1]


@gin.configurable
@seqio.map_over_dataset(num_seeds=1)
def ul2_denoise(
    features: Mapping[str, tf.Tensor],
    sequence_length: Mapping[str, int] | None,
    output_features: Mapping[str, seqio.Feature],
    seed: tf.Tensor,
) -> dict[str, tf.Tensor]:
    """`{"targets": chunk}` -> `inputs` and `targets` of the denoiser the chunk draws from `ul2_mixture()`."""
    denoisers, probabilities = ul2_mixture()
    inputs_budget, targets_budget = _budgets(sequence_length, output_features)
    inputs, targets, _ = denoise(features["targets"], seed, output_features["targets"].vocabulary, inputs_budget,
                                 targets_budget, denoisers, probabilities)
    return {"inputs": inputs, "targets": targets}


def ul2_preprocessors() -> list[Callable[..., tf.data.Dataset]]:
    """UL2 over a `text` field: rekey, tokenize, cache placeholder, pack, denoise, EOS (where a feature adds one)."""
    return [*text.tokenize_text(), pack_tokens_for_ul2, ul2_denoise, seqio.preprocessors.append_eos_after_trim]
