"""A run whose every path is gs://, through the public commands, against a local GCS emulator (tests/gcs_emulator.py):
train, SIGTERM, resume, eval, infer and tools/list_checkpoints.py leave everything in the bucket and nothing local."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.compat.proto import event_pb2

from t5x_lite import storage
from t5x_lite.data import sources, vocab
from tests.subprocess_env import subprocess_env

REPO = Path(__file__).resolve().parent.parent
TRAIN_LINES = 400
STRAIGHT_STEPS = 30  # the uninterrupted run, long enough for the interrupted one to stop and resume inside it


def train_command(model_dir: str, data: str, train_steps: int) -> list[str]:
    """The quickstart, tiny, on a text-file task whose file and vocabulary are in `data` (a gs:// folder)."""
    return [
        sys.executable, "-m", "t5x_lite.train", "--gin_file=gin_configs/quickstart.gin",
        f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={train_steps}", "--gin.BATCH_SIZE=4",
        "--gin.MIXTURE_OR_TASK_NAME=@text_files_task()", "--gin.text_files_task.name='bucket_text'",
        f"--gin.text_files_task.train_files='{data}/train.txt'", f"--gin.get_vocabulary.spm_path='{data}/spiece.model'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.train.log_period=1",
        "--gin.train.eval_period=0", "--gin.train.checkpoint_period=1000", "--gin.train.progress_bar=False",
    ]


def tool_command(module: str, *bindings: str) -> list[str]:
    """`python -m t5x_lite.eval` or `.infer` on the tiny T5 with `bindings` (gin, without `--gin.`)."""
    files = {"t5x_lite.eval": "runs/eval.gin", "t5x_lite.infer": "runs/infer.gin"}
    return [sys.executable, "-m", module, f"--gin_file={files[module]}", "--gin_file=models/t5_1_1/tiny.gin",
            *[f"--gin.{b}" for b in bindings]]


def losses(metrics_jsonl: str) -> dict[int, float]:
    """step -> train/loss of a metrics.jsonl (local or gs://)."""
    records = [json.loads(line) for line in storage.path(metrics_jsonl).read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def event_scalars(event_file: str) -> dict[str, list[int]]:
    """The steps logged per scalar tag in a TensorBoard event file (records: length, crc, data, crc)."""
    data, offset, tags = storage.path(event_file).read_bytes(), 0, {}
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 16 + length
        for value in event.summary.value:
            tags.setdefault(value.tag, []).append(event.step)
    return tags


def local_gs_folders(*roots: Path) -> list[Path]:
    """Local files or folders named `gs:...` under `roots`: what a URL taken for a local path would leave."""
    return [p for root in roots for p in root.rglob("gs:*")]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The commands' environment: one CPU device, unbuffered output, a shared compilation cache, and every HTTP(S)
    request that is not for 127.0.0.1 sent to a dead loopback proxy, so one that would leave the machine fails."""
    dead_proxy = "http://127.0.0.1:9"
    return subprocess_env(PYTHONUNBUFFERED="1", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                          JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
                          http_proxy=dead_proxy, https_proxy=dead_proxy, HTTPS_PROXY=dead_proxy,
                          no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost")


def run(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Starts `command` in the repository, its output (stdout and stderr) captured together."""
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    """The output of a started command, which must succeed."""
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_a_run_in_a_bucket_resumes_evaluates_infers_and_leaves_nothing_local(gcs_dir, env, tmp_path):
    data, run_dir = f"{gcs_dir}/data", f"{gcs_dir}/run"
    lines = Path(sources.BUNDLED_DIR / "train.txt").read_text().splitlines()[:TRAIN_LINES]
    storage.path(f"{data}/train.txt").write_text("\n".join(lines) + "\n")
    storage.path(f"{data}/spiece.model").write_bytes(Path(vocab.BUNDLED_SPM_PATH).read_bytes())
    straight = run(train_command(str(tmp_path / "straight"), data, STRAIGHT_STEPS), env)  # alongside, to save time

    interrupted = run(train_command(run_dir, data, 10_000), env)
    deadline = time.time() + 300
    while time.time() < deadline and interrupted.poll() is None and len(losses_or_none(f"{run_dir}/metrics.jsonl")) < 2:
        time.sleep(0.3)
    interrupted.send_signal(signal.SIGTERM)
    out = finish(interrupted)
    stopped_at = max(losses(f"{run_dir}/metrics.jsonl"))
    assert f"Stopping at step {stopped_at} on signal {int(signal.SIGTERM)}" in out
    assert stopped_at + 2 <= STRAIGHT_STEPS, stopped_at
    out = finish(run(train_command(run_dir, data, stopped_at + 2), env))  # the same command, resumed
    assert f"Resumed from {run_dir}/checkpoints at step {stopped_at}." in out, out[-3000:]

    checkpoint, questions = f"{run_dir}/checkpoints/{stopped_at + 2}", f"{data}/questions.txt"
    storage.path(questions).write_text("who says hello?\nis this a question?\n")
    common = [f"CHECKPOINT_PATH='{run_dir}'", "TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
              f"get_vocabulary.spm_path='{data}/spiece.model'", "ModelRunner.batch_size=4"]
    evaluation = run(tool_command("t5x_lite.eval", *common, "MIXTURE_OR_TASK_NAME='bundled_qa_yes_no'",
                                  f"EVAL_OUTPUT_DIR='{gcs_dir}/eval'", "make_evaluator.num_examples=4"), env)
    inference = run(tool_command("t5x_lite.infer", *common, f"INFER_INPUT_FILE='{questions}'",
                                 f"INFER_OUTPUT_FILE='{gcs_dir}/infer/predictions.jsonl'"), env)
    listing = subprocess.run([sys.executable, "tools/list_checkpoints.py", run_dir], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600, check=False)
    finish(evaluation)
    assert "Wrote 2 predictions" in finish(inference)
    assert listing.returncode == 0, listing.stderr[-3000:]
    assert f"{checkpoint}" in listing.stdout and "complete" in listing.stdout

    finish(straight)
    assert losses(f"{run_dir}/metrics.jsonl") == {
        step: loss for step, loss in losses(str(tmp_path / "straight" / "metrics.jsonl")).items() if step <= stopped_at + 2}
    run_folder = storage.path(run_dir)
    assert {"config.gin", "operative_config.gin", "metrics.jsonl", "tensorboard", "checkpoints"} <= {
        p.name for p in run_folder.iterdir()}
    assert not (run_folder / ".lease.json").exists()  # released
    events = [p for p in (run_folder / "tensorboard").iterdir() if "tfevents" in p.name]  # one file per run
    logged = [step for p in events for step in event_scalars(str(p))["train/loss"]]
    assert len(events) == 2 and sorted(logged) == sorted(losses(f"{run_dir}/metrics.jsonl"))
    assert {"dataset", "state", "commit_success.txt"} <= {p.name for p in storage.path(checkpoint).iterdir()}
    assert any("eval/bundled_qa_yes_no/" in line for line in storage.path(f"{gcs_dir}/eval/metrics.jsonl").read_text().splitlines())
    predictions = [json.loads(line) for line in storage.path(f"{gcs_dir}/infer/predictions.jsonl").read_text().splitlines()]
    assert [p["inputs"] for p in predictions] == ["who says hello?", "is this a question?"]
    assert local_gs_folders(REPO, tmp_path) == []  # no `gs:` folder: nothing went to a local path named after a URL


def losses_or_none(metrics_jsonl: str) -> dict[int, float]:
    """The losses logged so far; none while the file does not exist yet."""
    return losses(metrics_jsonl) if storage.path(metrics_jsonl).exists() else {}


@pytest.mark.slow
def test_a_bucket_that_does_not_exist_is_one_error_line(gcs_emulator, env):
    command = [sys.executable, "-m", "t5x_lite.train", "--gin_file=gin_configs/quickstart.gin",
               "--gin.MODEL_DIR='gs://no-such-bucket/run'", "--gin.TRAIN_STEPS=2"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: MODEL_DIR 'gs://no-such-bucket/run' is not writable (writing gs://no-such-bucket/run/ failed: "
        "NOT_FOUND: Not Found [http_response_code='404']); pick a folder you can write to, e.g. \"'runs/my_run'\".")
    assert local_gs_folders(REPO) == []
