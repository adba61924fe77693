"""The registered tasks: bundled corpus end to end, lookup by name, your own files, TFDS absent offline."""

from __future__ import annotations

import numpy as np
import pytest
import seqio

import t5x_lite.tasks  # noqa: F401  (registers the bundled tasks these tests read)
from t5x_lite.data import pipeline, registration


def assert_packed_rows(tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray) -> None:
    """Each row: segments 1, 2, ..., k side by side, then padding; positions restart at 0 in each segment."""
    for row_tokens, row_segments, row_positions in zip(tokens, segment_ids, positions, strict=True):
        used = row_segments > 0
        k = row_segments.max()
        assert used.sum() == used[: used.sum()].sum()  # padding only at the end
        assert np.array_equal(np.unique(row_segments[used]), np.arange(1, k + 1))
        assert np.all(np.diff(row_segments[used]) >= 0)  # each example is one contiguous run
        for segment in range(1, k + 1):
            np.testing.assert_array_equal(row_positions[row_segments == segment], np.arange(np.sum(row_segments == segment)))
        assert np.all(row_tokens[~used] == 0) and np.all(row_positions[~used] == 0)


def test_bundled_task_gives_packed_batches():
    """Short examples (yes/no questions, 2-token answers) are packed: several share every row."""
    ds = pipeline.get_dataset("bundled_qa_yes_no", {"inputs": 512, "targets": 64}, 4,
                              seqio.EncDecFeatureConverter, split="validation", shuffle=False, num_epochs=1, seed=0)
    batch = next(ds.as_numpy_iterator())
    assert batch["encoder_input_tokens"].shape == (4, 512) and batch["decoder_target_tokens"].shape == (4, 64)
    for side, tokens in (("encoder", "encoder_input_tokens"), ("decoder", "decoder_target_tokens")):
        segments = batch[f"{side}_segment_ids"]
        assert np.all(segments.max(axis=1) >= 2), segments.max(axis=1)  # 2+ examples in every row
        assert_packed_rows(batch[tokens], segments, batch[f"{side}_positions"])
    np.testing.assert_array_equal(batch["encoder_segment_ids"].max(axis=1), batch["decoder_segment_ids"].max(axis=1))
    # Every packed target is one whole answer: `yes` or `no`, then EOS.
    targets, segments = batch["decoder_target_tokens"], batch["decoder_segment_ids"]
    answers = {tuple(targets[r][segments[r] == s]) for r in range(4) for s in range(1, segments[r].max() + 1)}
    vocabulary = seqio.get_mixture_or_task("bundled_qa_yes_no").output_features["targets"].vocabulary
    assert {vocabulary.decode(list(a)) for a in answers} <= {"yes", "no"} and all(a[-1] == 1 for a in answers)


def test_bundled_span_corruption_fills_each_row_with_one_chunk():
    """Span corruption packs the document stream itself: each chunk's inputs fill the row (no room to pack more)."""
    ds = pipeline.get_dataset("bundled_span_corruption", {"inputs": 64, "targets": 16}, 4,
                              seqio.EncDecFeatureConverter, split="validation", shuffle=False, num_epochs=1, seed=0)
    batch = next(ds.as_numpy_iterator())
    assert batch["encoder_input_tokens"].shape == (4, 64)
    assert batch["decoder_target_tokens"].shape == (4, 16)
    assert batch["encoder_segment_ids"].max() >= 1
    np.testing.assert_array_equal(batch["encoder_segment_ids"], np.ones((4, 64)))
    np.testing.assert_array_equal(batch["encoder_positions"], np.tile(np.arange(64), (4, 1)))
    assert_packed_rows(batch["decoder_target_tokens"], batch["decoder_segment_ids"], batch["decoder_positions"])
    sentinel = 8099  # <extra_id_0> is the last id of the bundled vocabulary
    assert np.any(batch["encoder_input_tokens"] == sentinel)
    assert np.any(batch["decoder_target_tokens"] == sentinel)


def test_unknown_name_gets_close_names():
    with pytest.raises(ValueError, match=r"Unknown task or mixture 'bundled_span_corruptoin'\. Did you mean "
                                         r"'bundled_span_corruption'.*MIXTURE_OR_TASK_MODULE"):
        pipeline.get_mixture_or_task("bundled_span_corruptoin")
    with pytest.raises(ValueError, match=r"Unknown task or mixture 'zzz'\. Register it"):
        pipeline.get_mixture_or_task("zzz")


def test_same_seed_same_batches_different_seed_different():
    def first_batch(seed):
        ds = pipeline.get_dataset("bundled_span_corruption", {"inputs": 64, "targets": 16}, 2,
                                  seqio.EncDecFeatureConverter, split="validation", shuffle=True, seed=seed)
        return next(ds.as_numpy_iterator())["encoder_input_tokens"]

    np.testing.assert_array_equal(first_batch(1), first_batch(1))
    assert not np.array_equal(first_batch(1), first_batch(2))


def test_register_task_over_user_files(tmp_path):
    (tmp_path / "a.txt").write_text("The first document of my corpus.\nAnd a second one, somewhat longer.\n")
    task = registration.register_span_corruption_task("tmp_user_corpus", {"train": str(tmp_path / "*.txt")})
    try:
        example = next(task.get_dataset({"inputs": 16, "targets": 8}, split="train", shuffle=False).as_numpy_iterator())
        assert example["targets"][-1] == 1 and example["inputs"][-1] == 1  # EOS
    finally:
        seqio.TaskRegistry.remove("tmp_user_corpus")


def test_register_task_with_no_matching_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        registration.register_span_corruption_task("tmp_missing", {"train": str(tmp_path / "nothing*.txt")})


def test_c4_absent_fails_at_once_naming_the_flag(tmp_path):
    seqio.set_tfds_data_dir_override(str(tmp_path))
    seqio.utils.LazyTfdsLoader._MEMOIZED_BUILDERS.clear()
    try:
        with pytest.raises(FileNotFoundError, match=r"c4/en:3.1.0.*not prepared.*--tfds_data_dir"):
            seqio.get_mixture_or_task("c4_span_corruption").get_dataset({"inputs": 64, "targets": 16}, split="train")
    finally:
        seqio.set_tfds_data_dir_override(None)
        seqio.utils.LazyTfdsLoader._MEMOIZED_BUILDERS.clear()


def test_task_module_registers_tasks_and_mixtures_over_the_bundled_ones(tmp_path, monkeypatch):
    """`MIXTURE_OR_TASK_MODULE`: the user's module may name the bundled tasks, which register before it."""
    (tmp_path / "corpus.txt").write_text("A first document of the user.\nAnd a second, a little longer one.\n")
    (tmp_path / "my_tasks_module.py").write_text(
        "import seqio\n"
        "from t5x_lite.data import registration\n"
        f"registration.register_span_corruption_task('tmp_module_corpus', {{'train': {str(tmp_path / 'corpus.txt')!r}}})\n"
        "seqio.MixtureRegistry.add('tmp_module_mixture', [('tmp_module_corpus', 1.0), ('bundled_span_corruption', 1.0)])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        pipeline.import_task_module("my_tasks_module")
        mixture = pipeline.get_mixture_or_task("tmp_module_mixture")
        assert sorted(task.name for task in mixture.tasks) == ["bundled_span_corruption", "tmp_module_corpus"]
    finally:
        seqio.MixtureRegistry.remove("tmp_module_mixture")
        seqio.TaskRegistry.remove("tmp_module_corpus")
