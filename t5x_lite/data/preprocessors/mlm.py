"""BERT's masked-language-model objective (with optional next-sentence pairs) as SeqIO preprocessors.

A document stream is cut into chunks that, with BERT's special tokens, fill the inputs length:

  single:  [CLS] tokens ... [SEP]
  pairs:   [CLS] A ... [SEP] B ... [SEP]      (next_sentence_prediction=True)

Then `mask_rate` (15%) of the text tokens (never [CLS]/[SEP]/pad/eos) are chosen; of those
80% become [MASK], 10% a random ordinary piece, 10% stay. Outputs:

  inputs:  the corrupted ids
  targets: the original id at each chosen position, 0 elsewhere (so the loss weight is targets > 0)
  token_type_ids, next_sentence_label: with pairs only (0 for [CLS] A [SEP], 1 for B [SEP];
      1 = B is the true continuation, 0 = B is a random segment). They are not declared output
      features (their lengths follow `inputs`, so TASK_FEATURE_LENGTHS stays {inputs, targets});
      a seqio Mixture keeps only output features, so train NSP on the task itself.

Masking runs after SeqIO's cache placeholder, so after the repeat of `num_epochs`: every pass
over an example draws a new mask (RoBERTa's dynamic masking), reproducibly for a given seed.
Special ids come from `special_tokens.bert_special_ids`. Use `MaskedLMFeatureConverter`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import gin
import seqio
import tensorflow as tf

from t5x_lite.data import special_tokens
from t5x_lite.data.preprocessors import text

MASK_RATE = 0.15
MASK_TOKEN_FRACTION = 0.8
RANDOM_TOKEN_FRACTION = 0.1
NSP_POOL_SIZE = 128


def _inputs_length(sequence_length: Mapping[str, int] | None, minimum: int) -> int:
    if not sequence_length or not sequence_length.get("inputs"):
        raise ValueError(
            f"The MLM objective needs sequence_length['inputs'] (got {sequence_length!r}); pass "
            "TASK_FEATURE_LENGTHS={'inputs': L, 'targets': L}."
        )
    length = sequence_length["inputs"]
    if sequence_length.get("targets", length) != length:
        raise ValueError(
            f"MLM targets align with the inputs, so TASK_FEATURE_LENGTHS needs targets == inputs; got "
            f"{dict(sequence_length)}. Set both to {length}."
        )
    if length < minimum:
        raise ValueError(f"inputs length {length} is too short for the MLM objective: use at least {minimum}.")
    return length


@seqio.map_over_dataset(num_seeds=1)
def _draw_pair_choices(features: Mapping[str, tf.Tensor], seed: tf.Tensor) -> dict[str, tf.Tensor]:
    """Per chunk: a split point into A and B, whether B is random (p=0.5), and which pooled chunk."""
    length = tf.size(features["targets"])
    split = tf.random.stateless_uniform([], seed, minval=1, maxval=tf.maximum(length, 2), dtype=tf.int32)
    coin, pick = tf.unstack(tf.random.stateless_uniform([2], tf.random.experimental.stateless_fold_in(seed, 1)))
    return {"targets": features["targets"], "split": split, "random_b": coin < 0.5, "pick": pick}


def _sentence_pairs(chunks: tf.data.Dataset, chunk_length: int, pool_size: int) -> tf.data.Dataset:
    """Splits each chunk into (A, B); half the time B is replaced by the same span of an earlier chunk.

    The random B comes from a ring buffer of the last `pool_size` chunks of the stream, from a chunk
    uniformly between `pool_size // 4` (at least 1) and `pool_size` chunks back, so rarely from the
    same document (with 128 chunks of ~100 tokens: 3k-13k tokens, ~15-60 bundled documents, back).
    It covers the same positions as the true B, so both kinds have the same lengths. Until the
    stream has passed `pool_size // 4` chunks, B is the true one.
    """
    min_gap = max(1, pool_size // 4)
    pool = (tf.zeros([pool_size, chunk_length], tf.int32), tf.zeros([pool_size], tf.int32), tf.constant(0))

    def step(state, example):
        rows, lengths, count = state
        tokens, split = example["targets"], example["split"]
        filled = tf.minimum(count, pool_size)
        use_random = tf.logical_and(example["random_b"], filled >= min_gap)
        gap = min_gap + tf.cast(example["pick"] * tf.cast(tf.maximum(filled - min_gap + 1, 1), tf.float32), tf.int32)
        slot = (count - tf.minimum(gap, tf.maximum(filled, 1))) % pool_size
        end = tf.size(tokens)
        random_b = rows[slot][split : tf.minimum(end, lengths[slot])]
        segment_b = tf.cond(use_random, lambda: random_b, lambda: tokens[split:])
        write = count % pool_size
        padded = tf.pad(tokens, [[0, chunk_length - end]])
        rows = tf.tensor_scatter_nd_update(rows, [[write]], padded[tf.newaxis])
        lengths = tf.tensor_scatter_nd_update(lengths, [[write]], [end])
        label = tf.cast(tf.logical_not(use_random), tf.int32)
        return (rows, lengths, count + 1), {"segment_a": tokens[:split], "segment_b": segment_b, "next_sentence_label": label}

    return chunks.scan(pool, step)


@gin.configurable
def pack_mlm_sequences(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None,
    output_features: Mapping[str, seqio.Feature],
    next_sentence_prediction: bool = False,
    nsp_pool_size: int = NSP_POOL_SIZE,
) -> tf.data.Dataset:
    """Concatenates the `targets` token stream into `[CLS] chunk [SEP]` (or `[CLS] A [SEP] B [SEP]`) examples.

    Each example fills `sequence_length["inputs"]` exactly (only the stream's last may be shorter).
    With `next_sentence_prediction`, each chunk is split at a uniformly random point into A and B,
    and with probability 0.5 B is swapped for a segment of another chunk (see `_sentence_pairs`);
    chunks of fewer than 2 tokens are dropped. Output features: `targets` (the whole sequence) and,
    with pairs, `token_type_ids` and `next_sentence_label`. Deterministic apart from the pair choices.
    """
    ids = special_tokens.bert_special_ids(output_features["targets"].vocabulary)
    cls, sep = tf.constant([ids.cls]), tf.constant([ids.sep])
    if not next_sentence_prediction:
        chunk_length = _inputs_length(sequence_length, minimum=3) - 2
        chunks = text.split_token_stream(dataset, chunk_length)
        return chunks.map(lambda ex: {"targets": tf.concat([cls, ex["targets"], sep], axis=0)})
    if nsp_pool_size < 1:
        raise ValueError(f"nsp_pool_size={nsp_pool_size!r} must be at least 1 (default {NSP_POOL_SIZE}).")
    chunk_length = _inputs_length(sequence_length, minimum=5) - 3
    chunks = text.split_token_stream(dataset, chunk_length).filter(lambda ex: tf.size(ex["targets"]) >= 2)
    pairs = _sentence_pairs(_draw_pair_choices(chunks), chunk_length, nsp_pool_size)

    def join(pair):
        a, b = pair["segment_a"], pair["segment_b"]
        return {
            "targets": tf.concat([cls, a, sep, b, sep], axis=0),
            "token_type_ids": tf.concat([tf.zeros([tf.size(a) + 2], tf.int32), tf.ones([tf.size(b) + 1], tf.int32)], 0),
            "next_sentence_label": pair["next_sentence_label"],
        }

    return pairs.map(join)


def _choose_tokens(is_candidate: tf.Tensor, word_ids: tf.Tensor, num_words: tf.Tensor, rate: float, seed: tf.Tensor):
    """Chooses `round(rate * candidates)` candidate tokens (at least 1) in whole units of `word_ids`.

    Words are taken in a random order while the running token count stays within the target (the
    first word always, so a sequence with a candidate gets at least one choice). With one word per
    token this is exactly the target count, uniformly at random.
    """
    num_candidates = tf.reduce_sum(tf.cast(is_candidate, tf.int32))
    target = tf.cast(tf.round(tf.cast(num_candidates, tf.float64) * rate), tf.int32)
    target = tf.where(num_candidates > 0, tf.maximum(target, 1), 0)
    word_is_candidate = tf.math.unsorted_segment_max(tf.cast(is_candidate, tf.int32), word_ids, num_words) > 0
    word_length = tf.math.unsorted_segment_sum(tf.ones_like(word_ids), word_ids, num_words)
    score = tf.random.stateless_uniform([num_words], seed)
    score = tf.where(word_is_candidate, score, 2.0)  # non-candidate words sort last
    order = tf.argsort(score, stable=True)
    running = tf.cumsum(tf.gather(word_length, order))
    in_order = tf.logical_and(
        tf.logical_or(running <= target, tf.range(num_words) == 0), tf.gather(word_is_candidate, order)
    )
    in_order = tf.logical_and(in_order, target > 0)
    word_chosen = tf.gather(in_order, tf.argsort(order))
    return tf.logical_and(tf.gather(word_chosen, word_ids), is_candidate)


@gin.configurable
@seqio.map_over_dataset(num_seeds=1)
def mlm_mask_tokens(
    features: Mapping[str, tf.Tensor],
    output_features: Mapping[str, seqio.Feature],
    seed: tf.Tensor,
    mask_rate: float = MASK_RATE,
    mask_token_fraction: float = MASK_TOKEN_FRACTION,
    random_token_fraction: float = RANDOM_TOKEN_FRACTION,
    whole_word_masking: bool = False,
) -> dict[str, tf.Tensor]:
    """Turns `{"targets": original ids}` into MLM `inputs` (corrupted) and `targets` (original at chosen, else 0).

    `round(mask_rate * n)` of the n text tokens (ordinary pieces and unk; never pad, eos, [CLS], [SEP]
    or another extra id) are chosen (at least one); each chosen token
    independently becomes [MASK] with probability `mask_token_fraction`, a uniformly random ordinary
    piece with `random_token_fraction`, else stays. `whole_word_masking` chooses whole words (a
    word starts at a piece beginning with '▁'), about the same number of tokens. Other features
    pass through.
    """
    if not 0.0 < mask_rate < 1.0:
        raise ValueError(f"mask_rate={mask_rate!r} must lie strictly between 0 and 1 (BERT uses 0.15).")
    if min(mask_token_fraction, random_token_fraction) < 0 or mask_token_fraction + random_token_fraction > 1:
        raise ValueError(
            f"mask_token_fraction={mask_token_fraction!r} and random_token_fraction={random_token_fraction!r} must be "
            "non-negative with a sum of at most 1 (BERT: 0.8 and 0.1)."
        )
    vocabulary = output_features["targets"].vocabulary
    ids = special_tokens.bert_special_ids(vocabulary)
    low, high = special_tokens.ordinary_id_range(vocabulary)
    tokens = features["targets"]
    is_candidate = tf.logical_and(tokens >= low, tokens < high)
    if vocabulary.unk_id is not None:
        is_candidate = tf.logical_or(is_candidate, tf.equal(tokens, vocabulary.unk_id))
    choose_seed, action_seed, random_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    if whole_word_masking:
        starts = tf.gather(special_tokens.word_start_table(vocabulary), tokens)
        after_special = tf.concat([[True], tf.logical_not(is_candidate[:-1])], axis=0)
        starts = tf.logical_or(tf.logical_or(starts, after_special), tf.logical_not(is_candidate))
        word_ids = tf.cumsum(tf.cast(starts, tf.int32)) - 1
    else:
        word_ids = tf.range(tf.size(tokens))
    num_words = tf.reduce_max(tf.concat([word_ids, [-1]], axis=0)) + 1
    chosen = _choose_tokens(is_candidate, word_ids, num_words, mask_rate, choose_seed)
    action = tf.random.stateless_uniform(tf.shape(tokens), action_seed)
    random_tokens = tf.random.stateless_uniform(tf.shape(tokens), random_seed, minval=low, maxval=high, dtype=tokens.dtype)
    corrupted = tf.where(action < mask_token_fraction + random_token_fraction, random_tokens, tokens)
    corrupted = tf.where(action < mask_token_fraction, tf.cast(ids.mask, tokens.dtype), corrupted)
    return {
        **features,
        "inputs": tf.where(chosen, corrupted, tokens),
        "targets": tf.where(chosen, tokens, tf.zeros_like(tokens)),
    }


def mlm_preprocessors(
    next_sentence_prediction: bool | None = None, whole_word_masking: bool | None = None
) -> list[Callable[..., tf.data.Dataset]]:
    """The preprocessors of an MLM task over a `text` field: rekey, tokenize, cache placeholder, pack, mask.

    Values passed here are bound; None leaves them to gin (`pack_mlm_sequences.next_sentence_prediction`,
    `mlm_mask_tokens.whole_word_masking`, ...) or the defaults (no NSP, token-level masking).
    """
    pack_args = {} if next_sentence_prediction is None else {"next_sentence_prediction": next_sentence_prediction}
    mask_args = {} if whole_word_masking is None else {"whole_word_masking": whole_word_masking}
    return [
        *text.tokenize_text(),
        functools.partial(pack_mlm_sequences, **pack_args),
        functools.partial(mlm_mask_tokens, **mask_args),
    ]
