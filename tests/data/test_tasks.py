"""The registered tasks: bundled corpus end to end, your own files, TFDS absent offline."""

from __future__ import annotations

import numpy as np
import pytest
import seqio

from t5x_lite.data import pipeline, tasks


def test_bundled_task_gives_packed_batches():
    ds = pipeline.get_dataset("bundled_span_corruption", {"inputs": 64, "targets": 16}, 4,
                              seqio.EncDecFeatureConverter, split="validation", shuffle=False, num_epochs=1, seed=0)
    batch = next(ds.as_numpy_iterator())
    assert batch["encoder_input_tokens"].shape == (4, 64)
    assert batch["decoder_target_tokens"].shape == (4, 16)
    assert batch["encoder_segment_ids"].max() >= 1
    sentinel = 8099  # <extra_id_0> is the last id of the bundled vocabulary
    assert np.any(batch["encoder_input_tokens"] == sentinel)
    assert np.any(batch["decoder_target_tokens"] == sentinel)


def test_same_seed_same_batches_different_seed_different():
    def first_batch(seed):
        ds = pipeline.get_dataset("bundled_span_corruption", {"inputs": 64, "targets": 16}, 2,
                                  seqio.EncDecFeatureConverter, split="validation", shuffle=True, seed=seed)
        return next(ds.as_numpy_iterator())["encoder_input_tokens"]

    np.testing.assert_array_equal(first_batch(1), first_batch(1))
    assert not np.array_equal(first_batch(1), first_batch(2))


def test_register_task_over_user_files(tmp_path):
    (tmp_path / "a.txt").write_text("The first document of my corpus.\nAnd a second one, somewhat longer.\n")
    task = tasks.register_span_corruption_task("tmp_user_corpus", {"train": str(tmp_path / "*.txt")})
    try:
        example = next(task.get_dataset({"inputs": 16, "targets": 8}, split="train", shuffle=False).as_numpy_iterator())
        assert example["targets"][-1] == 1 and example["inputs"][-1] == 1  # EOS
    finally:
        seqio.TaskRegistry.remove("tmp_user_corpus")


def test_register_task_with_no_matching_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        tasks.register_span_corruption_task("tmp_missing", {"train": str(tmp_path / "nothing*.txt")})


def test_c4_absent_fails_at_once_naming_the_flag(tmp_path):
    seqio.set_tfds_data_dir_override(str(tmp_path))
    seqio.utils.LazyTfdsLoader._MEMOIZED_BUILDERS.clear()
    try:
        with pytest.raises(FileNotFoundError, match=r"c4/en:3.1.0.*not prepared.*--tfds_data_dir"):
            seqio.get_mixture_or_task("c4_span_corruption").get_dataset({"inputs": 64, "targets": 16}, split="train")
    finally:
        seqio.set_tfds_data_dir_override(None)
        seqio.utils.LazyTfdsLoader._MEMOIZED_BUILDERS.clear()
