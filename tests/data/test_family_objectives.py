"""Tests of the BERT, LM, prefix-LM and BART objectives, their converter and their registered tasks.

Statistical bounds are about 4-5 standard errors of the checked estimate (stated at each check),
so a correct implementation fails them with probability well under 1e-4; the seeds are fixed,
so the tests are deterministic.
"""

from __future__ import annotations

import math
import uuid

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

import t5x_lite.tasks  # noqa: F401  (registers the bundled tasks these tests read)
from t5x_lite.data import pipeline, registration, sources, special_tokens, vocab
from t5x_lite.data.feature_converters import MaskedLMFeatureConverter
from t5x_lite.data.preprocessors import bart_noise, lm, mlm

VOCAB = vocab.get_vocabulary()
MASK, CLS, SEP = 8099, 8098, 8097
LOW, HIGH = 3, 8000  # ordinary pieces of the bundled vocabulary
FEATURES = {"inputs": seqio.Feature(VOCAB, add_eos=False), "targets": seqio.Feature(VOCAB, add_eos=False)}


def _dataset(sequences) -> tf.data.Dataset:
    lengths = [len(s) for s in sequences]
    flat = np.concatenate([np.asarray(s, np.int32) for s in sequences] + [np.zeros([0], np.int32)])
    ragged = tf.RaggedTensor.from_row_lengths(flat, lengths)
    return tf.data.Dataset.from_tensor_slices(ragged).map(lambda tokens: {"targets": tokens})


def _numpy(ds: tf.data.Dataset) -> list[dict[str, np.ndarray]]:
    """The examples of a finite dataset as numpy dicts, fetched as one padded batch (per-example fetches are slow)."""
    sequences = [k for k, spec in ds.element_spec.items() if spec.shape.rank == 1]
    ds = ds.map(lambda ex: (ex, {k: tf.size(ex[k]) for k in sequences}))
    columns, lengths = {}, {}
    for batch, batch_lengths in ds.padded_batch(1_000_000).as_numpy_iterator():
        for key, value in batch.items():
            columns.setdefault(key, []).extend(value)
        for key, value in batch_lengths.items():
            lengths.setdefault(key, []).extend(value)
    for key in sequences:
        columns[key] = [row[:n] for row, n in zip(columns[key], lengths[key])]
    return [dict(zip(columns, row)) for row in zip(*columns.values())]


def _run(preprocessor, sequences, map_seed=0, **kwargs) -> list[dict[str, np.ndarray]]:
    with seqio.utils.map_seed_manager(map_seed):
        return _numpy(preprocessor(_dataset(sequences), **kwargs))


def _random_tokens(num, length, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(LOW, HIGH, size=(num, length), dtype=np.int32)


def _bert_sequences(num, length, seed=0) -> np.ndarray:
    tokens = _random_tokens(num, length - 2, seed)
    return np.concatenate([np.full([num, 1], CLS), tokens, np.full([num, 1], SEP)], axis=1).astype(np.int32)


def _mask(sequences, map_seed=0, **kwargs):
    return _run(mlm.mlm_mask_tokens, sequences, map_seed, output_features=FEATURES, **kwargs)


# ---------------------------------------------------------------- special ids


def test_bert_special_ids_are_the_last_extra_ids():
    assert special_tokens.bert_special_ids(VOCAB) == (MASK, CLS, SEP)
    assert VOCAB.decode([MASK, CLS, SEP]) == "<extra_id_0> <extra_id_1> <extra_id_2>"
    assert special_tokens.ordinary_id_range(VOCAB) == (LOW, HIGH)
    with pytest.raises(ValueError, match="extra ids"):
        special_tokens.bert_special_ids(seqio.PassThroughVocabulary(100))


# ---------------------------------------------------------------- BERT MLM


def test_mlm_rate_and_80_10_10_split():
    num, length = 2000, 128
    sequences = _bert_sequences(num, length)
    out = _mask(sequences)
    inputs = np.stack([ex["inputs"] for ex in out])
    targets = np.stack([ex["targets"] for ex in out])
    chosen = targets > 0
    # Exactly round(0.15 * 126) = 19 of the 126 text tokens per sequence; never [CLS]/[SEP].
    assert (chosen.sum(axis=1) == 19).all()
    assert not chosen[:, [0, -1]].any()
    np.testing.assert_array_equal(targets[chosen], sequences[chosen])
    np.testing.assert_array_equal(inputs[~chosen], sequences[~chosen])
    # The chosen positions are uniform over the text: per-position rate 19/126, SE ~0.008 per
    # position over 2000 sequences; averaged over 8-position windows SE ~0.003, bound 0.015.
    windows = chosen[:, 1:-1].mean(axis=0)[:120].reshape(15, 8).mean(axis=1)
    assert np.abs(windows - 19 / 126).max() < 0.015
    picked, original = inputs[chosen], sequences[chosen]
    n = picked.size  # 38000
    masked = np.mean(picked == MASK)
    unchanged = np.mean(picked == original)
    replaced = picked[(picked != MASK) & (picked != original)]
    print(f"chosen {n}: mask {masked:.4f} random {replaced.size / n:.4f} unchanged {unchanged:.4f}")
    # Binomial SEs over 38000 chosen tokens: 0.0021 (p=0.8), 0.0015 (p=0.1); bounds ~5 SE.
    assert abs(masked - 0.8) < 0.01
    # A random token equals the original with probability 1/7997, counted as unchanged.
    assert abs(unchanged - (0.1 + 0.1 / (HIGH - LOW))) < 0.008
    assert abs(replaced.size / n - 0.1 * (1 - 1 / (HIGH - LOW))) < 0.008
    # Random tokens are ordinary pieces, uniform: mean (LOW + HIGH - 1) / 2, SE 2309 / sqrt(3800) ~ 37.
    assert replaced.min() >= LOW and replaced.max() < HIGH
    assert abs(replaced.mean() - (LOW + HIGH - 1) / 2) < 200


def test_mlm_never_chooses_special_ids():
    rng = np.random.default_rng(1)
    specials = np.array([0, 1, CLS, SEP, MASK, 8050, 8000])  # pad, eos, [CLS], [SEP], [MASK], other extra ids
    sequences = _random_tokens(500, 60, seed=1)
    is_special = rng.random(sequences.shape) < 0.5
    sequences = np.where(is_special, rng.choice(specials, size=sequences.shape), sequences).astype(np.int32)
    out = _mask(sequences)
    for original, special, ex in zip(sequences, is_special, out):
        assert not (ex["targets"][special] > 0).any()
        np.testing.assert_array_equal(ex["inputs"][special], original[special])
        num_text = int((~special).sum())
        assert (ex["targets"] > 0).sum() == (max(1, round(0.15 * num_text)) if num_text else 0)


def test_mlm_whole_word_masking_masks_whole_words():
    sequences = _bert_sequences(1000, 128, seed=2)
    out = _mask(sequences, whole_word_masking=True)
    tokenizer = VOCAB.tokenizer
    starts_word = np.array([tokenizer.id_to_piece(i).startswith("\u2581") for i in range(HIGH)])
    rates = []
    for original, ex in zip(sequences, out):
        chosen = ex["targets"] > 0
        text = original[1:-1]
        word = np.cumsum(starts_word[text] | (np.arange(len(text)) == 0)) - 1
        chosen_in_word = np.bincount(word, weights=chosen[1:-1])
        whole_or_none = (chosen_in_word == 0) | (chosen_in_word == np.bincount(word))
        assert whole_or_none.all(), "a word is partly chosen"
        rates.append(chosen.sum() / len(text))
        np.testing.assert_array_equal(ex["targets"][chosen], original[chosen])
    # Words are added while the running total stays within 19 tokens: a bit under 15% on average.
    print(f"whole-word masking rate {np.mean(rates):.4f}")
    assert 0.13 < np.mean(rates) <= 19 / 126
    token_level = _mask(sequences)
    assert sum((ex["targets"] > 0).sum() for ex in token_level) == 19 * len(sequences)


def test_mlm_gin_binding_changes_the_rate():
    gin.parse_config("mlm_mask_tokens.mask_rate = 0.5")
    try:
        out = _mask(_bert_sequences(20, 42))
    finally:
        gin.clear_config()
    assert all((ex["targets"] > 0).sum() == 20 for ex in out)
    documents = _dataset(_random_tokens(4, 30, seed=10))
    gin.parse_config("pack_mlm_sequences.next_sentence_prediction = True")
    try:
        pairs = _numpy(mlm.pack_mlm_sequences(documents, {"inputs": 16, "targets": 16}, FEATURES))
    finally:
        gin.clear_config()
    assert all(len(p["targets"]) == 16 and p["token_type_ids"][-1] == 1 for p in pairs[:-1])
    with pytest.raises(ValueError, match="targets == inputs"):
        mlm.pack_mlm_sequences(documents, {"inputs": 16, "targets": 8}, FEATURES)


@pytest.fixture
def token_task():
    """A task over fixed token documents whose MLM chunks coincide with the documents (inputs length 32)."""
    documents = _random_tokens(12, 30, seed=3)

    def dataset_fn(split, shuffle_files, seed=None):
        del split, shuffle_files, seed
        return tf.data.Dataset.from_tensor_slices({"targets": documents})

    name = f"test_mlm_{uuid.uuid4().hex}"
    task = seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
        preprocessors=mlm.mlm_preprocessors()[2:],  # after rekey + tokenize: cache placeholder, pack, mask
        output_features=FEATURES,
    )
    try:
        yield task, documents
    finally:
        seqio.TaskRegistry.remove(name)


def test_mlm_dynamic_masking_draws_a_new_mask_every_epoch(token_task):
    task, documents = token_task
    num = len(documents)

    def epochs(seed):
        ds = task.get_dataset({"inputs": 32, "targets": 32}, split="train", shuffle=False, num_epochs=None, seed=seed)
        return _numpy(ds.take(3 * num))

    examples = epochs(seed=5)
    for i, ex in enumerate(examples):
        original = np.where(ex["targets"] > 0, ex["targets"], ex["inputs"])
        np.testing.assert_array_equal(original, np.concatenate([[CLS], documents[i % num], [SEP]]))
    masks = [(ex["targets"] > 0).tobytes() for ex in examples]
    for i in range(num):
        assert len({masks[i], masks[i + num], masks[i + 2 * num]}) == 3, "same mask in two epochs"
    again = epochs(seed=5)
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(examples, again))


# ---------------------------------------------------------------- NSP


def test_nsp_pairs_are_half_true_half_random():
    length = 16  # chunks of 13 tokens: [CLS] A [SEP] B [SEP]
    stream = np.arange(10_000, 10_000 + 13 * 4000, dtype=np.int32)  # distinct, above every special id
    documents = np.split(stream, np.cumsum(np.random.default_rng(4).integers(5, 40, 2000)))
    pairs = _numpy(
        mlm.pack_mlm_sequences(
            _dataset(documents), {"inputs": length, "targets": length}, FEATURES, next_sentence_prediction=True
        )
    )
    assert len(pairs) == 4000
    labels = np.array([p["next_sentence_label"] for p in pairs])
    gaps = []
    for pair in pairs:
        seq, types = pair["targets"], pair["token_type_ids"]
        first_sep, last = int(np.flatnonzero(seq == SEP)[0]), len(seq) - 1
        a, b = seq[1:first_sep], seq[first_sep + 1 : last]
        assert seq[0] == CLS and seq[last] == SEP and len(seq) == length and len(a) >= 1 and len(b) >= 1
        np.testing.assert_array_equal(types, (np.arange(length) > first_sep).astype(np.int32))
        assert (np.diff(a) == 1).all() and (np.diff(b) == 1).all()
        assert (b[0] == a[-1] + 1) == (pair["next_sentence_label"] == 1)
        if pair["next_sentence_label"] == 0:  # the same positions of a chunk 32..128 chunks back
            assert (int(a[-1]) + 1 - int(b[0])) % 13 == 0
            gaps.append((int(a[-1]) + 1 - int(b[0])) // 13)
    # 50/50 (the first pair is always true): SE 0.0079 over 4000 pairs, bound 4 SE.
    print(f"true-next fraction {labels.mean():.4f}")
    assert abs(labels.mean() - 0.5) < 0.032
    # Gaps uniform on 32..128: mean 80, SD 27.7, SE ~0.62 over ~2000 random pairs; bound 3.
    assert min(gaps) == 32 and max(gaps) == 128 and abs(np.mean(gaps) - 80) < 3
    # Split points vary: A takes 1..12 of the 13 tokens.
    a_lengths = {int(np.flatnonzero(p["targets"] == SEP)[0]) - 1 for p in pairs}
    assert a_lengths == set(range(1, 13))


# ---------------------------------------------------------------- converter


def _convert(examples, lengths, pack, converter_cls=MaskedLMFeatureConverter):
    def gen():
        yield from examples

    signature = {
        k: tf.TensorSpec([] if np.ndim(v) == 0 else [None], tf.int32) for k, v in examples[0].items()
    }
    ds = tf.data.Dataset.from_generator(gen, output_signature=signature)
    return _numpy(converter_cls(pack=pack)(ds, lengths))


MLM_EXAMPLES = [
    # [CLS] t1 [MASK] t3 (random) t4 [SEP]: t1 chosen but unchanged, t2 masked, t3 replaced by 900.
    {"inputs": [CLS, 11, MASK, 900, 14, SEP], "targets": [0, 11, 12, 13, 0, 0]},
    {"inputs": [CLS, MASK, 22, SEP], "targets": [0, 21, 0, 0]},
]


def test_converter_weights_every_chosen_position():
    out = _convert(MLM_EXAMPLES, {"inputs": 8, "targets": 8}, pack=False)
    assert set(out[0]) == {"encoder_input_tokens", "encoder_target_tokens", "encoder_loss_weights"}
    np.testing.assert_array_equal(out[0]["encoder_input_tokens"], [CLS, 11, MASK, 900, 14, SEP, 0, 0])
    np.testing.assert_array_equal(out[0]["encoder_target_tokens"], [0, 11, 12, 13, 0, 0, 0, 0])
    np.testing.assert_array_equal(out[0]["encoder_loss_weights"], [0, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(out[1]["encoder_loss_weights"], [0, 1, 0, 0, 0, 0, 0, 0])
    # seqio's EncoderFeatureConverter would weight only the [MASK] input.
    seqio_out = seqio.EncoderFeatureConverter(mask_id=MASK, pack=False)(
        tf.data.Dataset.from_generator(
            lambda: iter(MLM_EXAMPLES), output_signature={k: tf.TensorSpec([None], tf.int32) for k in MLM_EXAMPLES[0]}
        ),
        {"inputs": 8, "targets": 8},
    )
    assert next(seqio_out.as_numpy_iterator())["encoder_loss_weights"].tolist() == [0, 0, 1, 0, 0, 0, 0, 0]


def test_converter_packs():
    out = _convert(MLM_EXAMPLES, {"inputs": 12, "targets": 12}, pack=True)
    assert len(out) == 1
    packed = out[0]
    np.testing.assert_array_equal(packed["encoder_input_tokens"], [CLS, 11, MASK, 900, 14, SEP, CLS, MASK, 22, SEP, 0, 0])
    np.testing.assert_array_equal(packed["encoder_loss_weights"], [0, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(packed["encoder_segment_ids"], [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0])
    np.testing.assert_array_equal(packed["encoder_positions"], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 0])
    with pytest.raises(ValueError, match="lengths must be equal"):
        _convert(MLM_EXAMPLES, {"inputs": 12, "targets": 10}, pack=True)


def test_converter_passes_sentence_pairs_unpacked():
    examples = [
        {**MLM_EXAMPLES[0], "token_type_ids": [0, 0, 0, 1, 1, 1], "next_sentence_label": 1},
        {**MLM_EXAMPLES[1], "token_type_ids": [0, 0, 1, 1], "next_sentence_label": 0},
    ]
    out = _convert(examples, {"inputs": 8, "targets": 8}, pack=True)
    assert len(out) == 2 and "encoder_segment_ids" not in out[0]
    np.testing.assert_array_equal(out[0]["encoder_token_type_ids"], [0, 0, 0, 1, 1, 1, 0, 0])
    assert [ex["next_sentence_labels"].tolist() for ex in out] == [[1], [0]]
    np.testing.assert_array_equal(out[0]["encoder_loss_weights"], [0, 1, 1, 1, 0, 0, 0, 0])


# ---------------------------------------------------------------- causal and prefix LM


def test_lm_chunks_are_the_stream_with_document_separators():
    documents = [list(range(10 + 100 * i, 10 + 100 * i + n)) for i, n in enumerate([5, 0, 40, 17, 3])]
    chunks = [ex["targets"] for ex in _numpy(lm.pack_lm_chunks(_dataset(documents), {"targets": 16}, FEATURES))]
    assert [len(c) for c in chunks] == [16, 16, 16, 16, 6]  # 70 tokens with the 5 EOS
    assert np.concatenate(chunks).tolist() == [t for d in documents for t in d + [VOCAB.eos_id]]


@pytest.mark.parametrize("lengths", [{"inputs": 12, "targets": 12}, {"inputs": 20, "targets": 6}])
def test_prefix_lm_split_varies_and_reconstructs(lengths):
    chunk = lm.prefix_lm_chunk_length(lengths)
    sequences = list(_random_tokens(3000, chunk, seed=5)) + [np.arange(3, 3 + 2), np.arange(3, 3 + 7)]
    out = _run(lm.split_prefix_lm, sequences, sequence_length=lengths)
    splits = []
    for original, ex in zip(sequences, out):
        np.testing.assert_array_equal(np.concatenate([ex["inputs"], ex["targets"]]), original)
        assert 1 <= len(ex["inputs"]) <= lengths["inputs"] and 1 <= len(ex["targets"]) <= lengths["targets"]
        splits.append(len(ex["inputs"]))
    full = np.array(splits[:3000])
    low, high = max(1, chunk - lengths["targets"]), min(lengths["inputs"], chunk - 1)
    # Uniform over [low, high]: each of k values has frequency 1/k, SE <= 0.0091 over 3000; bound 0.04.
    values, counts = np.unique(full, return_counts=True)
    assert values.tolist() == list(range(low, high + 1))
    assert np.abs(counts / len(full) - 1 / len(values)).max() < 0.04


# ---------------------------------------------------------------- BART


def _per_seed(fn, num) -> list[dict[str, np.ndarray]]:
    """`fn(seed)` -> dict of tensors, for seeds (i, 17), i < num, mapped in one tf.data pipeline."""
    return _numpy(tf.data.Dataset.range(num).map(lambda i: fn(tf.stack([i, tf.constant(17, tf.int64)]))))


def test_infilling_span_lengths_are_poisson_3_and_rate_is_30_percent():
    length, num = 500, 2000

    def plan(seed):
        is_span, span_length = bart_noise.infilling_plan(length, seed, 0.3, 3.0)
        return {"is_span": is_span, "span_length": span_length}

    first_spans, zero = [], 0
    for ex in _per_seed(plan, num):
        is_span, span_length = ex["is_span"], ex["span_length"]
        assert len(is_span) == length - 150 + is_span.sum() and span_length.sum() == length
        spans = span_length[is_span]
        assert spans.sum() == 150 and spans[-1] >= 1  # exactly round(0.3 * 500) tokens are noise
        first_spans.extend(spans[:10])  # all but the last span are exact Poisson draws; ~50 per sequence
        zero += (spans == 0).sum()
    first_spans = np.array(first_spans)
    print(f"mean span {first_spans.mean():.4f}, var {first_spans.var():.4f}, P(0) {np.mean(first_spans == 0):.4f}")
    # 20000 Poisson(3) draws: SE of the mean 0.0122 (bound 0.05), of the variance ~0.033 (bound 0.15),
    # of P(0) 0.0015 (bound 0.007).
    assert abs(first_spans.mean() - 3.0) < 0.05
    assert abs(first_spans.var() - 3.0) < 0.15
    assert abs(np.mean(first_spans == 0) - math.exp(-3)) < 0.007
    assert zero > 0  # empty spans happen (each inserts one mask)


def test_infilling_replaces_each_span_by_one_mask():
    tokens = tf.constant(_random_tokens(1, 200, seed=6)[0])

    def infill(seed):
        is_span, span_length = bart_noise.infilling_plan(200, seed, 0.3, 3.0)
        noised = bart_noise.infill_text(tokens, seed, 0.3, 3.0, MASK)
        return {"noised": noised, "is_span": is_span, "span_length": span_length}

    original = tokens.numpy()
    for ex in _per_seed(infill, 300):
        np.testing.assert_array_equal(ex["noised"] == MASK, ex["is_span"])
        # Expanding each mask back to its span gives the original: the kept tokens are in place.
        noise = np.repeat(ex["is_span"], ex["span_length"])
        assert noise.sum() == 60
        np.testing.assert_array_equal(ex["noised"][~ex["is_span"]], original[~noise])


def _sentences(tokens, is_end):
    """Sentences up to each end token, and the tail after the last one (which counts as a sentence)."""
    cuts = np.flatnonzero(is_end[tokens]) + 1
    return [tuple(s) for s in np.split(tokens, cuts) if len(s)]


def _as_concatenation(tokens, sentences):
    """The order in which `sentences` (each used once) concatenate to `tokens`, or None."""
    remaining, order, position = list(sentences), [], 0
    while remaining:
        matches = [s for s in remaining if tuple(tokens[position : position + len(s)]) == s]
        if not matches:
            return None
        match = max(matches, key=len)  # only the tail (no end token) can be a prefix of another sentence
        remaining.remove(match)
        order.append(match)
        position += len(match)
    return order if position == len(tokens) else None


def test_sentence_permutation_keeps_the_multiset_of_sentences():
    table = special_tokens.sentence_end_table(VOCAB)
    is_end = table.numpy()
    ends = [VOCAB.tokenizer.piece_to_id(p) for p in (".", "?", "!")]
    assert is_end[ends].all() and is_end.sum() < 10
    rng = np.random.default_rng(7)
    tokens = _random_tokens(300, 120, seed=7)
    tokens[rng.random(tokens.shape) < 0.1] = ends[0]
    ds = tf.data.Dataset.from_tensor_slices((tokens, np.stack([np.arange(300), np.full(300, 17)], 1)))
    permuted = _numpy(ds.map(lambda t, seed: {"out": bart_noise.permute_sentences(t, seed, table)}))
    for original, ex in zip(tokens, permuted):
        assert _as_concatenation(ex["out"], _sentences(original, is_end)) is not None
    assert sum(not np.array_equal(o, ex["out"]) for o, ex in zip(tokens, permuted)) > 280


def test_token_deletion_rate_and_order():
    tokens = np.arange(LOW, LOW + 100, dtype=np.int32)
    deleted = np.zeros(100)
    for ex in _per_seed(lambda seed: {"out": bart_noise.delete_tokens(tf.constant(tokens), seed, 0.2)}, 2000):
        assert len(ex["out"]) == 80 and (np.diff(ex["out"]) > 0).all()  # a subsequence, in order
        deleted[np.setdiff1d(tokens, ex["out"]) - LOW] += 1
    # Each position is deleted with probability 0.2: SE 0.0089 per position over 2000; bound 0.045.
    assert np.abs(deleted / 2000 - 0.2).max() < 0.045


def test_token_masking_rate():
    tokens = _random_tokens(1, 100, seed=8)[0]
    for ex in _per_seed(lambda seed: {"out": bart_noise.mask_tokens(tf.constant(tokens), seed, 0.15, MASK)}, 50):
        assert (ex["out"] == MASK).sum() == 15
        np.testing.assert_array_equal(ex["out"][ex["out"] != MASK], tokens[ex["out"] != MASK])


def test_document_rotation_is_a_rotation():
    tokens = np.arange(LOW, LOW + 50, dtype=np.int32)
    offsets = set()
    for ex in _per_seed(lambda seed: {"out": bart_noise.rotate_document(tf.constant(tokens), seed)}, 300):
        offset = int(ex["out"][0] - LOW)
        np.testing.assert_array_equal(ex["out"], np.roll(tokens, -offset))
        offsets.add(offset)
    assert len(offsets) > 45


def test_bart_noise_defaults_and_gin_switches():
    sequences = list(_random_tokens(50, 100, seed=9))
    out = _run(bart_noise.bart_noise, sequences, output_features=FEATURES, sequence_length={"inputs": 128, "targets": 128})
    for original, ex in zip(sequences, out):
        np.testing.assert_array_equal(ex["targets"], original)
        assert (ex["inputs"] == MASK).any() and len(ex["inputs"]) < 100
    gin.parse_config(
        "bart_noise.text_infilling_rate = 0.0\nbart_noise.sentence_permutation = False\n"
        "bart_noise.token_deletion_rate = 0.1\nbart_noise.document_rotation = True"
    )
    try:
        out = _run(bart_noise.bart_noise, sequences, output_features=FEATURES)
    finally:
        gin.clear_config()
    assert all(len(ex["inputs"]) == 90 and not (ex["inputs"] == MASK).any() for ex in out)
    with pytest.raises(ValueError, match="text_infilling_rate"):
        _run(bart_noise.bart_noise, sequences, output_features=FEATURES, text_infilling_rate=1.5)


# ---------------------------------------------------------------- registered tasks


def _stream(split="validation"):
    with open(sources.BUNDLED_DIR / f"{split}.txt") as f:
        return [VOCAB.encode(line.rstrip("\n")) for line in f]


def test_bundled_tasks_reconstruct_the_corpus():
    documents = _stream()
    stream = [t for d in documents for t in d]

    def examples(name, lengths):
        ds = seqio.get_mixture_or_task(name).get_dataset(lengths, split="validation", shuffle=False, seed=0)
        return _numpy(ds)

    bart_examples = examples("bundled_bart_denoising", {"inputs": 64, "targets": 64})
    assert all(ex["targets"][-1] == 1 and ex["inputs"][-1] == 1 for ex in bart_examples)
    assert [t for ex in bart_examples for t in ex["targets"][:-1]] == stream
    mlm_examples = examples("bundled_mlm", {"inputs": 64, "targets": 64})
    originals = [np.where(ex["targets"] > 0, ex["targets"], ex["inputs"]) for ex in mlm_examples]
    assert all(o[0] == CLS and o[-1] == SEP for o in originals)
    assert [t for o in originals for t in o[1:-1]] == stream
    lm_stream = [t for d in documents for t in d + [VOCAB.eos_id]]
    assert [t for ex in examples("bundled_lm", {"targets": 64}) for t in ex["targets"]] == lm_stream
    prefix = examples("bundled_prefix_lm", {"inputs": 32, "targets": 32})
    kept = len(lm_stream) - (1 if len(lm_stream) % 32 == 1 else 0)  # a last 1-token chunk is dropped
    assert [t for ex in prefix for t in list(ex["inputs"]) + list(ex["targets"])] == lm_stream[:kept]


@pytest.mark.parametrize(
    "name,lengths,converter,batch_features",
    [
        ("bundled_mlm", {"inputs": 32, "targets": 32}, MaskedLMFeatureConverter, {"encoder_segment_ids"}),
        ("bundled_mlm_nsp", {"inputs": 32, "targets": 32}, MaskedLMFeatureConverter, {"encoder_token_type_ids"}),
        ("bundled_lm", {"targets": 32}, seqio.DecoderFeatureConverter, {"decoder_segment_ids"}),
        ("bundled_prefix_lm", {"inputs": 16, "targets": 16}, seqio.DecoderFeatureConverter, {"decoder_causal_attention"}),
        ("bundled_bart_denoising", {"inputs": 32, "targets": 32}, seqio.EncDecFeatureConverter, {"encoder_segment_ids"}),
    ],
)
def test_bundled_task_gives_batches(name, lengths, converter, batch_features):
    ds = pipeline.get_dataset(name, lengths, 4, converter, split="validation", shuffle=False, seed=1)
    batch = next(ds.as_numpy_iterator())
    assert batch_features <= set(batch)
    for key, value in batch.items():
        assert value.shape == ((4, 1) if key == "next_sentence_labels" else (4, 32)), key
    loss_weights = batch.get("encoder_loss_weights", batch.get("decoder_loss_weights"))
    assert loss_weights.sum() > 0
    if "mlm" in name or "prefix" in name:  # loss on the chosen tokens / the suffix only
        assert loss_weights.sum() < loss_weights.size


@pytest.mark.parametrize("objective", sorted(registration.OBJECTIVES))
def test_c4_twin_absent_fails_at_once_naming_the_flag(tmp_path, objective):
    seqio.set_tfds_data_dir_override(str(tmp_path))
    seqio.utils.LazyTfdsLoader._MEMOIZED_BUILDERS.clear()
    try:
        with pytest.raises(FileNotFoundError, match=r"c4/en:3.1.0.*not prepared.*--tfds_data_dir"):
            seqio.get_mixture_or_task(f"c4_{objective}").get_dataset({"inputs": 32, "targets": 32}, split="train")
    finally:
        seqio.set_tfds_data_dir_override(None)
        seqio.utils.LazyTfdsLoader._MEMOIZED_BUILDERS.clear()


def test_register_family_task_over_user_files(tmp_path):
    (tmp_path / "a.txt").write_text("The first document. It has two sentences!\nA second document, longer than one.\n")
    name = f"tmp_{uuid.uuid4().hex}"
    task = registration.register_family_task(name, "bart_denoising", {"train": str(tmp_path / "*.txt")})
    try:
        example = next(task.get_dataset({"inputs": 16, "targets": 16}, split="train", shuffle=False).as_numpy_iterator())
        assert example["targets"][-1] == 1 and len(example["targets"]) == 16
    finally:
        seqio.TaskRegistry.remove(name)
    with pytest.raises(ValueError, match="Unknown objective 'gpt'"):
        registration.register_family_task(name, "gpt", {"train": str(tmp_path / "*.txt")})
