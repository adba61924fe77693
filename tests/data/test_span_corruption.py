"""Tests of the span-corruption objective (t5x_lite/data/preprocessors/span_corruption.py)."""

import itertools
import math
import uuid

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5x_lite.data.preprocessors import span_corruption

VOCAB_SIZE = 1000
# Plain tokens stay below this, so anything at or above it is a sentinel.
MAX_TOKEN = 900
PASS_THROUGH = seqio.PassThroughVocabulary(size=VOCAB_SIZE)
OUTPUT_FEATURES = {"inputs": seqio.Feature(PASS_THROUGH), "targets": seqio.Feature(PASS_THROUGH)}


def _brief_lengths(tokens_length, noise_density, mean_noise_span_length):
    """The length arithmetic as T5 states it, written independently."""
    num_noise = round(tokens_length * noise_density)
    num_spans = max(round(num_noise / mean_noise_span_length), 1)
    num_nonnoise = tokens_length - num_noise
    return num_nonnoise + num_spans + 1, num_noise + num_spans + 1


def _noise_masks(length, num_masks, noise_density=0.15, mean_noise_span_length=3.0):
    """[num_masks, length] bool array of masks with seeds (i, 7), i < num_masks."""
    ds = tf.data.Dataset.range(num_masks).map(
        lambda i: span_corruption.random_noise_mask(length, tf.stack([i, 7]), noise_density, mean_noise_span_length)
    )
    return next(iter(ds.batch(num_masks))).numpy()


def _segment_lengths(mask):
    """Lengths of the maximal runs of equal values in a 1-D bool array."""
    boundaries = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    return np.diff(np.concatenate([[0], boundaries, [len(mask)]]))


def _corrupt(sequences, map_seed=0, **noise_args):
    """Runs `span_corruption` over 1-D token arrays; returns numpy dicts."""
    ds = tf.data.Dataset.from_tensor_slices(tf.ragged.constant([list(s) for s in sequences], dtype=tf.int32))
    ds = ds.map(lambda tokens: {"targets": tokens})
    with seqio.utils.map_seed_manager(map_seed):
        ds = span_corruption.span_corruption(ds, output_features=OUTPUT_FEATURES, **noise_args)
    return [{k: v.numpy() for k, v in ex.items()} for ex in ds]


def _uncorrupt(inputs, targets, min_sentinel=MAX_TOKEN):
    """Puts each sentinel's span from `targets` back in its place in `inputs`."""
    spans, sentinel = {}, None
    for token in targets:
        if token >= min_sentinel:
            sentinel = token
            spans[sentinel] = []
        else:
            spans[sentinel].append(token)
    restored = []
    for token in inputs:
        restored.extend(spans.get(token, [token]))
    return restored


def _random_sequences(num, min_length, max_length, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, MAX_TOKEN, size=rng.integers(min_length, max_length + 1)) for _ in range(num)]


def test_random_spans_lengths_t5_value():
    assert span_corruption.random_spans_lengths(512) == (568, 114)


@pytest.mark.parametrize("inputs_length", [16, 64, 100, 128, 512, 1024, 2048])
@pytest.mark.parametrize("noise_density,mean_noise_span_length", [(0.15, 3.0), (0.3, 2.0), (0.5, 8.0)])
def test_random_spans_lengths_matches_brute_force(inputs_length, noise_density, mean_noise_span_length):
    fitting = [
        n
        for n in range(4, 4 * inputs_length)
        if _brief_lengths(n, noise_density, mean_noise_span_length)[0] <= inputs_length
    ]
    expected = (fitting[-1], _brief_lengths(fitting[-1], noise_density, mean_noise_span_length)[1])
    assert span_corruption.random_spans_lengths(inputs_length, noise_density, mean_noise_span_length) == expected


@pytest.mark.parametrize("inputs_length", [3, 5, 64, 512])
def test_corrupted_lengths_are_exactly_the_predicted_lengths(inputs_length):
    tokens_length, targets_length = span_corruption.random_spans_lengths(inputs_length)
    for ex in _corrupt(_random_sequences(20, tokens_length, tokens_length)):
        assert len(ex["inputs"]) + 1 == inputs_length  # + EOS
        assert len(ex["targets"]) + 1 == targets_length


@pytest.mark.parametrize(
    "kwargs",
    [
        {"inputs_length": 2},
        {"inputs_length": 0},
        {"inputs_length": -5},
        {"inputs_length": 512, "noise_density": 0.0},
        {"inputs_length": 512, "noise_density": 1.0},
        {"inputs_length": 512, "noise_density": -0.1},
        {"inputs_length": 512, "noise_density": 1.5},
        {"inputs_length": 512, "mean_noise_span_length": 0.5},
    ],
)
def test_random_spans_lengths_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="inputs_length|noise_density|mean_noise_span_length"):
        span_corruption.random_spans_lengths(**kwargs)


@pytest.mark.parametrize("noise_density,mean_noise_span_length", [(0.15, 3.0), (0.3, 2.0), (0.5, 8.0)])
def test_mask_counts_match_length_arithmetic(noise_density, mean_noise_span_length):
    """The TF mask and the Python length arithmetic agree for every length."""
    for length in range(0, 1200, 7):
        mask = span_corruption.random_noise_mask(
            length, tf.constant([length, 1]), noise_density, mean_noise_span_length
        ).numpy()
        num_noise, num_spans = span_corruption.noise_counts(length, noise_density, mean_noise_span_length)
        assert mask.shape == (length,)
        assert mask.sum() == num_noise
        assert len(_segment_lengths(mask)[1::2]) == num_spans


def _composition_part_pmf(total, parts, size):
    """P(one part == size) when `total` is split uniformly into `parts` positive parts."""
    return math.comb(total - size - 1, parts - 2) / math.comb(total - 1, parts - 1)


def test_noise_statistics_over_many_sequences():
    length, num_masks = 568, 2000
    masks = _noise_masks(length, num_masks)
    noise_fraction = masks.mean()
    noise_spans, nonnoise_spans = [], []
    for mask in masks:
        segments = _segment_lengths(mask)
        nonnoise_spans.extend(segments[0::2])
        noise_spans.extend(segments[1::2])
    noise_spans, nonnoise_spans = np.array(noise_spans), np.array(nonnoise_spans)
    print(
        f"noise fraction {noise_fraction:.5f}, mean noise span {noise_spans.mean():.4f}, "
        f"spans per sequence {len(noise_spans) / num_masks}"
    )
    assert abs(noise_fraction - 0.15) < 0.002
    assert abs(noise_spans.mean() - 3.0) < 0.05
    assert len({mask.tobytes() for mask in masks}) == num_masks
    # Span lengths follow the uniform-composition law, e.g. P(noise span == 1)
    # = C(83, 26) / C(84, 27) ~ 0.32 for 85 noise tokens in 28 spans.
    num_noise, num_spans = span_corruption.noise_counts(length, 0.15, 3.0)
    for spans, total in [(noise_spans, num_noise), (nonnoise_spans, length - num_noise)]:
        for size in range(1, 8):
            expected = _composition_part_pmf(total, num_spans, size)
            assert abs(np.mean(spans == size) - expected) < 0.01, (total, size)
    # Segments run non-noise, noise, ..., noise: the ends are pinned, the middle
    # is noise at about the overall rate.
    assert not masks[:, 0].any() and masks[:, -1].all()
    per_position = masks[:, 60:-60].mean(axis=0)
    assert np.abs(np.convolve(per_position, np.ones(50) / 50, "valid") - 0.15).max() < 0.015


def test_sentinels_count_down_from_last_id_and_uncorrupt_to_original():
    sequences = _random_sequences(300, 1, 600)
    for original, ex in zip(sequences, _corrupt(sequences)):
        input_sentinels = ex["inputs"][ex["inputs"] >= MAX_TOKEN]
        target_sentinels = ex["targets"][ex["targets"] >= MAX_TOKEN]
        expected = VOCAB_SIZE - 1 - np.arange(len(input_sentinels))
        np.testing.assert_array_equal(input_sentinels, expected)
        np.testing.assert_array_equal(target_sentinels, expected)
        if len(ex["targets"]):
            assert ex["targets"][0] == VOCAB_SIZE - 1
        assert _uncorrupt(ex["inputs"], ex["targets"]) == list(original)


def test_same_seed_same_output_different_seed_different_output():
    sequences = _random_sequences(30, 100, 200)
    first, again, other = _corrupt(sequences, 3), _corrupt(sequences, 3), _corrupt(sequences, 5)
    for a, b, c in zip(first, again, other):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["targets"], b["targets"])
    assert sum(not np.array_equal(a["inputs"], c["inputs"]) for a, c in zip(first, other)) >= 28
    # Each example of a dataset gets its own seed too.
    repeated = _corrupt([sequences[0]] * 30)
    assert len({ex["inputs"].tobytes() for ex in repeated}) == 30


def test_short_sequences():
    sequences = [[5], [5, 6], [5, 6, 7], [5, 6, 7, 8], [5, 6, 7, 8, 9], []]
    for original, ex in zip(sequences, _corrupt(sequences)):
        assert _uncorrupt(ex["inputs"], ex["targets"]) == original
        if len(original) >= 1:
            assert (ex["inputs"] < MAX_TOKEN).sum() >= 1, "keeps a non-noise token"
        if len(original) >= 2:
            assert list(ex["targets"][:1]) == [VOCAB_SIZE - 1], "corrupts one span"


@pytest.mark.parametrize(
    "document_lengths,chunk_lengths",
    [
        ([0, 70, 0, 140, 5], [70, 70, 70, 5]),
        ([30, 40, 69, 71], [70, 70, 70]),
        ([3, 4], [7]),
        ([0], []),
    ],
)
def test_packing_concatenates_and_splits_the_stream(document_lengths, chunk_lengths):
    starts = np.cumsum([0] + document_lengths)
    documents = [list(range(a, b)) for a, b in itertools.pairwise(starts)]
    ds = tf.data.Dataset.from_tensor_slices(
        {"targets": tf.ragged.constant(documents, dtype=tf.int32), "targets_pretokenized": [str(d) for d in documents]}
    )
    chunks = [
        ex["targets"].numpy() for ex in span_corruption.pack_tokens_for_span_corruption(ds, {"inputs": 64, "targets": 16})
    ]
    assert [len(c) for c in chunks] == chunk_lengths  # 64 -> 70 raw tokens
    assert np.concatenate([[]] + chunks).tolist() == list(range(sum(document_lengths)))
    with pytest.raises(ValueError, match="sequence_length"):
        span_corruption.pack_tokens_for_span_corruption(ds, None)


def test_too_few_extra_ids_fails_loudly():
    vocabulary = seqio.ByteVocabulary(extra_ids=3)
    features = {"targets": seqio.Feature(vocabulary)}
    ds = tf.data.Dataset.from_tensors({"targets": tf.range(3, 200, dtype=tf.int32)})
    with pytest.raises(tf.errors.InvalidArgumentError, match="extra ids"):
        next(iter(span_corruption.span_corruption(ds, output_features=features)))


def test_gin_binding_changes_noise_density():
    sequences = _random_sequences(50, 400, 400)
    gin.parse_config("span_corruption.noise_density = 0.5")
    try:
        corrupted = _corrupt(sequences)
    finally:
        gin.clear_config()
    assert all((ex["targets"] < MAX_TOKEN).sum() == 200 for ex in corrupted)


@pytest.fixture
def span_corruption_task(request):
    noise_args = request.param
    lines = [" ".join(f"w{(i * 7 + j) % 97}" for j in range(i % 40 + 1)) for i in range(300)]

    def dataset_fn(split, shuffle_files, seed=None):
        del split, shuffle_files, seed
        return tf.data.Dataset.from_tensor_slices({"text": lines})

    vocabulary = seqio.ByteVocabulary(extra_ids=100)
    name = f"test_span_corruption_{uuid.uuid4().hex}"
    task = seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
        preprocessors=span_corruption.span_corruption_preprocessors(**noise_args),
        output_features={"inputs": seqio.Feature(vocabulary), "targets": seqio.Feature(vocabulary)},
    )
    try:
        yield task, lines, noise_args
    finally:
        seqio.TaskRegistry.remove(name)


@pytest.mark.parametrize(
    "span_corruption_task", [{}, {"noise_density": 0.3, "mean_noise_span_length": 2.0}], indirect=True
)
def test_end_to_end_through_seqio(span_corruption_task):
    task, lines, noise_args = span_corruption_task
    vocabulary = task.output_features["targets"].vocabulary
    _, targets_length = span_corruption.random_spans_lengths(64, **noise_args)
    lengths = {"inputs": 64, "targets": max(16, targets_length)}

    def examples(seed):
        ds = task.get_dataset(lengths, split="train", shuffle=False, seed=seed)
        return [{k: v.numpy() for k, v in ex.items()} for ex in ds]

    first = examples(seed=11)
    assert len(first) > 10
    for ex in first:
        assert len(ex["inputs"]) <= 64 and ex["inputs"][-1] == vocabulary.eos_id
        assert len(ex["targets"]) <= lengths["targets"]
        assert ex["targets"][-1] == vocabulary.eos_id
    assert all(len(ex["inputs"]) == 64 for ex in first[:-1])
    assert all(len(ex["targets"]) == targets_length for ex in first[:-1])
    # The examples un-corrupt to the whole token stream, in order.
    stream = [
        t
        for ex in first
        for t in _uncorrupt(
            ex["inputs"][:-1], ex["targets"][:-1], min_sentinel=vocabulary.vocab_size - vocabulary.extra_ids
        )
    ]
    assert stream == [t for line in lines for t in vocabulary.encode(line)]
    again, other = examples(seed=11), examples(seed=12)
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, again))
    assert not all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other))
