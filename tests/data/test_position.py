"""The data position: a checkpoint's data shards continue exactly on another process count."""

from __future__ import annotations

import collections
import re

import numpy as np
import pytest
import seqio
from etils import epath

import t5x_lite.tasks  # noqa: F401  (registers the bundled tasks these tests read)
from t5x_lite.data import pipeline, position
from t5x_lite.data.position import DataIterator, DataLayout

LENGTHS = {"inputs": 32, "targets": 8}


def spec(batch_size: int, host_sharding: str, **options) -> pipeline.DataSpec:
    settings = {"split": "train", "shuffle": True, "num_epochs": None, "seed": 3, "pack": True, **options}
    return pipeline.DataSpec("bundled_span_corruption", LENGTHS, batch_size, seqio.EncDecFeatureConverter,
                             host_sharding=host_sharding, **settings)


def processes(data: pipeline.DataSpec, layout: DataLayout, num_processes: int) -> list[DataIterator]:
    """The data iterators of a run's `num_processes` processes, in this one process."""
    return [DataIterator(data.shard, layout, p, num_processes) for p in range(num_processes)]


def global_batches(iterators: list[DataIterator], steps: int) -> list[np.ndarray]:
    """The encoder tokens of the next `steps` global batches: every process's rows, in process order."""
    return [np.concatenate([next(it)["encoder_input_tokens"] for it in iterators]) for _ in range(steps)]


@pytest.mark.parametrize(("batch_size", "num_shards", "num_processes"),
                         [(8, 1, 2), (8, 2, 1), (8, 2, 2), (8, 2, 4), (6, 2, 3), (6, 3, 2), (12, 4, 3)])
def test_processes_cover_each_row_of_the_global_batch_once(batch_size, num_shards, num_processes):
    layout = DataLayout("shard_info", num_shards, batch_size)
    rows = [(shard, row) for p in range(num_processes) for shard, part in layout.rows(p, num_processes)
            for row in range(part.start, part.stop)]
    assert rows == [(shard, row) for shard in range(num_shards) for row in range(layout.shard_batch_size)]
    writers = [shard for p in range(num_processes) for shard in layout.written_by(p, num_processes)]
    assert writers == list(range(num_shards))  # each shard's state is saved by exactly one process


SHARDS = "reads the shards that hold its rows"
PIPELINE = "runs that pipeline and keeps its rows"


@pytest.mark.parametrize(("host_sharding", "before", "after", "batch_size", "how", "readers"), [
    ("shard_info", 2, 1, 8, "2 per-host data shard(s) (host_sharding='shard_info')", SHARDS),
    ("shard_info", 1, 2, 8, "1 per-host data shard(s) (host_sharding='shard_info')", PIPELINE),
    ("shard_info", 2, 3, 6, "2 per-host data shard(s) (host_sharding='shard_info')", SHARDS),
    ("slice", 2, 1, 8, "one data pipeline (host_sharding='slice')", PIPELINE),
    ("slice", 1, 2, 8, "one data pipeline (host_sharding='slice')", PIPELINE),
])
def test_resume_on_another_process_count_continues_the_global_batches(tmp_path, host_sharding, before, after,
                                                                      batch_size, how, readers):
    data = spec(batch_size, host_sharding)
    written = processes(data, DataLayout.fresh(host_sharding, batch_size, before), before)
    global_batches(written, 2)
    for iterator in written:  # each process saves its part into the checkpoint's folder
        iterator.save(epath.Path(tmp_path))
    expected = global_batches(written, 3)

    resumed = processes(data, DataLayout.fresh(host_sharding, batch_size, after), after)
    for iterator in resumed:
        iterator.restore(epath.Path(tmp_path))
    np.testing.assert_array_equal(global_batches(resumed, 3), expected)
    assert resumed[0].resume_note == (
        f"Data position: the checkpoint, written by {before} process(es), reads its batches from {how}; on {after} "
        f"process(es) each process {readers}, so the global batches continue exactly where they stopped, no example "
        "skipped or repeated (docs/scaling.md#elastic-resume)."
    )


def test_resume_on_the_same_process_count_says_nothing(tmp_path):
    data = spec(4, "shard_info")
    [written] = processes(data, DataLayout.fresh("shard_info", 4, 1), 1)
    next(written)
    written.save(epath.Path(tmp_path))
    [resumed] = processes(data, DataLayout.fresh("shard_info", 4, 1), 1)
    resumed.restore(epath.Path(tmp_path))
    np.testing.assert_array_equal(next(resumed)["encoder_input_tokens"], next(written)["encoder_input_tokens"])
    assert resumed.resume_note is None


def test_a_changed_host_sharding_keeps_the_checkpoints_shards(tmp_path):
    """The shards a run started with are its data for life: a resume with another host_sharding continues them."""
    written = processes(spec(8, "shard_info"), DataLayout.fresh("shard_info", 8, 2), 2)
    for iterator in written:
        iterator.save(epath.Path(tmp_path))
    expected = global_batches(written, 2)
    [resumed] = processes(spec(8, "slice"), DataLayout.fresh("slice", 8, 1), 1)
    resumed.restore(epath.Path(tmp_path))
    np.testing.assert_array_equal(global_batches([resumed], 2), expected)
    assert resumed.resume_note.endswith(
        "(docs/scaling.md#elastic-resume). This run's get_dataset.host_sharding='slice' applies to new runs only.")


def test_per_host_shards_see_every_example_once_per_epoch():
    """Two processes' shards of one epoch hold the whole split, each example once (yes/no QA: no randomness)."""
    def examples(layout: DataLayout, shard: int) -> list[tuple[int, ...]]:
        data = pipeline.DataSpec("bundled_qa_yes_no", {"inputs": 128, "targets": 8}, layout.batch_size,
                                 seqio.EncDecFeatureConverter, "validation", False, 1, 0, False, "shard_info")
        return [tuple(row) for batch in data.shard(layout, shard).as_numpy_iterator()
                for row in batch["encoder_input_tokens"]]

    whole = examples(DataLayout("shard_info", 1, 1), 0)
    shards = [examples(DataLayout("shard_info", 2, 2), shard) for shard in range(2)]
    assert len(whole) > 20 and all(shards)
    assert collections.Counter(shards[0] + shards[1]) == collections.Counter(whole)


def test_another_batch_size_is_refused_with_what_differs(tmp_path):
    [written] = processes(spec(4, "shard_info"), DataLayout.fresh("shard_info", 4, 1), 1)
    written.save(epath.Path(tmp_path / "dataset"))
    [resumed] = processes(spec(8, "shard_info"), DataLayout.fresh("shard_info", 8, 1), 1)
    with pytest.raises(position.DataLayoutMismatch, match=(
        rf"^Checkpoint {tmp_path} was trained with BATCH_SIZE 4 and its data position holds batches of that size, but "
        rf"this run sets BATCH_SIZE 8\. Nothing was changed: resume with --gin\.BATCH_SIZE=4, or start a new MODEL_DIR "
        rf"with INITIAL_CHECKPOINT_PATH={tmp_path} \(it takes the parameters only\)\.$")):
        resumed.restore(epath.Path(tmp_path / "dataset"))


def make_legacy(folder: epath.Path, num_shards: int, num_processes: int) -> None:
    """Turns a saved data position into the per-process files of an earlier t5x_lite (each process's shard)."""
    (folder / position.LAYOUT_FILE).unlink()
    for path in list(folder.iterdir()):
        shard, suffix = re.fullmatch(r"shard_(\d+)-of-\d+\.(.*)", path.name).groups()
        for process in range(num_processes):
            if process * num_shards // num_processes == int(shard):
                (folder / f"process_{process}-of-{num_processes}.{suffix}").write_bytes(path.read_bytes())
        path.unlink()


def test_per_process_files_of_an_earlier_version_resume_as_per_host_shards(tmp_path):
    data = spec(8, "shard_info")
    written = processes(data, DataLayout.fresh("shard_info", 8, 2), 2)
    global_batches(written, 1)
    for iterator in written:
        iterator.save(epath.Path(tmp_path))
    make_legacy(epath.Path(tmp_path), 2, 2)
    expected = global_batches(written, 2)
    resumed = processes(data, DataLayout.fresh("shard_info", 8, 2), 2)
    for iterator in resumed:
        iterator.restore(epath.Path(tmp_path))
    np.testing.assert_array_equal(global_batches(resumed, 2), expected)
    assert resumed[0].resume_note is None


def test_per_process_files_are_not_continued_by_a_slice_run(tmp_path):
    """An earlier version's files record no sharding mode and continue only as per-host shards: a 'slice' run refuses
    them with what differs (never "damaged"), as those of an earlier 'slice' run held each process's rows."""
    written = processes(spec(8, "shard_info"), DataLayout.fresh("shard_info", 8, 2), 2)
    for iterator in written:
        iterator.save(epath.Path(tmp_path / "dataset"))
    make_legacy(epath.Path(tmp_path / "dataset"), 2, 2)
    [resumed] = processes(spec(8, "slice"), DataLayout.fresh("slice", 8, 1), 1)
    with pytest.raises(position.DataLayoutMismatch, match=(
        rf"^Checkpoint {tmp_path} holds the data position of each of its 2 process\(es\) in the per-process files of "
        r"an earlier t5x_lite, which continue only as per-host shards \(host_sharding='shard_info'\), and this run "
        r"sets host_sharding='slice'\. Nothing was changed: resume a run started with host_sharding='shard_info' with "
        rf"that setting, or start a new MODEL_DIR with INITIAL_CHECKPOINT_PATH={tmp_path} \(it takes the parameters "
        r"only\)\.$")):
        resumed.restore(epath.Path(tmp_path / "dataset"))
