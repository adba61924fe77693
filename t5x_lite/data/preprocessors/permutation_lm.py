"""XLNet's permutation language-modelling objective as SeqIO preprocessors.

Documents are packed into chunks exactly as for the causal LM (`lm.pack_lm_chunks`: each document
followed by EOS, the stream cut into `sequence_length["targets"]`-token chunks). Then every chunk of
n tokens draws a factorization order, a uniformly random permutation of its positions (stateless,
from the task's seed, drawn anew every epoch since it runs after the cache placeholder), and gets:

  targets:            the chunk's tokens, unchanged (the model reads them and predicts them)
  factorization_rank: [n] int32, the place of each position in the order (a permutation of 0..n-1)
  predicted:          [n] int32, 1 at the positions whose rank is among the last `num_predicted(n, K)`

Partial prediction (XLNet, Yang et al. 2019, section 2.3): only the last ~n/K tokens of the order
are predicted, each from the tokens before it in the order; K = 6 in the paper's runs, so about 1/6 of
the tokens. `factorization_rank` and `predicted` are not declared output features (their lengths follow
`targets`, so TASK_FEATURE_LENGTHS stays `{'targets': L}`); a seqio Mixture keeps only output
features, so train the task itself. Use `PermutationLMFeatureConverter` (`t5x_lite.data.feature_converters`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import gin
import seqio
import tensorflow as tf

from t5x_lite.data.preprocessors import lm, text

PARTIAL_PREDICTION_K = 6.0  # XLNet's K: predict the last n/K tokens of each order


def num_predicted(length: tf.Tensor | int, partial_prediction_k: float = PARTIAL_PREDICTION_K) -> tf.Tensor:
    """How many of `length` tokens are predicted: floor(length / K), at least 1 (K = 1: all of them; the
    first token of an order is predicted from its position alone)."""
    length = tf.convert_to_tensor(length, tf.int32)
    wanted = tf.cast(tf.math.floor(tf.cast(length, tf.float32) / partial_prediction_k), tf.int32)
    return tf.clip_by_value(wanted, tf.minimum(1, length), length)


@seqio.map_over_dataset(num_seeds=1)
def _add_random_order(features: Mapping[str, tf.Tensor], seed: tf.Tensor, partial_prediction_k: float) -> dict:
    """One chunk's random order and predicted positions (see `permute_factorization_order`)."""
    tokens = features["targets"]
    n = tf.size(tokens)
    order = tf.argsort(tf.random.stateless_uniform([n], seed))  # order[r] = the position at rank r
    rank = tf.math.invert_permutation(order)
    predicted = tf.cast(rank >= n - num_predicted(n, partial_prediction_k), tf.int32)
    return {**features, "factorization_rank": tf.cast(rank, tf.int32), "predicted": predicted}


@gin.configurable
def permute_factorization_order(
    dataset: tf.data.Dataset, partial_prediction_k: float = PARTIAL_PREDICTION_K
) -> tf.data.Dataset:
    """Adds to every example a uniformly random factorization order of `targets` (`factorization_rank`) and the
    positions it predicts (`predicted`: the last `num_predicted(n, K)` of the order); see the module docstring.
    The seed comes from seqio's map seed manager (the task's seed), so orders are reproducible."""
    if not partial_prediction_k >= 1.0:  # checked here, outside the traced map, so the error stays one line
        raise ValueError(
            f"permutation LM: partial_prediction_k={partial_prediction_k!r} must be >= 1 (the predicted share "
            "is 1/K of the tokens; XLNet uses 6)."
        )
    return _add_random_order(dataset, partial_prediction_k=partial_prediction_k)


def permutation_lm_preprocessors() -> list[Callable[..., tf.data.Dataset]]:
    """Permutation LM over a `text` field: rekey, tokenize, cache placeholder, pack, random order."""
    return [*text.tokenize_text(), lm.pack_lm_chunks, permute_factorization_order]
