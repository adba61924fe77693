"""T5's span-corruption pre-training objective as SeqIO preprocessors.

A document stream is packed into chunks of raw tokens sized so that, once corrupted, the inputs fill
`sequence_length["inputs"]` exactly (`random_spans_lengths`). In each chunk about `noise_density` of the
tokens, in spans of mean length `mean_noise_span_length`, are replaced in the inputs by one sentinel per
span; the targets list each sentinel followed by the span it hides:

  tokens:  a b c d e f g h
  inputs:  a <extra_id_0> d e f <extra_id_1>           (+ EOS)
  targets: <extra_id_0> b c <extra_id_1> g h           (+ EOS)

Sentinels are the vocabulary's extra ids counted down from the top (`<extra_id_0>` = `vocab_size - 1`).
All randomness is stateless and seeded by SeqIO, so `Task.get_dataset(seed=...)` is reproducible.
"""

import functools
from collections.abc import Callable, Mapping

import gin
import seqio
import tensorflow as tf

from t5x_lite.data.preprocessors import text

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


def check_noise_args(noise_density: float, mean_noise_span_length: float) -> None:
    """A ValueError for a noise density outside (0, 1) or a mean span length under 1."""
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density={noise_density!r} must lie strictly between 0 and 1 (T5 uses 0.15).")
    if not mean_noise_span_length >= 1.0:
        raise ValueError(f"mean_noise_span_length={mean_noise_span_length!r} must be >= 1: a span holds at least one "
                         "token (T5 uses 3.0).")


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(num_noise_tokens, num_noise_spans) for `length` raw tokens (`noise_counts_tf`: the same in TF ops).

    A sequence of 2+ tokens gets at least one noise and one non-noise token, so every example has something to
    predict and something to condition on; a 0- or 1-token sequence is left uncorrupted. Python's `round` and
    `tf.round` both round half to even, in float64.
    """
    if length < 2:
        return 0, 0
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = min(max(round(num_noise / mean_noise_span_length), 1), num_noise, length - num_noise)
    return num_noise, num_spans


def noise_counts_tf(
    length: tf.Tensor, noise_density: float, mean_noise_span_length: float
) -> tuple[tf.Tensor, tf.Tensor]:
    """`noise_counts` for a scalar int32 tensor `length`."""
    num_noise = tf.cast(tf.round(tf.cast(length, tf.float64) * noise_density), tf.int32)
    num_noise = tf.minimum(tf.maximum(num_noise, 1), length - 1)
    num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float64) / mean_noise_span_length), tf.int32)
    num_spans = tf.minimum(tf.maximum(num_spans, 1), tf.minimum(num_noise, length - num_noise))
    short = length < 2
    return tf.where(short, 0, num_noise), tf.where(short, 0, num_spans)


def random_spans_lengths(
    inputs_length: int,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tuple[int, int]:
    """`(tokens_length, targets_length)`: the largest raw chunk (no EOS) whose corrupted inputs (non-noise tokens +
    one sentinel per span + EOS) fit in `inputs_length`, and the length of its targets (noise tokens + one sentinel
    per span + EOS). Chunks of `tokens_length` tokens fill the inputs without truncation. T5: 512 -> (568, 114).
    """
    check_noise_args(noise_density, mean_noise_span_length)
    if inputs_length < 3:
        raise ValueError(f"inputs_length={inputs_length!r} is too short for span corruption: it needs room for a "
                         "token, a sentinel and EOS (use at least 3).")

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise, num_spans = noise_counts(tokens_length, noise_density, mean_noise_span_length)
        return (tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1)

    # The inputs length never decreases as tokens_length grows (an extra token adds at most one noise token, a new
    # span a sentinel) and is at most tokens_length + 1: bisect between a length that fits and one that does not.
    fits, too_long = inputs_length - 1, inputs_length
    while lengths(too_long)[0] <= inputs_length:
        fits, too_long = too_long, 2 * too_long
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        if lengths(middle)[0] <= inputs_length:
            fits = middle
        else:
            too_long = middle
    return fits, lengths(fits)[1]


def _random_composition(total: tf.Tensor, num_parts: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Splits `total` into `num_parts` positive ints, each of the C(total - 1, num_parts - 1) ways equally likely:
    shuffling a 0/1 vector picks which of the `total - 1` gaps are cuts. `total == 0`, `num_parts == 1` gives `[0]`.
    """
    num_cuts = num_parts - 1
    num_gaps = tf.maximum(total - 1, 0)
    cuts = tf.concat([tf.ones([num_cuts], tf.int32), tf.zeros([num_gaps - num_cuts], tf.int32)], axis=0)
    cuts = tf.random.experimental.stateless_shuffle(cuts, seed=seed)
    part_of_item = tf.concat([[0], tf.cumsum(cuts)], axis=0)[:total]
    return tf.math.bincount(part_of_item, minlength=num_parts, maxlength=num_parts, dtype=tf.int32)


def random_noise_mask(
    length: tf.Tensor,
    seed: tf.Tensor,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tf.Tensor:
    """A random bool [length] mask (length: a scalar, maybe dynamic, int32 tensor), True at noise tokens.

    Exactly `round(length * noise_density)` noise tokens in `round(num_noise / mean_noise_span_length)` spans
    (clamped as in `noise_counts`). Segments alternate non-noise, noise, ..., non-noise, noise (the first token is
    never noise and the last always is, as in T5); the non-noise and the noise tokens are each split into that many
    positive-length segments uniformly at random. `seed`: a [2] tensor for TF's stateless random ops.
    """
    length = tf.convert_to_tensor(length, tf.int32)
    num_noise, num_spans = noise_counts_tf(length, noise_density, mean_noise_span_length)
    # With no noise, one (non-noise, empty-noise) pair covers the sequence.
    num_pairs = tf.maximum(num_spans, 1)
    nonnoise_seed, noise_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    nonnoise_lengths = _random_composition(length - num_noise, num_pairs, nonnoise_seed)
    noise_lengths = _random_composition(num_noise, num_pairs, noise_seed)
    segment_lengths = tf.reshape(tf.stack([nonnoise_lengths, noise_lengths], axis=1), [-1])
    return tf.repeat(tf.tile([False, True], [num_pairs]), segment_lengths)


def corrupt_spans(tokens: tf.Tensor, is_noise: tf.Tensor, vocab_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """`(inputs, targets)` for a noise mask: the non-noise tokens with each noise span replaced by its sentinel,
    and each span's sentinel then its tokens. The k-th span (from 0) uses sentinel `vocab_size - 1 - k`; no EOS.
    """
    follows_noise = tf.concat([[False], is_noise[:-1]], axis=0)
    starts_span = tf.logical_and(is_noise, tf.logical_not(follows_noise))
    span_index = tf.cumsum(tf.cast(starts_span, tokens.dtype)) - 1
    sentinels = tf.cast(vocab_size - 1, tokens.dtype) - span_index
    # Each position contributes [sentinel if a span starts here, token if kept]: every sentinel precedes its span.
    candidates = tf.reshape(tf.stack([sentinels, tokens], axis=1), [-1])

    def keep(keep_token: tf.Tensor) -> tf.Tensor:
        mask = tf.reshape(tf.stack([starts_span, keep_token], axis=1), [-1])
        return tf.boolean_mask(candidates, mask)

    return keep(tf.logical_not(is_noise)), keep(is_noise)


@gin.configurable
def pack_tokens_for_span_corruption(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tf.data.Dataset:
    """Concatenates the `targets` of all examples (documents are not separated, as in T5) into chunks of
    `random_spans_lengths(sequence_length["inputs"], ...)[0]` tokens, so that after `span_corruption` and EOS the
    inputs are exactly `sequence_length["inputs"]` long; only the stream's last chunk may be shorter.

    Output examples have only `targets`: other features (e.g. `*_pretokenized`) no longer align with the chunks.
    Deterministic; goes after the cache placeholder because it depends on the sequence length.
    """
    if not sequence_length or not sequence_length.get("inputs"):
        raise ValueError(
            f"pack_tokens_for_span_corruption needs sequence_length['inputs'] (got {sequence_length!r}); pass "
            "sequence_length={'inputs': ..., 'targets': ...} to get_dataset."
        )
    chunk_length, targets_length = random_spans_lengths(
        sequence_length["inputs"], noise_density, mean_noise_span_length
    )
    if sequence_length.get("targets", targets_length) < targets_length:
        raise ValueError(
            f"Span corruption of {sequence_length['inputs']} input tokens makes targets of {targets_length} tokens, "
            f"but the targets length is {sequence_length['targets']}: targets would be truncated. Set "
            f"TASK_FEATURE_LENGTHS['targets'] to at least {targets_length}."
        )
    return text.split_token_stream(dataset, chunk_length)


@gin.configurable
@seqio.map_over_dataset(num_seeds=1)
def span_corruption(
    features: Mapping[str, tf.Tensor],
    output_features: Mapping[str, seqio.Feature],
    seed: tf.Tensor,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> dict[str, tf.Tensor]:
    """Turns `{"targets": tokens}` into span-corrupted `inputs` and `targets`; other features pass through.

    SeqIO passes `output_features` and a per-example seed. Sentinels come from the targets vocabulary; if it
    declares extra ids, an example needing more sentinels than it has fails loudly. No EOS is added (use
    `seqio.preprocessors.append_eos_after_trim` next).
    """
    check_noise_args(noise_density, mean_noise_span_length)
    vocabulary = output_features["targets"].vocabulary
    tokens = features["targets"]
    is_noise = random_noise_mask(tf.size(tokens), seed, noise_density, mean_noise_span_length)
    inputs, targets = corrupt_spans(tokens, is_noise, vocabulary.vocab_size)
    if vocabulary.extra_ids:
        _, num_spans = noise_counts_tf(tf.size(tokens), noise_density, mean_noise_span_length)
        inputs = check_sentinel_count(inputs, num_spans, vocabulary.extra_ids, "the vocabulary's")
    return {**features, "inputs": inputs, "targets": targets}


def check_sentinel_count(inputs: tf.Tensor, num_spans: tf.Tensor, num_sentinels: int, whose: str) -> tf.Tensor:
    """`inputs`, once the pipeline has asserted that its `num_spans` spans have sentinels (a loud error if not)."""
    check = tf.debugging.assert_less_equal(
        num_spans, num_sentinels,
        message=f"span corruption needs more sentinels than {whose} {num_sentinels} extra ids; "
        "use a shorter inputs length, a lower noise_density or a longer mean_noise_span_length",
    )
    with tf.control_dependencies([check]):
        return tf.identity(inputs)


def span_corruption_preprocessors(
    noise_density: float | None = None,
    mean_noise_span_length: float | None = None,
) -> list[Callable[..., tf.data.Dataset]]:
    """A span-corruption task's preprocessors over `text`: rekey, tokenize, cache placeholder, pack, corrupt, EOS.

    Values passed here are bound into both the packer and the corrupter (which must agree); None leaves them to gin
    at dataset-build time (`pack_tokens_for_span_corruption.noise_density`, `span_corruption.noise_density`, ...;
    bind both, e.g. through one gin macro) or to the defaults (0.15, 3.0).
    """
    noise_args = {"noise_density": noise_density, "mean_noise_span_length": mean_noise_span_length}
    noise_args = {k: v for k, v in noise_args.items() if v is not None}
    return [
        functools.partial(seqio.preprocessors.rekey, key_map={"inputs": None, "targets": "text"}),
        functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
        seqio.CacheDatasetPlaceholder(),
        functools.partial(pack_tokens_for_span_corruption, **noise_args),
        functools.partial(span_corruption, **noise_args),
        seqio.preprocessors.append_eos_after_trim,
    ]
