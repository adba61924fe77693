"""The catalogue of bad inputs: each gets one clear error naming the bad value and the fix.

Covered elsewhere (tests/test_cli.py): unknown task with close-name suggestions, a vocabulary
larger than the model, malformed gin (file:line), a MODEL_DIR under a file. Here: data files,
empty splits, long sequences, out-of-vocabulary ids, damaged and mismatched checkpoints, a
read-only or full MODEL_DIR, a mesh larger than the device count.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import gin
import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf
from clu.data.dataset_iterator import TfDatasetIterator

from t5x_lite import checkpoints, cli, partitioning
from t5x_lite.data import pipeline
from t5x_lite.data.position import DataIterator, DataLayout
from t5x_lite.models.seq2seq import EncoderDecoderModel
from t5x_lite.networks.t5 import T5Config
from t5x_lite.training import loop, optimizers, steps, train_state

TINY = T5Config(vocab_size=64, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=1,
                num_decoder_layers=1)
SMALL = ["BATCH_SIZE = 8", "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 8}", "train.eval_period = 0",
         "train.progress_bar = False"]


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def parse(model_dir: Path, *bindings: str) -> None:
    cli.parse_gin([str(cli.GIN_CONFIGS_DIR / "quickstart.gin")], [*SMALL, f"MODEL_DIR = '{model_dir}'", *bindings])


def text_files(tmp_path: Path, train_files: str) -> list[str]:
    return ["MIXTURE_OR_TASK_NAME = @text_files_task()", f"text_files_task.name = 'bad_input_{tmp_path.name}'",
            f"text_files_task.train_files = '{train_files}'"]


def first_batch(task_name: str, lengths: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """What the trainer does for step 1 (without building a model): the pipeline, then `next_batch`."""
    provider = pipeline.get_mixture_or_task(task_name)
    ds = pipeline.get_dataset(task_name, lengths or {"inputs": 32, "targets": 8}, 8, seqio.EncDecFeatureConverter,
                              split="train", shuffle=True, num_epochs=None, seed=0)
    vocab_limit = max(feature.vocabulary.vocab_size for feature in provider.output_features.values())
    return loop.next_batch(TfDatasetIterator(ds, checkpoint=True), 1, task_name, vocab_limit)


def text_files_task(tmp_path: Path, train_files: Path, validation_files: Path | None = None) -> str:
    from t5x_lite.data import registration

    return registration.text_files_task(name=f"bad_input_{tmp_path.name}", train_files=str(train_files),
                                 validation_files=None if validation_files is None else str(validation_files))


# --- data ---------------------------------------------------------------------------------


def test_missing_data_files_name_the_pattern(clean_gin, tmp_path):
    parse(tmp_path / "run", *text_files(tmp_path, str(tmp_path / "nowhere" / "*.txt")))
    with pytest.raises(FileNotFoundError) as info:
        loop.train()
    assert cli.one_line_error(info.value) == (
        f"Task 'bad_input_{tmp_path.name}': no file matches ['{tmp_path / 'nowhere' / '*.txt'}'] for split 'train'."
    )


def test_unreadable_data_file(tmp_path):
    bad = tmp_path / "corpus.txt"
    if os.geteuid() == 0:  # root reads through permission bits: a folder where a file should be
        bad.mkdir()
        reason = "Is a directory"
    else:
        bad.write_text("some text\n")
        bad.chmod(0)
        reason = "Permission denied"
    with pytest.raises(cli.UserError, match=rf"Reading the data of 'bad_input_\w+' failed at step 1: {bad}; {reason}\. "
                                               r"Check the task's data files\."):
        first_batch(text_files_task(tmp_path, bad))


def test_empty_train_split(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(cli.UserError, match=r"The train split of 'bad_input_\w+' gave no examples at step 1: it is empty"):
        first_batch(text_files_task(tmp_path, tmp_path / "empty.txt"))


def test_empty_validation_split(tmp_path):
    (tmp_path / "train.txt").write_text("a line of text for training\n" * 50)
    (tmp_path / "empty.txt").write_text("")
    name = text_files_task(tmp_path, tmp_path / "train.txt", tmp_path / "empty.txt")
    with pytest.raises(cli.UserError, match=r"Split 'validation' of 'bad_input_\w+' has no examples after preprocessing; add examples"):
        loop.load_eval_batches(EncoderDecoderModel(TINY), name, {"inputs": 32, "targets": 8}, 8, "validation", 2, 0)


def test_long_sequences_truncate_by_default(clean_gin):
    ds = pipeline.get_dataset("bundled_qa_extractive", {"inputs": 32, "targets": 8}, 4, seqio.EncDecFeatureConverter,
                              split="train", shuffle=False, num_epochs=1, seed=0, pack=False)
    batch = next(ds.as_numpy_iterator())
    assert batch["encoder_input_tokens"].shape == (4, 32)
    assert (batch["encoder_input_tokens"][:, -1] == 1).all()  # cut to fit, still ending in EOS


@pytest.mark.slow
def test_long_sequences_error_when_asked(clean_gin, tmp_path):
    """Through the trainer, as a user meets it."""
    parse(tmp_path / "run", "MIXTURE_OR_TASK_NAME = 'bundled_qa_extractive'", "fit_to_length.long_sequences = 'error'")
    with pytest.raises(cli.UserError, match=r"failed at step 1: An example's 'inputs' \(with EOS\) is longer than "
                                               r"TASK_FEATURE_LENGTHS allows \(32 tokens\); it has \d+\. Raise "
                                               r"TASK_FEATURE_LENGTHS, or set --gin.fit_to_length.long_sequences"):
        loop.train()


def test_long_sequences_bad_choice(clean_gin):
    gin.parse_config("fit_to_length.long_sequences = 'cut'")
    with pytest.raises(ValueError, match="fit_to_length.long_sequences must be 'truncate' or 'error', got 'cut'"):
        pipeline.get_dataset("bundled_qa_extractive", {"inputs": 32, "targets": 8}, 4, seqio.EncDecFeatureConverter)


@pytest.fixture
def pretokenized_task():
    """A task of ready-made ids up to 150 over a vocabulary of 100."""
    name = "bad_input_pretokenized"
    vocabulary = seqio.PassThroughVocabulary(size=100)

    def dataset_fn(split, shuffle_files, seed=None):
        example = {"inputs": tf.constant([5, 150, 7], tf.int32), "targets": tf.constant([3, 4], tf.int32)}
        return tf.data.Dataset.from_tensors(example).repeat(64)

    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(dataset_fn, splits=["train"]), preprocessors=[],
        output_features={k: seqio.Feature(vocabulary=vocabulary, add_eos=False) for k in ("inputs", "targets")},
    )
    yield name
    seqio.TaskRegistry.remove(name)


def test_token_ids_outside_the_vocabulary(pretokenized_task):
    with pytest.raises(cli.UserError, match=r"Batch of step 1 has token id 150 in 'encoder_input_tokens', outside the "
                                               r"vocabulary's \[0, 100\)"):
        first_batch(pretokenized_task)


def test_negative_token_ids():
    with pytest.raises(cli.UserError, match=r"step 7 has token id -3 in 'decoder_target_tokens'"):
        loop.check_token_ids({"decoder_target_tokens": np.array([[1, -3]]), "decoder_loss_weights": np.ones((1, 2))},
                                  100, 7)


# --- checkpoints --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    """(state, abstract state) of a tiny T5, built once for the checkpoint tests."""
    mesh = partitioning.make_mesh({"data": -1})
    tx = optimizers.adafactor(optimizers.constant_schedule(1e-2))
    state, shardings, _ = train_state.create_train_state(EncoderDecoderModel(TINY), tx, 0, mesh,
                                                         partitioning.logical_axis_rules())
    return state, train_state.abstract_train_state(state, shardings)


def at_step(state, step: int):
    return state.replace(step=jax.numpy.asarray(step, state.step.dtype))


def iterator() -> DataIterator:
    """A data position over one shard of batches [0], [1], [2], ..."""
    return DataIterator(lambda layout, shard: tf.data.Dataset.range(100).map(lambda x: {"x": [x]}),
                        DataLayout("shard_info", 1, 1), 0, 1)


def save_steps(model_dir: Path, state, steps: list[int]):
    manager = checkpoints.checkpoint_manager(str(model_dir), async_save=False)
    for step in steps:
        checkpoints.save(manager, at_step(state, step), iterator())
    return manager


def damage(step_dir: Path, how: str) -> None:
    if how == "truncated":
        for f in (step_dir / "state").rglob("d/*"):
            f.write_bytes(b"")
    else:
        (step_dir / "state" / "_METADATA").unlink()


@pytest.mark.parametrize("how", ["truncated", "missing_metadata"])
def test_damaged_checkpoint_names_it_and_the_newest_good_one(tmp_path, tiny, how):
    state, abstract = tiny
    manager = save_steps(tmp_path, state, [1, 2])
    folder = tmp_path / "checkpoints"
    damage(folder / "2", how)
    with pytest.raises(checkpoints.CheckpointRestoreError,
                       match=rf"Checkpoint {folder / '2'} is damaged and cannot be restored \(.+\)\. The newest checkpoint "
                             rf"that restores is {folder / '1'}: move {folder / '2'} out of {folder} to resume from step 1\."):
        checkpoints.restore_latest(manager, abstract, iterator())
    assert (folder / "2" / "state").is_dir()  # nothing deleted
    manager.close()


def test_no_checkpoint_restores(tmp_path, tiny):
    state, abstract = tiny
    manager = save_steps(tmp_path, state, [1, 2])
    for step in (1, 2):
        damage(tmp_path / "checkpoints" / str(step), "truncated")
    with pytest.raises(checkpoints.CheckpointRestoreError, match="No older checkpoint restores either; move .* aside"):
        checkpoints.restore_latest(manager, abstract, iterator())
    manager.close()


def test_checkpoint_of_another_model_shape(tmp_path, tiny):
    """MODEL_DIR holds a checkpoint with d_ff=32; resuming with d_ff=48 names the first parameter that differs."""
    state, _ = tiny
    save_steps(tmp_path, state, [1]).close()
    mesh = partitioning.make_mesh({"data": -1})
    tx = optimizers.adafactor(optimizers.constant_schedule(1e-2))
    wider = EncoderDecoderModel(dataclasses.replace(TINY, d_ff=48))
    other = train_state.abstract_train_state(
        *train_state.create_train_state(wider, tx, 0, mesh, partitioning.logical_axis_rules())[:2])
    with checkpoints.checkpoint_manager(str(tmp_path)) as manager, pytest.raises(
        checkpoints.CheckpointMismatch,
        match=r"Parameter decoder/layers/0/mlp/wi_0/kernel has shape \(16, 32\) in checkpoint .*checkpoints/1/state "
              r"but \(16, 48\) in this model; use the model config the checkpoint was trained with",
    ):
        checkpoints.restore_latest(manager, other, iterator())


def test_checkpoint_of_another_optimizer(tmp_path, tiny):
    """Turning train.skip_nonfinite_updates on for a run that was saved without it."""
    state, _ = tiny
    save_steps(tmp_path, state, [1]).close()
    mesh = partitioning.make_mesh({"data": -1})
    tx = steps.skip_nonfinite_updates(optimizers.adafactor(optimizers.constant_schedule(1e-2)))
    other = train_state.abstract_train_state(
        *train_state.create_train_state(EncoderDecoderModel(TINY), tx, 0, mesh, partitioning.logical_axis_rules())[:2])
    with checkpoints.checkpoint_manager(str(tmp_path)) as manager, pytest.raises(
        checkpoints.CheckpointMismatch,
        match=r"holds a train state of \d+ arrays but this run's has \d+: the optimizer or its options \(e.g. "
              r"train.skip_nonfinite_updates\) changed since it was written",
    ):
        checkpoints.restore_latest(manager, other, iterator())


@pytest.mark.slow
def test_resuming_a_checkpoint_of_another_model_shape(clean_gin, tmp_path):
    """Through the trainer: MODEL_DIR holds a checkpoint with d_ff=64; the config asks for the quickstart's d_ff=256."""
    model = EncoderDecoderModel(T5Config(vocab_size=8192, d_model=128, num_heads=4, head_dim=32, d_ff=64,
                                         num_encoder_layers=2, num_decoder_layers=2, feed_forward="gated-gelu",
                                         tie_word_embeddings=False))
    mesh = partitioning.make_mesh({"data": -1})
    tx = optimizers.adafactor(optimizers.rsqrt_schedule())
    state, _, _ = train_state.create_train_state(model, tx, 0, mesh, partitioning.logical_axis_rules())
    save_steps(tmp_path, state, [0]).close()
    parse(tmp_path)
    with pytest.raises(cli.UserError, match=r"MODEL_DIR: Parameter decoder/layers/0/mlp/wi_0/kernel has shape \(128, 64\) "
                                               r"in checkpoint .*checkpoints/0/state but \(128, 256\) in this model"):
        loop.train()


def test_read_only_model_dir(clean_gin, tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits: a path under a file instead
        (tmp_path / "a_file").write_text("")
        model_dir, reason = tmp_path / "a_file" / "run", "Not a directory"
    else:
        (tmp_path / "read_only").mkdir(mode=0o555)
        model_dir, reason = tmp_path / "read_only" / "run", "Permission denied"
    parse(model_dir)
    with pytest.raises(cli.UserError, match=rf"MODEL_DIR '{model_dir}' is not writable \({reason}\); pick a folder"):
        loop.train()


class FullDiskIterator(DataIterator):
    """Writing its state fails as TF reports a full disk."""

    def save(self, directory):
        raise tf.errors.ResourceExhaustedError(None, None, f"{directory}/shard_0-of-1.index; No space left on device")


@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_while_saving(tmp_path, tiny, async_save):
    state, _ = tiny
    manager = checkpoints.checkpoint_manager(str(tmp_path), async_save=async_save)
    checkpoints.save(manager, at_step(state, 5), iterator())
    full = FullDiskIterator(lambda layout, shard: tf.data.Dataset.range(3).map(lambda x: {"x": [x]}),
                            DataLayout("shard_info", 1, 1), 0, 1)
    with pytest.raises(OSError, match=rf"Could not write checkpoint step 6 to {tmp_path / 'checkpoints'} \(writing the "
                                      r"data-iterator state failed: .*No space left on device\)\. Free disk space or make "
                                      r"MODEL_DIR writable, then re-run the same command: the newest complete checkpoint "
                                      r"is step 5\."):
        checkpoints.save(manager, at_step(state, 6), full)
    manager.close()


def test_full_disk_reported_by_tensorstore(tmp_path):
    """Array writes fail in tensorstore, which names the OS error by its code."""
    manager = checkpoints.checkpoint_manager(str(tmp_path))
    error = ValueError('RESOURCE_EXHAUSTED: Error writing "params.a/0" in OCDBT database at local file "x": '
                       "Failed to write 983715 bytes to file 17: No space left on device [os_error_code='28']")
    assert str(checkpoints.write_error(manager, None, error)) == (
        f"Could not write a checkpoint to {tmp_path / 'checkpoints'} (No space left on device). Free disk space or make "
        "MODEL_DIR writable, then re-run the same command: there is no complete checkpoint yet."
    )
    manager.close()


# --- partitioning -------------------------------------------------------------------------


def test_mesh_larger_than_the_device_count(clean_gin, tmp_path):
    parse(tmp_path, "MESH_SHAPE = {'data': 16, 'fsdp': 1, 'tensor': 1}")
    with pytest.raises(cli.UserError, match=r"MESH_SHAPE \{'data': 16, 'fsdp': 1, 'tensor': 1\} needs 16 devices but "
                                               r"8 are available; make the sizes multiply"):
        loop.train()
