"""The data position of a training run: which data shards make up its global batches, and how far each has read.

A run's global batch of `batch_size` rows is the concatenation of its data shards' batches: `num_shards` seeded
pipelines (seqio shards), each giving `batch_size // num_shards` consecutive rows. The shard count is fixed when the
run starts (the process count with `host_sharding='shard_info'`, one whole pipeline with `'slice'`) and kept for the
run's life, whatever the process count later: each process reads the shards that hold its rows of every global batch
(several shards each on fewer processes, one shard on several processes on more). A checkpoint saves each shard's
tf.data state once, so a run written by N processes resumes on M with the same global batches, nothing skipped or
repeated.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
from clu.data.dataset_iterator import ArraySpec, TfDatasetIterator
from etils import epath

from t5x_lite import storage

HOST_SHARDINGS = ("shard_info", "slice")
LAYOUT_FILE = "layout.json"
# The files of an earlier t5x_lite, which saved each process's iterator as `process_<i>-of-<n>` (per-host shards).
LEGACY_FILE = re.compile(r"process_(\d+)-of-(\d+)\.index")
DOCS = "docs/scaling.md#elastic-resume"


class DataLayoutMismatch(ValueError):
    """A checkpoint's data position cannot continue in this run (the message says what differs and what to do)."""


@dataclasses.dataclass(frozen=True)
class DataLayout:
    """How a run's global batches are read: `num_shards` pipelines of `batch_size // num_shards` rows each."""

    host_sharding: str
    num_shards: int
    batch_size: int

    @classmethod
    def fresh(cls, host_sharding: str, batch_size: int, num_processes: int) -> DataLayout:
        """The layout a run starting on `num_processes` processes reads: a shard per process, or one pipeline."""
        if host_sharding not in HOST_SHARDINGS:
            raise ValueError(f"get_dataset.host_sharding must be 'shard_info' or 'slice', got {host_sharding!r}.")
        if batch_size % num_processes:
            raise ValueError(f"BATCH_SIZE {batch_size} must be divisible by the process count {num_processes}.")
        return cls(host_sharding, num_processes if host_sharding == "shard_info" else 1, batch_size)

    @property
    def shard_batch_size(self) -> int:
        return self.batch_size // self.num_shards

    def rows(self, process: int, num_processes: int) -> list[tuple[int, slice]]:
        """(shard, rows of its batches) that make up `process`'s rows of each global batch, in order."""
        per_process = self.batch_size // num_processes
        start, stop = process * per_process, (process + 1) * per_process
        first, size = start // self.shard_batch_size, self.shard_batch_size
        return [
            (shard, slice(max(start - shard * size, 0), min(stop - shard * size, size)))
            for shard in range(first, self.num_shards) if shard * size < stop
        ]

    def written_by(self, process: int, num_processes: int) -> list[int]:
        """The shards whose state `process` saves: those whose first row is its (each shard has one writer)."""
        per_process = self.batch_size // num_processes
        return [shard for shard, _ in self.rows(process, num_processes)
                if shard * self.shard_batch_size // per_process == process]

    def file_name(self, shard: int) -> str:
        return f"shard_{shard}-of-{self.num_shards}"


@dataclasses.dataclass(frozen=True)
class SavedPosition:
    """What a checkpoint's `dataset` folder holds: the layout, how many processes wrote it, its file names."""

    layout: DataLayout
    process_count: int
    legacy: bool = False  # per-process files of an earlier t5x_lite (read as per-host shards)

    def path(self, directory: epath.Path, shard: int) -> epath.Path:
        name = f"process_{shard}-of-{self.layout.num_shards}" if self.legacy else self.layout.file_name(shard)
        return directory / name


def read_saved_position(directory: epath.Path, batch_size: int) -> SavedPosition:
    """The layout recorded in a checkpoint's `dataset` folder; one of an earlier t5x_lite has only per-process files,
    which were per-host shards of this run's batch size."""
    layout_file = directory / LAYOUT_FILE
    if layout_file.exists():
        saved = json.loads(layout_file.read_text())
        process_count = saved.pop("process_count")
        return SavedPosition(DataLayout(**saved), process_count)
    counts = {int(match.group(2)) for path in directory.iterdir() if (match := LEGACY_FILE.fullmatch(path.name))}
    if len(counts) != 1:
        raise FileNotFoundError(f"No data position ({LAYOUT_FILE}) in {directory}.")
    count = counts.pop()
    return SavedPosition(DataLayout("shard_info", count, batch_size), count, legacy=True)


class DataIterator:
    """This process's rows of every global batch, read from the run's data shards (numpy batches).

    `make_shard(layout, shard)` builds a shard's pipeline (deterministic, so that every process reading a shard
    reads the same batches). Saved and restored with each checkpoint (`save`, `restore`); a restore adopts the
    checkpoint's layout, and `resume_note` then says how the data continues.
    """

    def __init__(self, make_shard: Callable[[DataLayout, int], tf.data.Dataset], layout: DataLayout,
                 process: int, num_processes: int):
        self.make_shard, self.fresh = make_shard, layout
        self.process, self.num_processes = process, num_processes
        self.resume_note: str | None = None
        self.use(layout)

    def use(self, layout: DataLayout) -> None:
        """Reads `layout`'s shards from their start."""
        self.layout = layout
        self.parts = layout.rows(self.process, self.num_processes)
        self.shards = {shard: TfDatasetIterator(self.make_shard(layout, shard), checkpoint=True)
                       for shard, _ in self.parts}

    @property
    def element_spec(self) -> dict[str, ArraySpec]:
        """Each feature's dtype and shape (the batch dimension is a shard's, not the global batch's)."""
        return next(iter(self.shards.values())).element_spec

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        [(first, rows), *more] = self.parts
        if not more and rows == slice(0, self.layout.shard_batch_size):  # a whole shard's batch: no copy
            return next(self.shards[first])
        batches = [(next(self.shards[shard]), rows) for shard, rows in self.parts]
        return {key: np.concatenate([batch[key][rows] for batch, rows in batches]) for key in batches[0][0]}

    def save(self, directory: epath.Path) -> None:
        """The layout (process 0) and the state of each shard this process writes, into a checkpoint's folder."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.process == 0:
            record = {**dataclasses.asdict(self.layout), "process_count": self.num_processes}
            (directory / LAYOUT_FILE).write_text(json.dumps(record))
        for shard in self.layout.written_by(self.process, self.num_processes):
            with storage.staged_prefix(str(directory / self.layout.file_name(shard)), upload=True) as local:
                self.shards[shard].save(local)  # TF writes local files only: a gs:// folder gets them uploaded

    def restore(self, directory: epath.Path) -> None:
        """Continues from a checkpoint's data position: its layout, each shard where it was."""
        saved = read_saved_position(directory, self.fresh.batch_size)
        check_batch_size(saved, self.fresh, directory)
        if saved.legacy and self.fresh.host_sharding != "shard_info":
            raise legacy_mismatch(saved, directory, self.fresh.host_sharding)
        if saved.layout != self.layout:
            self.use(saved.layout)
        for shard, iterator in self.shards.items():
            with storage.staged_prefix(str(saved.path(directory, shard)), download=True) as local:
                iterator.restore(local)  # TF reads local files only
        self.resume_note = resume_note(saved, self.fresh, self.num_processes)


def check_batch_size(saved: SavedPosition, fresh: DataLayout, directory: epath.Path) -> None:
    """The shards' saved states hold batches of the checkpoint's BATCH_SIZE: another one cannot continue them."""
    if saved.layout.batch_size != fresh.batch_size:
        raise DataLayoutMismatch(
            f"Checkpoint {directory.parent} was trained with BATCH_SIZE {saved.layout.batch_size} and its data "
            f"position holds batches of that size, but this run sets BATCH_SIZE {fresh.batch_size}. Nothing was "
            f"changed: resume with --gin.BATCH_SIZE={saved.layout.batch_size}, or start a new MODEL_DIR with "
            f"INITIAL_CHECKPOINT_PATH={directory.parent} (it takes the parameters only)."
        )


def legacy_mismatch(saved: SavedPosition, directory: epath.Path, host_sharding: str) -> DataLayoutMismatch:
    """Per-process files of an earlier t5x_lite, which record no sharding mode: they continue only as the per-host
    shards of a 'shard_info' run (those of a 'slice' run held each process's rows of a pipeline built otherwise)."""
    return DataLayoutMismatch(
        f"Checkpoint {directory.parent} holds the data position of each of its {saved.process_count} process(es) in "
        "the per-process files of an earlier t5x_lite, which continue only as per-host shards "
        f"(host_sharding='shard_info'), and this run sets host_sharding={host_sharding!r}. Nothing was changed: resume a run started with "
        "host_sharding='shard_info' with that setting, or start a new MODEL_DIR with "
        f"INITIAL_CHECKPOINT_PATH={directory.parent} (it takes the parameters only)."
    )


def resume_note(saved: SavedPosition, fresh: DataLayout, num_processes: int) -> str | None:
    """The one line that says how a resumed run's data continues, when it is not simply where each process was."""
    layout = saved.layout
    if layout == fresh and saved.process_count == num_processes:
        return None
    how = ("one data pipeline (host_sharding='slice')" if layout.host_sharding == "slice"
           else f"{layout.num_shards} per-host data shard(s) (host_sharding='shard_info')")
    readers = ("each process runs that pipeline and keeps its rows" if layout.num_shards == 1
               else "each process reads the shards that hold its rows")
    setting = ("" if layout.host_sharding == fresh.host_sharding else
               f" This run's get_dataset.host_sharding={fresh.host_sharding!r} applies to new runs only.")
    return (
        f"Data position: the checkpoint, written by {saved.process_count} process(es), reads its batches from {how}; "
        f"on {num_processes} process(es) {readers}, so the global batches continue exactly where they stopped, "
        f"no example skipped or repeated ({DOCS}).{setting}"
    )
