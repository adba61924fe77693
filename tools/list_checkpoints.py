"""Lists a run's checkpoints: step, time, size and whether Orbax committed it.

    python tools/list_checkpoints.py runs/my_run      (or gs://bucket/my_run: sizes then show as ?)

A `partial` row is a temporary folder left by a write that was interrupted (kill -9, a
crash, a full disk); training never restores it, and the next run removes it. A `best` row
is the checkpoint `train.best_metric` kept in MODEL_DIR/best, with that metric's value.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from t5x_lite import cli

cli.keep_tensorflow_off_gpus()  # imports TensorFlow (the iterator checkpoints need it) without its C++ logs

import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_manager

from t5x_lite import checkpoints

# A row: the checkpoint, its status (complete, partial, best) and a note (the best one's metric).
Row = tuple[checkpoints.CheckpointInfo, str, str]


def format_table(rows: Sequence[Row]) -> str:
    """One line per checkpoint under a header, in the order given, and the count and total size."""
    lines = [f"{'step':>10}  {'time (UTC)':<19}  {'size':>10}  {'status':<8}  path"]
    for info, status, note in rows:
        lines.append(
            f"{info.step:>10}  {info.time.strftime('%Y-%m-%d %H:%M:%S'):<19}  {human_size(info.size_bytes):>10}  "
            f"{status:<8}  {info.path}{'  ' + note if note else ''}"
        )
    best = sum(1 for _, status, _ in rows if status == "best")
    count = f"{len(rows) - best} checkpoint(s)" + (f" and {best} best" if best else "")
    sizes = [info.size_bytes for info, _, _ in rows]
    lines.append(f"{count}, {human_size(None if None in sizes else sum(sizes))} in all")
    return "\n".join(lines)


def run_rows(model_dir: str) -> list[Row]:
    """MODEL_DIR/checkpoints by step, then the best checkpoint(s) of MODEL_DIR/best."""
    infos = checkpoints.list_checkpoints(model_dir) if checkpoints.checkpoints_dir(model_dir).is_dir() else []
    return [(info, "complete" if info.complete else "partial", "") for info in infos] + best_rows(model_dir)


def best_folder(model_dir: str) -> epath.Path:
    """MODEL_DIR/best, where `train.best_metric` keeps the best checkpoint."""
    return checkpoints.checkpoints_dir(model_dir).parent / "best"


def best_rows(model_dir: str) -> list[Row]:
    """The committed checkpoints of MODEL_DIR/best, each noted with the best metric's value when recorded."""
    folder = best_folder(model_dir)
    if not folder.is_dir():
        return []
    metric = best_metric_name(model_dir)
    rows = []
    for meta in sorted(ocp.path.step.standard_name_format().find_all(folder), key=lambda m: m.step):
        value = saved_metrics(meta.path).get(metric) if metric else None
        note = f"{metric}={value:.4f}" if isinstance(value, float | int) else ""
        info = checkpoints.CheckpointInfo(meta.step, meta.path, True, meta.commit_timestamp,
                                          checkpoints.folder_size(meta.path))
        rows.append((info, "best", note))
    return rows


def saved_metrics(step_dir: epath.Path) -> dict[str, float]:
    """The metrics an Orbax manager saved with a step (its `metrics` item); empty if it saved none."""
    path = step_dir / checkpoint_manager.METRIC_ITEM_NAME
    if not path.is_dir():
        return {}
    return ocp.JsonCheckpointHandler(filename=checkpoint_manager.METRIC_ITEM_NAME).restore(path)


def best_metric_name(model_dir: str) -> str | None:
    """The `train.best_metric` a run recorded in MODEL_DIR/config.gin, if any."""
    config = checkpoints.checkpoints_dir(model_dir).parent / "config.gin"
    match = re.search(r"^train\.best_metric = '([^']+)'$", config.read_text(), re.MULTILINE) if config.is_file() else None
    return match.group(1) if match else None


def human_size(size: float | None) -> str:
    """1536 -> '1.5 KiB'; None (a size a bucket listing does not give) -> '?'."""
    if size is None:
        return "?"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    power = 0
    while size >= 1024 and power < len(units) - 1:
        size, power = size / 1024, power + 1
    return f"{size:.0f} B" if power == 0 else f"{size:.1f} {units[power]}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a run's MODEL_DIR (its checkpoints are in MODEL_DIR/checkpoints)")
    args = parser.parse_args(argv)
    if not checkpoints.checkpoints_dir(args.model_dir).is_dir() and not best_folder(args.model_dir).is_dir():
        print(f"error: {args.model_dir!r} has no checkpoints folder; is it a t5x_lite MODEL_DIR?", file=sys.stderr)
        return 2
    print(format_table(run_rows(args.model_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
