"""Tests of the permutation-LM objective: its preprocessor (the order, the seed, the predicted share), its
feature converter and its registered task.

Statistical bounds are about 4-5 standard errors of the checked estimate (stated at each check), so a correct
implementation fails them with probability well under 1e-4; the seeds are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import seqio
import tensorflow as tf

import t5x_lite.tasks  # noqa: F401  (registers the bundled tasks these tests read)
from t5x_lite.data import pipeline
from t5x_lite.data.feature_converters import PermutationLMFeatureConverter
from t5x_lite.data.preprocessors import permutation_lm


def _dataset(lengths, seed=0) -> tf.data.Dataset:
    rng = np.random.default_rng(seed)
    flat = rng.integers(3, 8000, size=sum(lengths)).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices(tf.RaggedTensor.from_row_lengths(flat, lengths)).map(
        lambda tokens: {"targets": tokens}
    )


def _permuted(lengths, map_seed=0, **kwargs) -> list[dict[str, np.ndarray]]:
    with seqio.utils.map_seed_manager(map_seed):
        ds = permutation_lm.permute_factorization_order(_dataset(lengths), **kwargs)
    return list(ds.as_numpy_iterator())


def test_order_is_a_permutation_and_tokens_are_unchanged():
    lengths = [1, 2, 7, 64, 128, 5]
    examples = _permuted(lengths)
    originals = list(_dataset(lengths).as_numpy_iterator())
    for n, ex, original in zip(lengths, examples, originals):
        assert sorted(ex["factorization_rank"]) == list(range(n))
        np.testing.assert_array_equal(ex["targets"], original["targets"])
        assert ex["factorization_rank"].dtype == np.int32 and ex["predicted"].dtype == np.int32


def test_order_is_seeded():
    lengths = [32] * 20
    first, again, other = _permuted(lengths, 3), _permuted(lengths, 3), _permuted(lengths, 4)
    ranks = [np.stack([ex["factorization_rank"] for ex in run]) for run in (first, again, other)]
    np.testing.assert_array_equal(ranks[0], ranks[1])
    assert (ranks[0] != ranks[2]).any(axis=1).all()  # every one of 20 orders of 32 differs under another seed
    assert len({tuple(r) for r in ranks[0]}) == 20  # and the examples of one run differ from each other


def test_order_is_uniform():
    """Each position is equally likely at each rank: over 4000 orders of 6, every (position, rank) cell holds
    4000/6 = 666.7 expected counts (sd sqrt(4000 * 1/6 * 5/6) = 23.6); bound 5 sd. And no rank ties with the
    identity more often than chance: the mean number of fixed points of a uniform permutation is 1."""
    examples = _permuted([6] * 4000, 11)
    ranks = np.stack([ex["factorization_rank"] for ex in examples])
    counts = np.zeros((6, 6))
    for position in range(6):
        counts[position] = np.bincount(ranks[:, position], minlength=6)
    assert np.abs(counts - 4000 / 6).max() < 5 * math.sqrt(4000 * (1 / 6) * (5 / 6))
    fixed = (ranks == np.arange(6)).sum(axis=1)
    assert abs(fixed.mean() - 1.0) < 5 * 1.0 / math.sqrt(4000)  # variance of the fixed-point count is 1


@pytest.mark.parametrize("k", [6.0, 7.0, 4.0, 1.0])
def test_predicted_share_follows_k_and_is_the_end_of_the_order(k):
    lengths = [128, 100, 64, 31, 7, 2, 1]
    for n, ex in zip(lengths, _permuted(lengths, partial_prediction_k=k)):
        expected = min(max(math.floor(n / k), 1), n)
        assert ex["predicted"].sum() == expected == int(permutation_lm.num_predicted(n, k))
        # The predicted positions are exactly the last `expected` of the order.
        assert set(np.flatnonzero(ex["predicted"])) == set(np.flatnonzero(ex["factorization_rank"] >= n - expected))
    if k == 6.0:  # the paper's K: 21 of 128 tokens, 1/6 of them up to the floor
        assert int(permutation_lm.num_predicted(128)) == 21


def test_a_k_below_one_is_refused():
    with pytest.raises(ValueError, match=r"partial_prediction_k=0.5 must be >= 1"):
        _permuted([8], partial_prediction_k=0.5)


@pytest.mark.parametrize("pack", [True, False])
def test_bundled_task_gives_permutation_batches(pack):
    ds = pipeline.get_dataset("bundled_permutation_lm", {"targets": 32}, 8, PermutationLMFeatureConverter,
                              split="validation", shuffle=False, seed=1)
    if not pack:
        task = seqio.get_mixture_or_task("bundled_permutation_lm")
        raw = task.get_dataset({"targets": 32}, split="validation", shuffle=False, seed=1)
        ds = PermutationLMFeatureConverter(pack=False)(raw, {"targets": 32}).batch(8)
    batch = next(ds.as_numpy_iterator())
    expected = {"decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights", "decoder_factorization_rank"}
    assert set(batch) == expected | ({"decoder_segment_ids", "decoder_positions"} if pack else set())
    np.testing.assert_array_equal(batch["decoder_input_tokens"], batch["decoder_target_tokens"])  # no shift
    segments = batch.get("decoder_segment_ids", (batch["decoder_input_tokens"] > 0).astype(np.int32))
    for row in range(8):
        for segment in set(segments[row]) - {0}:
            where = segments[row] == segment
            ranks, weights = batch["decoder_factorization_rank"][row][where], batch["decoder_loss_weights"][row][where]
            n = int(where.sum())
            assert sorted(ranks) == list(range(n))
            assert weights.sum() == int(permutation_lm.num_predicted(n)) and (weights[ranks < n - weights.sum()] == 0).all()
        assert (batch["decoder_loss_weights"][row][segments[row] == 0] == 0).all()


def test_converter_names_the_task_it_needs():
    task = seqio.get_mixture_or_task("bundled_lm")
    raw = task.get_dataset({"targets": 16}, split="validation", shuffle=False)
    with pytest.raises(ValueError, match=r"needs the features \['factorization_rank', 'predicted'\]"):
        PermutationLMFeatureConverter(pack=True)(raw, {"targets": 16})
