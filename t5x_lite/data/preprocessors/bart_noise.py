"""BART's denoising objectives as SeqIO preprocessors: the decoder reconstructs the original text.

A document stream is cut into chunks of min(inputs, targets length) - 1 tokens; then, each
switchable by gin (`bart_noise.*`) and applied in this order to the chunk:

  sentence_permutation  shuffle the sentences; a sentence ends at a piece ending in '.', '!' or
                        '?' (found on the pieces after tokenization, so it works on any chunk;
                        the chunk's tail after its last sentence end counts as one more sentence)
  token_masking_rate    replace that fraction of tokens (exact count) by [MASK]
  token_deletion_rate   delete that fraction of tokens (exact count)
  text_infilling_rate   mask that fraction of tokens in spans with lengths ~ Poisson(poisson_lambda);
                        each span, even an empty one, becomes ONE [MASK]
  document_rotation     rotate the sequence to start at a uniformly random token

  inputs  = noised chunk + EOS,  targets = original chunk + EOS   (seqio.EncDecFeatureConverter)

The defaults are BART-large's: text infilling (0.3, Poisson(3)) + sentence permutation. Rates
apply to the sequence each step receives. [MASK] is `special_tokens.bert_special_ids(...).mask`
(<extra_id_0>). Noise is drawn after SeqIO's cache placeholder, so anew every epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import gin
import seqio
import tensorflow as tf

from t5x_lite.data import special_tokens
from t5x_lite.data.preprocessors import text

TEXT_INFILLING_RATE = 0.3
POISSON_LAMBDA = 3.0


def _exact_count(length: tf.Tensor, rate: float) -> tf.Tensor:
    return tf.cast(tf.round(tf.cast(length, tf.float64) * rate), tf.int32)


def _random_subset(length: tf.Tensor, count: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """A bool [length] mask with exactly `count` True positions, uniformly at random."""
    ranks = tf.argsort(tf.argsort(tf.random.stateless_uniform([length], seed)))
    return ranks < count


def permute_sentences(tokens: tf.Tensor, seed: tf.Tensor, is_sentence_end: tf.Tensor) -> tf.Tensor:
    """Shuffles the sentences of `tokens`; `is_sentence_end` is a bool table indexed by id.

    A sentence runs up to and including a sentence-end token; the multiset of sentences is kept.
    """
    length = tf.size(tokens)
    ends = tf.gather(is_sentence_end, tokens)
    sentence = tf.cumsum(tf.cast(ends, tf.int32), exclusive=True)
    num_sentences = tf.reduce_max(tf.concat([sentence, [-1]], axis=0)) + 1
    new_place = tf.argsort(tf.random.experimental.stateless_shuffle(tf.range(num_sentences), seed))
    key = tf.gather(new_place, sentence) * length + tf.range(length)
    return tf.gather(tokens, tf.argsort(key))


def mask_tokens(tokens: tf.Tensor, seed: tf.Tensor, rate: float, mask_id: int) -> tf.Tensor:
    """Replaces `round(rate * n)` uniformly chosen tokens by `mask_id`."""
    chosen = _random_subset(tf.size(tokens), _exact_count(tf.size(tokens), rate), seed)
    return tf.where(chosen, tf.cast(mask_id, tokens.dtype), tokens)


def delete_tokens(tokens: tf.Tensor, seed: tf.Tensor, rate: float) -> tf.Tensor:
    """Deletes `round(rate * n)` uniformly chosen tokens."""
    chosen = _random_subset(tf.size(tokens), _exact_count(tf.size(tokens), rate), seed)
    return tf.boolean_mask(tokens, tf.logical_not(chosen))


def infilling_plan(length: tf.Tensor, seed: tf.Tensor, rate: float, poisson_lambda: float) -> tuple[tf.Tensor, tf.Tensor]:
    """Where text infilling puts its spans: `(is_span, span_length)` over the noised sequence's slots.

    `round(rate * length)` tokens are masked. Span lengths are drawn i.i.d. from
    Poisson(poisson_lambda) until they cover that many tokens; the last span is cut to the exact
    total (so all spans but the last per sequence are exact Poisson draws; zero-length spans are
    insertions of a [MASK]). The spans go, in draw order, between the kept tokens uniformly at
    random: the noised sequence has one slot per kept token and one per span, and the span slots
    are a uniformly random subset. `span_length` is each slot's length in the original: 1 for a
    kept token, the span's length for a span slot.
    """
    length = tf.convert_to_tensor(length, tf.int32)
    num_noise = _exact_count(length, rate)
    draw_seed, place_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    draws = tf.random.stateless_poisson([num_noise + 1], draw_seed, poisson_lambda, dtype=tf.int32)
    before = tf.cumsum(draws, exclusive=True)
    # Spans up to the first whose draw reaches the total (or all draws, in the rare case they fall short).
    num_spans = tf.minimum(tf.reduce_sum(tf.cast(before + draws < num_noise, tf.int32)) + 1, num_noise + 1)
    num_spans = tf.where(num_noise > 0, num_spans, 0)
    lengths = draws[:num_spans]
    last = num_noise - tf.reduce_sum(lengths[:-1])
    lengths = tf.concat([lengths[:-1], tf.reshape(last, [-1])[: tf.minimum(num_spans, 1)]], axis=0)
    num_kept = length - num_noise
    is_span = tf.random.experimental.stateless_shuffle(
        tf.concat([tf.ones([num_spans], tf.bool), tf.zeros([num_kept], tf.bool)], axis=0), place_seed
    )
    span_index = tf.cumsum(tf.cast(is_span, tf.int32), exclusive=True)
    # A dummy last entry keeps the gather in range for the kept slots (and when there are no spans).
    span_length = tf.where(is_span, tf.gather(tf.concat([lengths, [1]], 0), tf.minimum(span_index, num_spans)), 1)
    return is_span, span_length


def infill_text(tokens: tf.Tensor, seed: tf.Tensor, rate: float, poisson_lambda: float, mask_id: int) -> tf.Tensor:
    """BART's text infilling: each span of `infilling_plan` becomes one `mask_id`."""
    is_span, span_length = infilling_plan(tf.size(tokens), seed, rate, poisson_lambda)
    start = tf.cumsum(span_length, exclusive=True)
    kept = tf.gather(tf.concat([tokens, tf.zeros([1], tokens.dtype)], 0), tf.minimum(start, tf.size(tokens)))
    return tf.where(is_span, tf.cast(mask_id, tokens.dtype), kept)


def rotate_document(tokens: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Rotates `tokens` to start at a uniformly random position."""
    length = tf.size(tokens)
    offset = tf.random.stateless_uniform([], seed, minval=0, maxval=tf.maximum(length, 1), dtype=tf.int32)
    return tf.concat([tokens[offset:], tokens[:offset]], axis=0)


def _check_rate(name: str, value: float, bart_value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} must lie in [0, 1) (0 turns it off; BART uses {bart_value}).")


@gin.configurable
def pack_tokens_for_denoising(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None) -> tf.data.Dataset:
    """Concatenates the documents' `targets` and cuts chunks of min(inputs, targets length) - 1 tokens (room for EOS)."""
    if not sequence_length or not sequence_length.get("inputs") or not sequence_length.get("targets"):
        raise ValueError(
            f"BART denoising needs sequence_length['inputs'] and ['targets'] (got {sequence_length!r}); set both "
            "in TASK_FEATURE_LENGTHS."
        )
    chunk_length = min(sequence_length["inputs"], sequence_length["targets"]) - 1
    if chunk_length < 1:
        raise ValueError(f"BART denoising needs inputs and targets lengths of at least 2, got {dict(sequence_length)}.")
    return text.split_token_stream(dataset, chunk_length)


@gin.configurable
@seqio.map_over_dataset(num_seeds=1)
def bart_noise(
    features: Mapping[str, tf.Tensor],
    output_features: Mapping[str, seqio.Feature],
    seed: tf.Tensor,
    sequence_length: Mapping[str, int] | None = None,
    text_infilling_rate: float = TEXT_INFILLING_RATE,
    poisson_lambda: float = POISSON_LAMBDA,
    sentence_permutation: bool = True,
    token_masking_rate: float = 0.0,
    token_deletion_rate: float = 0.0,
    document_rotation: bool = False,
) -> dict[str, tf.Tensor]:
    """`{"targets": chunk}` -> `inputs` (the chunk noised as the module docstring says) and `targets` (the chunk).

    The noised inputs are cut to `sequence_length["inputs"] - 1` tokens (room for EOS): only
    possible when empty infilling spans outnumber the tokens the other spans remove.
    """
    _check_rate("text_infilling_rate", text_infilling_rate, TEXT_INFILLING_RATE)
    _check_rate("token_masking_rate", token_masking_rate, 0.0)
    _check_rate("token_deletion_rate", token_deletion_rate, 0.0)
    if poisson_lambda <= 0:
        raise ValueError(f"poisson_lambda={poisson_lambda!r} must be positive (BART uses {POISSON_LAMBDA}).")
    vocabulary = output_features["inputs"].vocabulary
    mask_id = special_tokens.bert_special_ids(vocabulary).mask
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
    original = features["targets"]
    tokens = original
    if sentence_permutation:
        tokens = permute_sentences(tokens, seeds[0], special_tokens.sentence_end_table(vocabulary))
    if token_masking_rate:
        tokens = mask_tokens(tokens, seeds[1], token_masking_rate, mask_id)
    if token_deletion_rate:
        tokens = delete_tokens(tokens, seeds[2], token_deletion_rate)
    if text_infilling_rate:
        tokens = infill_text(tokens, seeds[3], text_infilling_rate, poisson_lambda, mask_id)
    if document_rotation:
        tokens = rotate_document(tokens, seeds[4])
    if sequence_length and sequence_length.get("inputs"):
        tokens = tokens[: sequence_length["inputs"] - 1]
    return {"inputs": tokens, "targets": original}


def bart_preprocessors() -> list[Callable[..., tf.data.Dataset]]:
    """BART denoising over a `text` field: rekey, tokenize, cache placeholder, pack, noise, EOS."""
    return [
        *text.tokenize_text(),
        pack_tokens_for_denoising,
        bart_noise,
        seqio.preprocessors.append_eos_after_trim,
    ]
