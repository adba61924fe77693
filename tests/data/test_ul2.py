"""Tests of UL2's mixture of denoisers (`preprocessors.ul2`) and its bundled tasks.

Statistical bounds are about 4.5 standard errors of the checked estimate (stated at each check), so a
correct implementation fails them with probability well under 1e-4; the seeds are fixed, so the tests
are deterministic.
"""

from __future__ import annotations

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

import t5x_lite.tasks  # noqa: F401  (registers the bundled tasks these tests read)
from t5x_lite.data import pipeline, sources, special_tokens, vocab
from t5x_lite.data.preprocessors import span_corruption, ul2

VOCAB = vocab.get_vocabulary()
WIDE = vocab.get_vocabulary(extra_ids=512)  # sentinels for 2048-token chunks at rate 0.5; mode tokens 8000-8002 too
NLU, NLG, S2S = 8000, 8001, 8002
MODE_IDS = {"R": NLU, "X": NLG, "S": S2S}
LOW, HIGH = 3, 8000  # ordinary pieces of the bundled vocabulary
ENC_DEC = {"inputs": seqio.Feature(VOCAB, add_eos=True), "targets": seqio.Feature(VOCAB, add_eos=True)}


def _denoise_many(length: int, num: int, denoisers=ul2.UL2_DENOISERS, rates=None, seed=0, vocabulary=VOCAB):
    """`num` random chunks of `length` ordinary tokens through `ul2.denoise`: (tokens, inputs, targets, index)."""
    mixture, probabilities = ul2.ul2_mixture(denoisers, rates)
    tokens = np.random.default_rng(seed).integers(LOW, HIGH, size=(num, length), dtype=np.int32)

    def one(row, i):
        inputs, targets, index = ul2.denoise(row, tf.stack([i, seed]), vocabulary, length, length, mixture,
                                             probabilities)
        return {"inputs": inputs, "targets": targets, "index": index, "n_in": tf.size(inputs), "n_t": tf.size(targets)}

    ds = tf.data.Dataset.from_tensor_slices((tokens, tf.range(num))).map(one)
    batch = next(ds.padded_batch(num).as_numpy_iterator())
    inputs = [row[:n] for row, n in zip(batch["inputs"], batch["n_in"])]
    targets = [row[:n] for row, n in zip(batch["targets"], batch["n_t"])]
    return tokens, inputs, targets, batch["index"], mixture


def _uncorrupt(inputs: np.ndarray, targets: np.ndarray) -> list[int]:
    """The original tokens of span-corrupted `inputs` (mode token removed) and `targets`."""
    spans, current = {}, None
    for t in targets:
        if t >= HIGH:
            current = int(t)
            spans[current] = []
        else:
            spans[current].append(int(t))
    return [t for i in inputs for t in (spans[int(i)] if i >= HIGH else [int(i)])]


def _span_lengths(targets: np.ndarray) -> list[int]:
    starts = np.flatnonzero(targets >= HIGH)
    return list(np.diff(np.append(starts, len(targets))) - 1)


# ---------------------------------------------------------------- mode tokens and the mixture


def test_mode_tokens_are_the_lowest_extra_ids():
    assert special_tokens.ul2_mode_ids(VOCAB) == {"[NLU]": NLU, "[NLG]": NLG, "[S2S]": S2S}
    assert VOCAB.decode([NLU, NLG, S2S]) == "<extra_id_99> <extra_id_98> <extra_id_97>"
    assert ul2.num_sentinels(VOCAB) == 97
    with pytest.raises(ValueError, match="extra ids"):
        special_tokens.ul2_mode_ids(seqio.PassThroughVocabulary(100))


def test_default_mixture_is_the_papers_seven_denoisers_at_equal_rates():
    denoisers, probabilities = ul2.ul2_mixture()
    assert [tuple(d) for d in denoisers] == [
        ("R", 0.15, 3.0), ("R", 0.15, 8.0), ("X", 0.5, 3.0), ("X", 0.5, 8.0), ("X", 0.15, 64.0), ("X", 0.5, 64.0),
        ("S", 0.0, 0.0),
    ]
    assert probabilities == pytest.approx([1 / 7] * 7)


@pytest.mark.parametrize(
    "denoisers,rates,match",
    [
        ([("Q", 0.1, 3.0)], None, "mode must be one of"),
        ([("R", 1.5, 3.0)], None, "noise_density"),
        ([("X", 0.5, 0.5)], None, "mean_noise_span_length"),
        ([], None, "empty"),
        ([("R", 0.15, 3.0), ("S",)], [1.0], "one per denoiser"),
        ([("R", 0.15, 3.0), ("S",)], [1.0, -1.0], "non-negative"),
    ],
)
def test_bad_mixtures_are_rejected(denoisers, rates, match):
    with pytest.raises(ValueError, match=match):
        ul2.ul2_mixture(denoisers, rates)


def test_mixture_follows_the_rates_and_mode_tokens_match_the_denoiser():
    rates = [4, 1, 1, 1, 1, 1, 3]
    num = 3000
    tokens, inputs, targets, index, denoisers = _denoise_many(256, num, rates=rates)
    expected = np.array(rates) / sum(rates)
    counts = np.bincount(index, minlength=7)
    # 4.5 standard errors of a binomial proportion.
    np.testing.assert_array_less(np.abs(counts / num - expected), 4.5 * np.sqrt(expected * (1 - expected) / num))
    for row, inp, tgt, i in zip(tokens, inputs, targets, index):
        mode = denoisers[i].mode
        assert inp[0] == MODE_IDS[mode]
        assert not np.isin([NLU, NLG, S2S], np.concatenate([inp[1:], tgt])).any()  # nowhere else
        original = list(inp[1:]) + list(tgt) if mode == "S" else _uncorrupt(inp[1:], tgt)
        assert original == list(row)


def test_zero_rate_never_draws_that_denoiser():
    _, _, _, index, _ = _denoise_many(64, 500, rates=[1, 0, 0, 0, 0, 0, 1])
    assert set(index) == {0, 6}


# ---------------------------------------------------------------- each denoiser's definition


def test_each_denoisers_corruption_rate_and_mean_span_length():
    length, num = 2048, 700
    _, inputs, targets, index, denoisers = _denoise_many(length, num, seed=3, vocabulary=WIDE)
    for i, denoiser in enumerate(denoisers):
        chosen = np.flatnonzero(index == i)
        assert len(chosen) >= 60, (denoiser, len(chosen))
        if denoiser.mode == "S":
            # A uniform split over 1..length-1: the targets' share has mean 1/2 and sd 0.289 per example.
            shares = [len(targets[k]) / length for k in chosen]
            assert abs(np.mean(shares) - 0.5) < 4.5 * 0.289 / np.sqrt(len(chosen))
            assert 1 <= min(len(targets[k]) for k in chosen) and max(len(targets[k]) for k in chosen) <= length - 1
            continue
        noise = np.array([sum(_span_lengths(targets[k])) for k in chosen])
        spans = [len(_span_lengths(targets[k])) for k in chosen]
        num_noise, num_spans = span_corruption.noise_counts(length, denoiser.noise_density, denoiser.mean_noise_span_length)
        # Exactly round(rate * n) noise tokens in round(noise / mean span) spans, for every example.
        assert set(noise) == {num_noise} and set(spans) == {num_spans}
        assert {len(inputs[k]) for k in chosen} == {1 + length - num_noise + num_spans}  # mode token + kept + sentinels
        assert abs(num_noise / length - denoiser.noise_density) <= 0.5 / length
        assert abs(num_noise / num_spans - denoiser.mean_noise_span_length) <= 0.05 * denoiser.mean_noise_span_length
        # The span lengths are random: their spread is not degenerate, and every span is non-empty.
        all_spans = [s for k in chosen for s in _span_lengths(targets[k])]
        assert min(all_spans) >= 1 and (denoiser.mean_noise_span_length < 2 or np.std(all_spans) > 0.3)


def test_more_spans_than_free_sentinels_fail_loudly():
    with pytest.raises(tf.errors.InvalidArgumentError, match="free 97 extra ids"):
        _denoise_many(1024, 1, denoisers=[("X", 0.5, 3.0)])


def test_same_seed_same_output_other_seed_other_output():
    _, a_in, a_t, a_i, _ = _denoise_many(128, 50, seed=5)
    _, b_in, b_t, b_i, _ = _denoise_many(128, 50, seed=5)
    _, _, _, c_i, _ = _denoise_many(128, 50, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a_in + a_t, b_in + b_t)) and np.array_equal(a_i, b_i)
    assert not np.array_equal(a_i, c_i)


# ---------------------------------------------------------------- lengths and the bundled tasks


@pytest.mark.parametrize("lengths", [(128, 128), (128, 32), (64, 256), (512, 128), (16, 16)])
@pytest.mark.parametrize("inputs_eos", [True, False])
def test_chunk_length_is_the_longest_that_fits_every_denoiser(lengths, inputs_eos):
    features = {"inputs": seqio.Feature(VOCAB, add_eos=inputs_eos), "targets": seqio.Feature(VOCAB, add_eos=True)}
    sequence_length = dict(zip(("inputs", "targets"), lengths))
    chunk = ul2.ul2_chunk_length(sequence_length, features, ul2.UL2_DENOISERS)
    inputs_budget, targets_budget = lengths[0] - 1 - inputs_eos, lengths[1] - 1

    def worst(length):  # the longest inputs and targets over the denoisers, and the most spans
        found = [(length - n + s, n + s, s) for n, s in (span_corruption.noise_counts(length, d.noise_density,
                 d.mean_noise_span_length) for d in ul2.UL2_DENOISERS if d.mode != "S")]
        return tuple(max(x[j] for x in found) for j in range(3))

    assert worst(chunk)[0] <= inputs_budget and worst(chunk)[1] <= targets_budget and worst(chunk)[2] <= 97
    longer = worst(chunk + 1)
    assert (longer[0] > inputs_budget or longer[1] > targets_budget or longer[2] > 97
            or chunk + 1 > inputs_budget + targets_budget)
    if lengths == (128, 128) and inputs_eos:
        assert chunk == 140  # the docstring's example


def test_too_short_lengths_fail_clearly():
    with pytest.raises(ValueError, match="too short for UL2"):
        ul2.ul2_chunk_length({"inputs": 2, "targets": 2}, ENC_DEC, ul2.UL2_DENOISERS)
    with pytest.raises(ValueError, match="too short for UL2"):  # no room for S's prefix beside [S2S] and EOS
        ul2.ul2_chunk_length({"inputs": 2, "targets": 64}, ENC_DEC, [ul2.Denoiser("S")])
    with pytest.raises(ValueError, match=r"sequence_length\['inputs'\] and \['targets'\]"):
        ul2.ul2_chunk_length({"targets": 64}, ENC_DEC, ul2.UL2_DENOISERS)


def _validation_stream() -> list[int]:
    with open(sources.BUNDLED_DIR / "validation.txt") as f:
        return [t for line in f for t in VOCAB.encode(line.rstrip("\n"))]


@pytest.mark.parametrize("name,eos", [("bundled_ul2", True), ("bundled_ul2_prefix_lm", False)])
def test_bundled_task_fits_its_lengths_and_reconstructs_the_corpus(name, eos):
    lengths = {"inputs": 128, "targets": 128}
    ds = seqio.get_mixture_or_task(name).get_dataset(lengths, split="validation", shuffle=False, seed=0,
                                                       trim_output_features=False)
    examples = list(ds.as_numpy_iterator())
    stream, modes = [], []
    for ex in examples:
        inputs, targets = ex["inputs"], ex["targets"]
        assert len(inputs) <= 128 and len(targets) <= 128 and targets[-1] == 1
        assert (inputs[-1] == 1) == eos
        inputs, targets = inputs[1: len(inputs) - eos], targets[:-1]
        modes.append(ex["inputs"][0])
        stream += list(inputs) + list(targets) if ex["inputs"][0] == S2S else _uncorrupt(inputs, targets)
    assert stream == _validation_stream()[: len(stream)] and len(_validation_stream()) - len(stream) < 2
    assert set(modes) == {NLU, NLG, S2S}


@pytest.mark.parametrize(
    "name,converter,batch_features",
    [
        ("bundled_ul2", seqio.EncDecFeatureConverter, {"encoder_input_tokens", "decoder_target_tokens"}),
        ("bundled_ul2_prefix_lm", seqio.DecoderFeatureConverter, {"decoder_causal_attention"}),
    ],
)
def test_bundled_task_gives_batches(name, converter, batch_features):
    ds = pipeline.get_dataset(name, {"inputs": 32, "targets": 32}, 4, converter, split="validation", shuffle=False, seed=1)
    batch = next(ds.as_numpy_iterator())
    assert batch_features <= set(batch)
    weights = batch["decoder_loss_weights"]
    assert 0 < weights.sum() and (weights.sum() < weights.size or name == "bundled_ul2")


def test_gin_binding_changes_the_mixture():
    gin.clear_config()
    try:
        gin.parse_config("ul2_mixture.denoisers = [('S',)]")
        ds = seqio.get_mixture_or_task("bundled_ul2").get_dataset({"inputs": 32, "targets": 32}, split="validation",
                                                                   shuffle=False, seed=0)
        firsts = {int(ex["inputs"][0]) for ex in ds.take(40).as_numpy_iterator()}
    finally:
        gin.clear_config()
    assert firsts == {S2S}


def test_data_iterator_is_checkpointable(tmp_path):
    """A stateful op in the pipeline (an assertion inside a denoiser's branch) would make saving the iterator fail."""
    ds = seqio.get_mixture_or_task("bundled_ul2").get_dataset({"inputs": 32, "targets": 32}, split="validation", seed=0)
    iterator = iter(ds)
    next(iterator)
    tf.train.Checkpoint(iterator=iterator).save(str(tmp_path / "iterator"))


# ---------------------------------------------------------------- errors through the CLI


@pytest.mark.parametrize(
    "bindings,message",
    [
        (["--gin.TASK_FEATURE_LENGTHS={'inputs': 2, 'targets': 2}"],
         ("TASK_FEATURE_LENGTHS {'inputs': 2, 'targets': 2} are too short for UL2's denoisers: no chunk of 2 or more "
          "tokens fits every one of them; use longer inputs and targets.")),
        (["--gin.ul2_mixture.rates=[1, 2]"],
         "ul2_mixture.rates [1.0, 2.0] must be 7 non-negative numbers, not all 0 (one per denoiser)."),
    ],
)
@pytest.mark.slow
def test_cli_reports_a_bad_ul2_setting_in_one_line(tmp_path, bindings, message):
    from tests.test_cli import run_cli
    from tests.test_safety import assert_one_error

    result = run_cli("--gin_file=gin_configs/examples/ul2_tiny_pretrain.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
                     *bindings)
    assert_one_error(result, message)
    assert not (tmp_path / "run" / "checkpoints").exists()
