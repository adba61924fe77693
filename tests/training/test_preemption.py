"""Preemption: SIGTERM mid-run checkpoints and exits 0; SIGKILL at any moment (even mid-save)
leaves only complete checkpoints to resume from. Either way a re-run ends with the same losses."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.subprocess_env import subprocess_env

REPO = Path(__file__).resolve().parents[2]


def command(model_dir: Path, train_steps: int, checkpoint_period: int = 1000) -> list[str]:
    return [
        sys.executable, "-m", "t5x_lite.train", "--gin_file=gin_configs/quickstart.gin",
        f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={train_steps}", "--gin.BATCH_SIZE=4",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.train.log_period=1",
        "--gin.train.eval_period=0", f"--gin.train.checkpoint_period={checkpoint_period}",
        "--gin.train.progress_bar=False",
    ]


def losses(model_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def run(model_dir: Path, train_steps: int) -> subprocess.CompletedProcess:
    return subprocess.run(command(model_dir, train_steps), check=False, cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes(tmp_path):
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(command(interrupted, 10_000), cwd=REPO, env=subprocess_env(),
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


KILL_TEST_STEPS = 12


@pytest.fixture
def kill_test_env(tmp_path) -> dict[str, str]:
    """One CPU device, unbuffered output, and JAX's compilation cache shared by the runs (halves start-up)."""
    return subprocess_env(PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def start(model_dir: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Training with a checkpoint every step (so a save is almost always in flight), output to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(command(model_dir, KILL_TEST_STEPS, checkpoint_period=1), cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True)


def on_disk(model_dir: Path) -> tuple[list[int], list[str]]:
    """(complete steps, partial folder names): Orbax renames `<step>.orbax-checkpoint-tmp-*` to `<step>` on commit."""
    folder = model_dir / "checkpoints"
    names = os.listdir(folder) if folder.is_dir() else []
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if ".orbax-checkpoint-tmp" in n)


def wait_for(condition, proc: subprocess.Popen, what: str, poll: float = 0.002) -> None:
    deadline = time.time() + 300
    while not condition():
        assert proc.poll() is None, f"training exited (rc {proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def all_losses(model_dir: Path) -> list[tuple[int, float]]:
    """Every logged (step, loss), re-run steps included."""
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


@pytest.mark.slow
def test_sigkill_at_random_points_resumes_from_complete_checkpoints(tmp_path, kill_test_env):
    """kill -9 after a random step, in the middle of a checkpoint write, and at a random moment after a
    resume; each re-run resumes from the newest committed step, reports the partial folders it ignores,
    and every logged loss (re-run steps too) equals the uninterrupted run's."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    straight = start(tmp_path / "straight", tmp_path / "straight.log", kill_test_env)  # alongside, to save time
    model_dir = tmp_path / "killed"

    def committed_past(step: int):
        return lambda: any(s >= step for s in on_disk(model_dir)[0])

    def new_partial(old: list[str]):
        return lambda: bool(set(on_disk(model_dir)[1]) - set(old))

    def logged(log: Path, text: str):
        return lambda: text in log.read_text()

    kills = ["after a random step", "mid-save", "a random moment after resuming"]
    for attempt, kill in enumerate(kills + ["none"]):
        before_complete, before_partial = on_disk(model_dir)
        log = tmp_path / f"run{attempt}.log"
        proc = start(model_dir, log, kill_test_env)
        if kill == "after a random step":
            wait_for(committed_past(rng.randint(2, 4)), proc, kill, poll=0.05)
            time.sleep(rng.uniform(0, 0.5))
        elif kill == "mid-save":
            wait_for(new_partial(before_partial), proc, kill)
        elif kill != "none":
            wait_for(logged(log, "First step (with compilation)"), proc, kill, poll=0.05)
            time.sleep(rng.uniform(0, 1.5))
        if kill != "none":
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=300)
        out = log.read_text()
        context = f"seed {seed}, run {attempt} ({kill}):\n{out[-3000:]}"
        assert proc.returncode == (-signal.SIGKILL if kill != "none" else 0), context
        if before_complete:
            assert re.search(rf"Resumed from \S+ at step {max(before_complete)}\.", out), context
        for name in before_partial:
            assert f"Ignoring partial checkpoint {model_dir / 'checkpoints' / name} " in out, context
        if kill == "mid-save":
            assert on_disk(model_dir)[1], f"no partial checkpoint left by the mid-save kill; {context}"

    assert straight.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    expected = dict(all_losses(tmp_path / "straight"))
    records = all_losses(model_dir)
    assert records[-1] == (KILL_TEST_STEPS, expected[KILL_TEST_STEPS])
    assert all(loss == expected[step] for step, loss in records), (seed, records, expected)
    assert on_disk(model_dir)[1] == []  # the finished run left no partial checkpoint behind
