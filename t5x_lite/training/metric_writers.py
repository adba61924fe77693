"""Metric writers: TensorBoard events and `MODEL_DIR/metrics.jsonl` (process 0 only), on any `storage` path.

Both are written through `t5x_lite.storage`, so a `gs://` MODEL_DIR gets them in the bucket (TensorFlow's summary
writer would reach only Google's own endpoint, never an emulator).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import jax
from clu import metric_writers
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.scalar import summary_v2
from tensorboard.summary.writer.record_writer import RecordWriter

from t5x_lite import storage

# An object has no append: its events are uploaded whole at every flush, so a new file is started past this size.
MAX_REMOTE_EVENT_FILE_BYTES = 4 * 2**20


class ScalarWriter(metric_writers.MetricWriter):
    """A writer of scalars only: t5x_lite logs no other summary kind, so the others are accepted and dropped."""

    def _ignore(self, *args, **kwargs) -> None:
        """Not a scalar: dropped."""

    write_summaries = write_images = write_videos = write_audios = write_texts = write_histograms = _ignore
    write_hparams = _ignore


class JsonlWriter(ScalarWriter):
    """Appends one JSON object per `write_scalars` call: `{"step": ..., "time": ..., name: value}`."""

    def __init__(self, path: str | os.PathLike):
        _drop_torn_last_line(storage.path(path))
        self._file = storage.GrowingFile(path)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), "time": time.time()}
        record.update({k: float(v) for k, v in scalars.items()})
        self._file.write((json.dumps(record) + "\n").encode())
        self._file.flush()  # a killed run loses no record

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _drop_torn_last_line(path: Any) -> None:
    """A run killed mid-write may leave a partial last line; cut it so appended records stay valid JSONL."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])


class TensorBoardWriter(ScalarWriter):
    """Scalars as TensorBoard event files in `logdir` (the records `tf.summary.scalar` writes), flushed at each
    `write_scalars`; other summary kinds are not logged by t5x_lite and are ignored."""

    def __init__(self, logdir: str | os.PathLike):
        self._logdir = storage.path(logdir)
        self._logdir.mkdir(parents=True, exist_ok=True)
        self._count = 0
        self._file = self._new_file()

    def _new_file(self) -> RecordWriter:
        """A new event file, named as TensorFlow names them, starting with the file-version event."""
        self._count += 1
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{self._count}.v2"
        self._growing = storage.GrowingFile(self._logdir / name)
        record_writer = RecordWriter(self._growing)
        record_writer.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        return record_writer

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if storage.is_remote(self._logdir) and self._growing.size > MAX_REMOTE_EVENT_FILE_BYTES:
            self._file.close()
            self._file = self._new_file()
        for name, value in scalars.items():
            event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_v2.scalar_pb(name, value))
            self._file.write(event.SerializeToString())
        self._file.flush()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def create_writer(model_dir: str | os.PathLike) -> metric_writers.MetricWriter:
    """TensorBoard + JSONL on process 0 (written off the training thread); nothing elsewhere."""
    if jax.process_index() != 0:
        return metric_writers.MultiWriter([])
    folder = storage.path(model_dir)
    writers = [TensorBoardWriter(folder / "tensorboard"), JsonlWriter(folder / "metrics.jsonl")]
    return metric_writers.AsyncMultiWriter(writers)
