"""Metric writers: TensorBoard events and `MODEL_DIR/metrics.jsonl` (process 0 only)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
    """Appends one JSON object per `write_scalars` call: `{"step": ..., "time": ..., name: value}`."""

    def __init__(self, path: str | Path):
        _drop_torn_last_line(Path(path))
        # Line-buffered: a killed run loses no record. Open for the writer's lifetime.
        self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), "time": time.time()}
        record.update({k: float(v) for k, v in scalars.items()})
        self._file.write(json.dumps(record) + "\n")

    def _ignore(self, *args, **kwargs) -> None:
        """Only scalars go to the JSONL file."""

    write_summaries = write_images = write_videos = write_audios = write_texts = write_histograms = _ignore
    write_hparams = _ignore

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _drop_torn_last_line(path: Path) -> None:
    """A run killed mid-write may leave a partial last line; cut it so appended records stay valid JSONL."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


def create_writer(model_dir: str | Path) -> metric_writers.MetricWriter:
    """TensorBoard + JSONL on process 0 (written off the training thread); nothing elsewhere."""
    if jax.process_index() != 0:
        return metric_writers.MultiWriter([])
    writers = [metric_writers.SummaryWriter(str(Path(model_dir) / "tensorboard")), JsonlWriter(Path(model_dir) / "metrics.jsonl")]
    return metric_writers.AsyncMultiWriter(writers)
