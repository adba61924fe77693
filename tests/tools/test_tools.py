"""tools/plot_metrics.py and tools/show_task.py do what their docstrings say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import plot_metrics
import show_task


def write_run(model_dir: Path, losses: list[float]) -> None:
    model_dir.mkdir()
    with open(model_dir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps({"step": step * 10, "time": 0.0, "train/loss": loss}) + "\n" for step, loss in enumerate(losses, start=1))
        f.write(json.dumps({"step": 30, "time": 0.0, "eval/loss": 1.5}) + "\n")


def test_plot_overlays_runs(tmp_path):
    write_run(tmp_path / "a", [3.0, 2.0, 1.0])
    write_run(tmp_path / "b", [3.0, 2.5, 2.0])
    curves = plot_metrics.read_metrics(tmp_path / "a")
    assert curves["train/loss"] == ([10, 20, 30], [3.0, 2.0, 1.0])
    assert curves["eval/loss"] == ([30], [1.5])
    out = plot_metrics.plot([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "curves.png"))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_prefix_panel_draws_every_metric_under_it(tmp_path):
    """`train/aux_weight/*`: end-task-aware training's weights over time, one line per objective."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(
        json.dumps({"step": step, "train/aux_weight/end_task": 0.5 + step / 100, "train/aux_weight/tapt": 0.5 - step / 100,
                    "train/loss": 1.0}) for step in (1, 2)))
    runs = {str(tmp_path / "run"): plot_metrics.read_metrics(tmp_path / "run")}
    lines = plot_metrics.panel_lines(runs, "train/aux_weight/*")
    assert lines == {"end_task": ([1, 2], [0.51, 0.52]), "tapt": ([1, 2], [0.49, 0.48])}
    out = plot_metrics.plot([str(tmp_path / "run")], str(tmp_path / "weights.png"), ["train/aux_weight/*"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_names_a_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        plot_metrics.read_metrics(tmp_path)


def test_show_task_prints_raw_and_preprocessed_examples(capsys):
    show_task.show("bundled_span_corruption", "validation", 1, 64, None, 0)
    out = capsys.readouterr().out
    assert "--- raw example 0" in out and "text:" in out
    assert "inputs (64 ids)" in out  # inputs are exactly the asked length
    assert "<extra_id_0>" in out and "<extra_id_1>" in out  # sentinels visible


def test_show_task_lists_registered_tasks():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "show_task.py"), "--list"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bundled_span_corruption" in result.stdout and "c4_span_corruption" in result.stdout
