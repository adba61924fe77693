"""SIGTERM mid-run: the step finishes, a checkpoint is written, exit 0, and a re-run resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def command(model_dir: Path, train_steps: int) -> list[str]:
    return [
        sys.executable, "-m", "t5x_lite.train", "--gin_file=gin_configs/quickstart.gin",
        f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={train_steps}", "--gin.BATCH_SIZE=4",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.train.log_period=1",
        "--gin.train.eval_period=0", "--gin.train.checkpoint_period=1000", "--gin.train.progress_bar=False",
    ]


def losses(model_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def run(model_dir: Path, train_steps: int) -> subprocess.CompletedProcess:
    return subprocess.run(command(model_dir, train_steps), cwd=REPO, env=dict(os.environ, XLA_FLAGS=""),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes(tmp_path):
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(command(interrupted, 10_000), cwd=REPO, env=dict(os.environ, XLA_FLAGS=""),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = interrupted / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    stopped_at = max(losses(interrupted))
    assert f"Stopping at step {stopped_at} on signal {int(signal.SIGTERM)}" in out
    assert (interrupted / "checkpoints" / str(stopped_at)).is_dir()

    result = run(interrupted, stopped_at + 3)  # the same command, resumed
    assert result.returncode == 0, result.stderr[-3000:]
    straight = tmp_path / "straight"
    assert run(straight, stopped_at + 3).returncode == 0
    assert losses(interrupted) == losses(straight)
