"""Draws the curves in `MODEL_DIR/metrics.jsonl` of one or several runs to a PNG.

    python tools/plot_metrics.py runs/quickstart [runs/other ...] --out curves.png \
        [--metrics train/loss eval/loss]

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
    """One panel per metric, one line per run; returns the PNG path."""
    runs = {d: read_metrics(d) for d in model_dirs}
    shown = [m for m in metrics if any(m in curves for curves in runs.values())]
    if not shown:
        raise ValueError(f"None of {list(metrics)} was logged in {list(model_dirs)}.")
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4), squeeze=False)
    for ax, metric in zip(axes[0], shown):
        for run, curves in runs.items():
            if metric in curves:
                marker = "." if metric.startswith("eval") else None
                ax.plot(*curves[metric], label=storage.path(run).name, marker=marker)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dirs", nargs="+", help="run folders holding metrics.jsonl")
    parser.add_argument("--out", default="metrics.png", help="PNG to write")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), help="metric names to draw")
    args = parser.parse_args()
    print(plot(args.model_dirs, args.out, args.metrics))


if __name__ == "__main__":
    main()
