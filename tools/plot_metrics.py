"""Draws the curves in `MODEL_DIR/metrics.jsonl` of one or several runs to a PNG.

    python tools/plot_metrics.py runs/quickstart [runs/other ...] --out curves.png \
        [--metrics train/loss eval/loss]
    python tools/plot_metrics.py runs/tartan_meta --out weights.png --metrics 'train/aux_weight/*'

Run folders and the PNG may be local paths or gs:// (`t5x_lite.storage`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
from collections.abc import Sequence

import matplotlib
from etils import epath

from t5x_lite import storage

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DEFAULT_METRICS = ("train/loss", "eval/loss", "train/accuracy", "train/learning_rate")


def read_metrics(model_dir: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """Maps each metric name to its (steps, values) from a run's metrics.jsonl."""
    path = storage.path(model_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a MODEL_DIR written by t5x_lite.train.")
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for name, value in record.items():
            if name in ("step", "time"):
                continue
            steps, values = curves.setdefault(name, ([], []))
            steps.append(record["step"])
            values.append(value)
    return curves


def plot(model_dirs: Sequence[str], out: str, metrics: Sequence[str] = DEFAULT_METRICS) -> epath.Path:
    """One panel per metric, one line per run; returns the PNG path. A metric `prefix/*` draws every metric under
    `prefix/` in one panel (e.g. `train/aux_weight/*`: end-task-aware training's objective weights over time)."""
    runs = {d: read_metrics(d) for d in model_dirs}
    panels = {metric: panel_lines(runs, metric) for metric in metrics}
    shown = [m for m in metrics if panels[m]]
    if not shown:
        raise ValueError(f"None of {list(metrics)} was logged in {list(model_dirs)}.")
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4), squeeze=False)
    for ax, metric in zip(axes[0], shown):
        for label, (steps, values) in panels[metric].items():
            ax.plot(steps, values, label=label, marker="." if metric.startswith("eval") else None)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format=os.path.splitext(out)[1][1:] or "png", dpi=100)  # the format the name says
    plt.close(fig)
    storage.path(out).write_bytes(image.getvalue())
    return storage.path(out)


def panel_lines(
    runs: dict[str, dict[str, tuple[list[int], list[float]]]], metric: str
) -> dict[str, tuple[list[int], list[float]]]:
    """label -> curve of the lines in `metric`'s panel: each run's curve of it, or for `prefix/*` each run's curve
    of every metric under the prefix (labelled by the rest of its name, and the run when there are several)."""
    lines = {}
    for run, curves in runs.items():
        name = storage.path(run).name
        if not metric.endswith("/*"):
            if metric in curves:
                lines[name] = curves[metric]
            continue
        prefix = metric[:-1]
        for full, curve in curves.items():
            if full.startswith(prefix):
                suffix = full[len(prefix):]
                lines[f"{name}: {suffix}" if len(runs) > 1 else suffix] = curve
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dirs", nargs="+", help="run folders holding metrics.jsonl")
    parser.add_argument("--out", default="metrics.png", help="PNG to write")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), help="metric names to draw")
    args = parser.parse_args()
    print(plot(args.model_dirs, args.out, args.metrics))


if __name__ == "__main__":
    main()
