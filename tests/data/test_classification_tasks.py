"""Classification and tagging tasks: bundled sets, GLUE registrations, feature converters, metrics."""

from __future__ import annotations

import collections
import sys

import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5x_lite.data import feature_converters, registration, special_tokens, vocab
from t5x_lite.data.metrics import classification as cls_metrics
from t5x_lite.data.preprocessors import classification as cls_preprocessors
from t5x_lite.tasks import classification as cls_tasks

VOCAB = vocab.get_vocabulary()
SPECIAL = special_tokens.bert_special_ids(VOCAB)
CLS, SEP = SPECIAL.cls, SPECIAL.sep


def examples(task_name: str, split: str, lengths: dict[str, int]) -> list[dict]:
    task = seqio.get_mixture_or_task(task_name)
    return list(task.get_dataset(lengths, split=split, shuffle=False, num_epochs=1).as_numpy_iterator())


def test_bundled_single_sentence_set_is_balanced_and_well_formed():
    for split, count in (("train", 2494), ("validation", 666)):
        rows = examples("bundled_cls_single", split, {"inputs": 96, "targets": 1})
        assert len(rows) == count
        labels = collections.Counter(int(r["targets"][0]) for r in rows)
        assert labels == {0: count // 2, 1: count // 2}
        for r in rows:
            assert r["inputs"][0] == CLS and r["inputs"][-1] == SEP and SEP not in r["inputs"][1:-1]
    first = rows[0]
    assert VOCAB.decode(first["inputs"][1:-1].tolist()) == first["inputs_pretokenized"].decode()


def test_bundled_sets_keep_validation_text_out_of_training():
    for stem in ("author", "next"):
        train = set((cls_tasks.CLS_DIR / f"{stem}_train.tsv").read_text().splitlines()[1:])
        validation = (cls_tasks.CLS_DIR / f"{stem}_validation.tsv").read_text().splitlines()[1:]
        assert not train & set(validation)
    # The author set's texts: no speaker labels or stage directions left as cues.
    for line in (cls_tasks.CLS_DIR / "author_train.tsv").read_text().splitlines()[1:]:
        label, text = line.split("\t")
        assert label in cls_tasks.AUTHOR_LABELS and "[" not in text and 10 <= len(text.split()) <= 41


def test_pair_inputs_and_token_types():
    rows = examples("bundled_cls_pair", "validation", {"inputs": 160, "targets": 1})
    assert len(rows) == 300 and sum(int(r["targets"][0]) for r in rows) == 150
    converted = list(feature_converters.ClassificationFeatureConverter(pack=True)(
        seqio.get_mixture_or_task("bundled_cls_pair").get_dataset(
            {"inputs": 160, "targets": 1}, split="validation", shuffle=False), {"inputs": 160, "targets": 1}
    ).take(3).as_numpy_iterator())
    for row in converted:
        tokens, types = row["encoder_input_tokens"], row["encoder_token_type_ids"]
        seps = np.flatnonzero(tokens == SEP)
        assert len(seps) == 2 and tokens[0] == CLS
        assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1 : seps[1] + 1] == 1).all()
        assert (types[seps[1] + 1 :] == 0).all() and (tokens[seps[1] + 1 :] == 0).all()
        assert row["labels"].shape == (1,)


def test_classification_converter_never_packs_and_checks_the_targets_length():
    ds = tf.data.Dataset.from_tensors({"inputs": tf.constant([CLS, 5, 6, SEP], tf.int32), "targets": tf.constant([1])})
    converter = feature_converters.ClassificationFeatureConverter(pack=True)
    assert not converter.pack
    (row,) = list(converter(ds.repeat(2), {"inputs": 8, "targets": 1}).as_numpy_iterator())[:1]
    np.testing.assert_array_equal(row["encoder_input_tokens"], [CLS, 5, 6, SEP, 0, 0, 0, 0])
    np.testing.assert_array_equal(row["encoder_token_type_ids"], np.zeros(8))
    with pytest.raises(ValueError, match="'targets': 1"):
        converter(ds, {"inputs": 8, "targets": 2})


def test_truncation_keeps_special_tokens_longest_first():
    features = registration.classification_output_features(("no", "yes"))
    ds = tf.data.Dataset.from_tensors({"a": " ".join(["to"] * 30), "b": "be or not", "label": 1})
    (row,) = list(cls_preprocessors.to_bert_inputs(ds, features, {"inputs": 12}, text_keys=("a", "b")).as_numpy_iterator())
    b_ids = VOCAB.encode("be or not")
    assert len(row["inputs"]) == 12 and row["inputs"][0] == CLS and row["inputs"][-1] == SEP
    assert row["inputs"][-1 - len(b_ids) : -1].tolist() == b_ids  # the short sentence is kept whole
    a, b = tf.range(10), tf.range(20)
    assert [int(tf.size(x)) for x in cls_preprocessors.truncate_pair(a, b, 9)] == [5, 4]
    assert [int(tf.size(x)) for x in cls_preprocessors.truncate_pair(a, tf.range(3), 9)] == [6, 3]
    assert [int(tf.size(x)) for x in cls_preprocessors.truncate_pair(a, tf.range(3), 20)] == [10, 3]


def test_tagging_tags_the_first_piece_of_each_word():
    rows = examples("bundled_tagging", "validation", {"inputs": 160, "targets": 160})
    assert len(rows) == 300
    line = (cls_tasks.CLS_DIR / "speakers_validation.tsv").read_text().splitlines()[1]
    words, tags = (field.split() for field in line.split("\t"))
    first = rows[0]
    assert first["inputs"][0] == CLS and first["inputs"][-1] == SEP and len(first["inputs"]) == len(first["targets"])
    starts = np.flatnonzero(first["targets"] > 0)
    assert len(starts) == len(words)
    assert [cls_tasks.SPEAKER_TAGS[t - 1] for t in first["targets"][starts]] == tags
    pieces = first["inputs"].tolist()
    for word, start, end in zip(words, starts, [*starts[1:], len(pieces) - 1], strict=True):
        assert VOCAB.decode(pieces[start:end]) == word


def test_tagging_converter_keeps_tags_aligned_when_packing():
    ds = tf.data.Dataset.from_generator(
        lambda: iter([([CLS, 7, 8, 9, SEP], [0, 2, 0, 1, 0]), ([CLS, 5, 6, SEP], [0, 1, 3, 0])]),
        output_signature=(tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int32)),
    ).map(lambda i, t: {"inputs": i, "targets": t})
    (row,) = list(feature_converters.TaggingFeatureConverter(pack=True)(ds, {"inputs": 10, "targets": 10}).as_numpy_iterator())
    np.testing.assert_array_equal(row["encoder_input_tokens"], [CLS, 7, 8, 9, SEP, CLS, 5, 6, SEP, 0])
    np.testing.assert_array_equal(row["encoder_target_tokens"], [0, 2, 0, 1, 0, 0, 1, 3, 0, 0])
    np.testing.assert_array_equal(row["encoder_loss_weights"], [0, 1, 0, 1, 0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(row["encoder_segment_ids"], [1, 1, 1, 1, 1, 2, 2, 2, 2, 0])
    np.testing.assert_array_equal(row["encoder_positions"], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0])
    with pytest.raises(ValueError, match="lengths must be equal"):
        feature_converters.TaggingFeatureConverter(pack=False)(ds, {"inputs": 10, "targets": 8})


def test_unknown_label_fails_the_pipeline(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("label\tsentence\npositive\tgood\nmaybe\tso so\n")
    task = registration.register_classification_task("test_cls_unknown_label", {"train": str(path)}, ("negative", "positive"),
                                           overwrite=True)
    ds = task.get_dataset({"inputs": 16, "targets": 1}, split="train", shuffle=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="a label is not one of"):
        list(ds.as_numpy_iterator())
    with pytest.raises(FileNotFoundError, match="no file matches"):
        registration.register_classification_task("test_cls_missing", {"train": str(tmp_path / "nope.tsv")}, ("a", "b"))


def test_metrics():
    assert cls_metrics.classification_metrics([0, 1, 1, 0], [0, 1, 0, 0]) == pytest.approx(
        {"accuracy": 75.0, "macro_f1": 100 * (0.8 + 2 / 3) / 2})
    assert cls_metrics.bio_spans(["B-SPK", "I-SPK", "O", "B-PER", "I-SPK", "I-PER"]) == {
        (0, 2, "SPK"), (3, 4, "PER"), (4, 5, "SPK"), (5, 6, "PER")}
    metrics = cls_metrics.tagging_metrics_fn(cls_tasks.SPEAKER_TAGS)
    gold = [[2, 3, 1, 4], [2, 1, 1, 1]]
    assert metrics(gold, gold)["f1"] == 100.0
    predicted = [[2, 1, 1, 4], [2, 1, 4, 1]]  # SPK span cut short, a spurious PER
    scores = metrics(gold, predicted)
    assert scores["precision"] == pytest.approx(100 * 2 / 4) and scores["recall"] == pytest.approx(100 * 2 / 3)
    assert scores["accuracy"] == pytest.approx(100 * 6 / 8)
    example = {"targets": np.array([0, 2, 0, 1, 0])}
    assert cls_metrics.postprocess_tags([0, 2, 2, 3, 1, 1, 1], example=example) == [2, 3]
    assert cls_metrics.postprocess_label(np.array([1])) == 1


def test_evaluator_scores_perfect_predictions_fully():
    """Through seqio.Evaluator as the trainer runs it: gold predictions, padded to the targets length."""
    for name, lengths, converter in (("bundled_cls_single", {"inputs": 96, "targets": 1}, feature_converters.ClassificationFeatureConverter),
                                     ("bundled_tagging", {"inputs": 160, "targets": 160}, feature_converters.TaggingFeatureConverter)):
        evaluator = seqio.Evaluator(name, feature_converter=converter(pack=False), eval_split="validation",
                                    sequence_length=lengths, num_examples=40)
        gold_key = "labels" if name == "bundled_cls_single" else "encoder_target_tokens"

        def predict(ds, gold_key=gold_key):
            return [(int(i), ex[gold_key].tolist()) for i, ex in ds.as_numpy_iterator()]

        metrics, _ = evaluator.evaluate(compute_metrics=True, predict_fn=predict)
        scores = metrics.result()[name]
        assert scores["accuracy"] == 100.0, (name, scores)
        assert scores.get("f1", scores.get("macro_f1")) == 100.0


GLUE = [("glue_sst2", "glue/sst2:2.0.0"), ("glue_mnli", "glue/mnli:2.0.0"), ("glue_rte", "glue/rte:2.0.0")]


@pytest.mark.parametrize("task_name, tfds_name", GLUE)
def test_glue_tasks_absent_fail_at_once_naming_the_flag(tmp_path, task_name, tfds_name):
    seqio.set_tfds_data_dir_override(str(tmp_path))
    seqio.utils.LazyTfdsLoader._MEMOIZED_BUILDERS.clear()
    try:
        task = seqio.get_mixture_or_task(task_name)
        with pytest.raises(FileNotFoundError, match=rf"{tfds_name}.*not prepared.*--tfds_data_dir"):
            task.get_dataset({"inputs": 32, "targets": 1}, split="validation")
    finally:
        seqio.set_tfds_data_dir_override(None)
        seqio.utils.LazyTfdsLoader._MEMOIZED_BUILDERS.clear()


def test_glue_mnli_records_become_pairs():
    task = seqio.get_mixture_or_task("glue_mnli")
    assert set(task.splits) == {"train", "validation", "validation_mismatched"}
    ds = tf.data.Dataset.from_tensors({"premise": "The cat sat.", "hypothesis": "A cat sat.", "label": tf.constant(2, tf.int64),
                                       "idx": tf.constant(0, tf.int32)})
    ds = task.preprocess_postcache(task.preprocess_precache(ds), sequence_length={"inputs": 32, "targets": 1})
    (row,) = list(ds.as_numpy_iterator())
    assert row["inputs"].tolist() == [CLS, *VOCAB.encode("The cat sat."), SEP, *VOCAB.encode("A cat sat."), SEP]
    assert row["targets"].tolist() == [2]


def test_build_tool_reproduces_the_bundled_files(tmp_path):
    sys.path.insert(0, str(cls_tasks.CLS_DIR.parents[3] / "tools"))
    import build_classification

    build_classification.build_files(cls_tasks.CLS_DIR.parent, tmp_path)
    for path in sorted(cls_tasks.CLS_DIR.glob("*.tsv")):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_label_vocabulary_names_labels_and_tags_for_infer():
    from t5x_lite import infer

    labels = vocab.LabelVocabulary(cls_tasks.AUTHOR_LABELS)
    assert labels.size == 2 and labels.decode([1]) == [1]  # ids pass through for the metrics
    assert infer.readable(labels, [1], [0]) == "milton"
    tags = vocab.LabelVocabulary(cls_tasks.SPEAKER_TAGS, first_id=1)
    gold = [0, 2, 0, 3, 1, 0]  # [CLS], three words (one of two pieces), [SEP]
    assert infer.readable(tags, [4, 2, 1, 3, 1, 4], gold) == ["B-SPK", "I-SPK", "O"]
    assert infer.readable(tags, gold, gold) == ["B-SPK", "I-SPK", "O"]
    with pytest.raises(ValueError, match=r"Label id 5 is not one of this task's ids 1\.\.4 .*num_labels"):
        infer.readable(tags, [0, 5, 0, 1, 1, 0], gold)
    features = seqio.get_mixture_or_task("bundled_tagging").output_features
    assert features["targets"].vocabulary.names == cls_tasks.SPEAKER_TAGS
    to_be, question = VOCAB.encode("to be"), VOCAB.encode("that is the question")
    assert infer.readable_bert_inputs(VOCAB, [CLS, *to_be, SEP, *question, SEP, 0, 0]) == "to be [SEP] that is the question"
    assert infer.readable_bert_inputs(VOCAB, [CLS, *to_be, SEP]) == "to be"
