"""AANG's objective space (Dery et al. 2022) as text-to-text SeqIO preprocessors: D x T x R x O.

An auxiliary objective is one option per stage:

  D (data)            task: the end task's inputs | domain: in-domain text | general: the bundled corpus
  T (transform)       none | mask: BERT-op (15% chosen; 80% [MASK], 10% random, 10% kept) |
                      replace: the 15% chosen all random | span: T5 span corruption (sentinels)
  R (representation)  bi: bidirectional | l2r: left-to-right | r2l: right-to-left |
                      rand: random-factorized (a random order per example)
  O (output)          denoise: the original tokens | next: the next tokens | task: the end task's own targets

Every combination is a text-to-text example of fixed feature lengths (`inputs`, `targets`, each ending in EOS)
plus `representation` (a scalar, R's index in `REPRESENTATIONS`) and `attention_rank` ([len(inputs)] int32: the
place of each input position in R's reading order; the encoder lets position q attend to key k iff
rank[k] <= rank[q], so bi is all zeros, l2r 0..n-1, r2l n-1..0, rand a random permutation):

  denoise, T = mask/replace   inputs = T(chunk)              targets = chunk (the whole text, reconstructed)
  denoise, T = span           inputs = chunk, spans -> sentinels   targets = sentinels and their spans (T5's)
  next, R = l2r               inputs = T(chunk[:s])          targets = chunk[s:] (the tokens that follow)
  next, R = r2l               inputs = T(chunk[s:])          targets = chunk[:s] reversed (those that precede)
  task                        inputs, targets = the end task's example

`objective_stages` names the options and holds the rules that drop the combinations that make no sense. All
randomness is stateless and seeded by SeqIO, drawn after the cache placeholder (new noise every epoch).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import seqio
import tensorflow as tf

from t5x_lite.data import special_tokens
from t5x_lite.data.objective_stages import REPRESENTATIONS, Combination
from t5x_lite.data.preprocessors import lm, span_corruption, text

CHOSEN_RATE = 0.15  # BERT's share of chosen tokens, for mask and replace
MASK_FRACTION, RANDOM_FRACTION = 0.8, 0.1  # BERT-op: of the chosen, [MASK] / random / kept = 80 / 10 / 10


# ------------------------------------------------------------------ transforms (T) and outputs (O) on one chunk


def choose_positions(length: tf.Tensor, seed: tf.Tensor, rate: float = CHOSEN_RATE) -> tf.Tensor:
    """A bool [length] mask with round(rate * length) positions (at least one of a non-empty chunk), uniformly."""
    count = tf.maximum(tf.cast(tf.round(tf.cast(length, tf.float64) * rate), tf.int32), tf.minimum(length, 1))
    ranks = tf.math.invert_permutation(tf.argsort(tf.random.stateless_uniform([length], seed)))
    return ranks < count


def corrupt_tokens(tokens: tf.Tensor, transform: str, seed: tf.Tensor, vocabulary: seqio.Vocabulary) -> tf.Tensor:
    """`tokens` under T = none, mask (BERT-op) or replace (every chosen token random); same length."""
    if transform == "none":
        return tokens
    choose_seed, action_seed, random_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    chosen = choose_positions(tf.size(tokens), choose_seed)
    low, high = special_tokens.ordinary_id_range(vocabulary)
    random_tokens = tf.random.stateless_uniform(tf.shape(tokens), random_seed, low, high, dtype=tokens.dtype)
    if transform == "replace":
        return tf.where(chosen, random_tokens, tokens)
    action = tf.random.stateless_uniform(tf.shape(tokens), action_seed)
    mask_id = tf.cast(special_tokens.bert_special_ids(vocabulary).mask, tokens.dtype)
    corrupted = tf.where(action < MASK_FRACTION + RANDOM_FRACTION, random_tokens, tokens)
    corrupted = tf.where(action < MASK_FRACTION, mask_id, corrupted)
    return tf.where(chosen, corrupted, tokens)


def make_example(
    tokens: tf.Tensor, combination: Combination, seed: tf.Tensor, vocabulary: seqio.Vocabulary,
    inputs_budget: int, targets_budget: int,
) -> tuple[tf.Tensor, tf.Tensor]:
    """`(inputs, targets)` without EOS of one chunk under the combination's T and O (O != task); the budgets are
    the tokens each side holds besides EOS (only `next` uses them: where to split)."""
    transform_seed, split_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if combination.transform == "span":
        is_noise = span_corruption.random_noise_mask(tf.size(tokens), transform_seed)
        return span_corruption.corrupt_spans(tokens, is_noise, vocabulary.vocab_size)
    if combination.output == "denoise":
        return corrupt_tokens(tokens, combination.transform, transform_seed, vocabulary), tokens
    if combination.representation == "l2r":
        split = lm.random_split_point(tf.size(tokens), inputs_budget, targets_budget, split_seed)
        return corrupt_tokens(tokens[:split], combination.transform, transform_seed, vocabulary), tokens[split:]
    split = lm.random_split_point(tf.size(tokens), targets_budget, inputs_budget, split_seed)
    return corrupt_tokens(tokens[split:], combination.transform, transform_seed, vocabulary), tf.reverse(tokens[:split], [0])


def attention_rank(length: tf.Tensor, representation: str, seed: tf.Tensor) -> tf.Tensor:
    """[length] int32: each position's place in R's reading order (see the module docstring)."""
    positions = tf.range(length, dtype=tf.int32)
    if representation == "bi":
        return tf.zeros_like(positions)
    if representation == "l2r":
        return positions
    if representation == "r2l":
        return length - 1 - positions
    return tf.math.invert_permutation(tf.argsort(tf.random.stateless_uniform([length], seed)))


# ------------------------------------------------------------------ the preprocessors


def _budgets(sequence_length: Mapping[str, int] | None) -> tuple[int, int]:
    """(inputs, targets) tokens besides EOS."""
    if not sequence_length or not sequence_length.get("inputs") or not sequence_length.get("targets"):
        raise ValueError(f"The objective space needs sequence_length['inputs'] and ['targets'] (got "
                         f"{sequence_length!r}); set both in TASK_FEATURE_LENGTHS.")
    return sequence_length["inputs"] - 1, sequence_length["targets"] - 1


def chunk_length(combination: Combination, sequence_length: Mapping[str, int] | None) -> int:
    """Raw tokens per chunk so that the combination's inputs and targets fill (never overflow) their lengths."""
    inputs_budget, targets_budget = _budgets(sequence_length)
    if combination.transform == "span":
        length, targets_length = span_corruption.random_spans_lengths(inputs_budget + 1)
        if targets_length > targets_budget + 1:
            raise ValueError(f"objective {combination.name}: span corruption of {inputs_budget + 1} input tokens "
                             f"makes targets of {targets_length} tokens; set TASK_FEATURE_LENGTHS['targets'] to at "
                             f"least {targets_length}.")
        return length
    if combination.output == "denoise":
        return min(inputs_budget, targets_budget)
    return inputs_budget + targets_budget


def pack_chunks(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None, combination: Combination
                ) -> tf.data.Dataset:
    """The `targets` token stream (documents concatenated, as in T5) cut into `chunk_length` chunks; a last chunk
    under 2 tokens is dropped (nothing to split or corrupt)."""
    chunks = text.split_token_stream(dataset, chunk_length(combination, sequence_length))
    return chunks.filter(lambda ex: tf.size(ex["targets"]) >= 2)


def apply_combination(
    dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None,
    output_features: Mapping[str, seqio.Feature], combination: Combination,
) -> tf.data.Dataset:
    """`{"targets": chunk}` -> the combination's `inputs` and `targets` (no EOS yet)."""
    vocabulary = output_features["targets"].vocabulary
    inputs_budget, targets_budget = _budgets(sequence_length)

    @seqio.map_over_dataset(num_seeds=1)
    def apply(features: Mapping[str, tf.Tensor], seed: tf.Tensor) -> dict[str, tf.Tensor]:
        inputs, targets = make_example(features["targets"], combination, seed, vocabulary, inputs_budget,
                                       targets_budget)
        return {"inputs": inputs, "targets": targets}

    return apply(dataset)


def add_representation(dataset: tf.data.Dataset, representation: str) -> tf.data.Dataset:
    """Adds `representation` (R's index) and `attention_rank` over the final `inputs` (EOS included)."""
    index = REPRESENTATIONS.index(representation)

    @seqio.map_over_dataset(num_seeds=1)
    def add(features: Mapping[str, tf.Tensor], seed: tf.Tensor) -> dict[str, tf.Tensor]:
        rank = attention_rank(tf.size(features["inputs"]), representation, seed)
        return {**features, "representation": tf.constant(index, tf.int32), "attention_rank": rank}

    return add(dataset)


def text_preprocessors(combination: Combination) -> list[Callable[..., tf.data.Dataset]]:
    """The preprocessors of a combination with O != task over `{"text": ...}` examples: tokenize, cache
    placeholder, pack, transform + output, EOS, representation."""
    return [
        *text.tokenize_text(),
        functools.partial(pack_chunks, combination=combination),
        functools.partial(apply_combination, combination=combination),
        seqio.preprocessors.append_eos_after_trim,
        functools.partial(add_representation, representation=combination.representation),
    ]


def task_output_preprocessors(combination: Combination) -> list[Callable[..., tf.data.Dataset]]:
    """The preprocessors of a combination with O = task over the end task's `{"inputs", "targets"}` strings:
    tokenize, fit to the lengths (EOS), representation."""
    return [
        seqio.preprocessors.tokenize,
        text.fit_to_length,
        functools.partial(add_representation, representation=combination.representation),
    ]
