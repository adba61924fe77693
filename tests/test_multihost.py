"""Two processes x 4 CPU devices train exactly like one process with 8 devices or with 1; a 2-process run stopped
by SIGTERM resumes on 1 process x 8 devices, its global batches continuing exactly (docs/scaling.md#elastic-resume)."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.subprocess_env import subprocess_env

REPO = Path(__file__).resolve().parent.parent
ARGS = [
    "--gin_file=gin_configs/quickstart.gin",
    "--gin.TRAIN_STEPS=3",
    "--gin.BATCH_SIZE=8",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
    "--gin.train.log_period=1",
    "--gin.train.eval_period=0",
    "--gin.train.checkpoint_period=3",
    "--gin.train.progress_bar=False",
    "--gin.get_dataset.host_sharding='slice'",
]


def launch(model_dir: Path, devices_per_process: int, *extra: str, args: list[str] = ARGS,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "t5x_lite.train", *args, f"--gin.MODEL_DIR='{model_dir}'", *extra],
        cwd=REPO, env=subprocess_env(devices_per_process, **(env or {})), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )


def finish(*procs: subprocess.Popen) -> list[str]:
    """Each process's output, once all have exited 0."""
    outputs = [proc.communicate(timeout=900)[0] for proc in procs]
    # Each failed process's log up to an abort's thread dump (the dump would crowd out why it aborted).
    failures = [
        f"process {i} of {len(procs)} exited {proc.returncode}:\n{out.split('Fatal Python error')[0][-4000:]}"
        for i, (proc, out) in enumerate(zip(procs, outputs, strict=True)) if proc.returncode != 0
    ]
    assert not failures, "\n\n".join(failures)
    return outputs


def losses(model_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


def restore_state(model_dir: Path, target=None):
    """The checkpoint's train state (as saved, or onto the shardings of `target`)."""
    with ocp.CheckpointManager(model_dir / "checkpoints", item_names=("state", "dataset")) as manager:
        restored = manager.restore(
            manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
    return restored.state


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["cpu_tuned", "xla"])
def test_two_processes_match_one(tmp_path, kernels):
    one_device, eight_devices, two_hosts = tmp_path / "one", tmp_path / "eight", tmp_path / "two_hosts"
    choice = f"--gin.KERNELS='{kernels}'"
    finish(launch(one_device, 1, choice))
    finish(launch(eight_devices, 8, choice))
    address = f"127.0.0.1:{free_port()}"
    finish(*[
        launch(two_hosts, 4, choice, f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}")
        for i in range(2)
    ])
    assert len(losses(two_hosts)) == 3
    np.testing.assert_allclose(losses(two_hosts), losses(eight_devices), rtol=1e-4)
    np.testing.assert_allclose(losses(two_hosts), losses(one_device), rtol=1e-4)
    # The 2-process checkpoint restores in this single process, onto one device.
    reference = restore_state(eight_devices)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), reference)
    restored = restore_state(two_hosts, target)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
                 jax.device_get(restored["params"]), jax.device_get(reference["params"]))


# The elastic-resume runs: a smaller batch and sequences, a checkpoint only when stopped or done, and JAX's compilation
# cache shared by the runs (the two 2-process runs compile the same programs, and so do the two 1-process runs).
ELASTIC_ARGS = [
    "--gin_file=gin_configs/quickstart.gin",
    "--gin.BATCH_SIZE=8",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
    "--gin.train.log_period=1",
    "--gin.train.eval_period=0",
    "--gin.train.checkpoint_period=1000",
    "--gin.train.progress_bar=False",
]


def two_processes(model_dir: Path, *extra: str, env: dict[str, str]) -> list[subprocess.Popen]:
    """A 2-process x 4-device run, connected over loopback."""
    address = f"127.0.0.1:{free_port()}"
    return [launch(model_dir, 4, *extra, f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}",
                   args=ELASTIC_ARGS, env=env)
            for i in range(2)]


def step_losses(model_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def stop_after(procs: list[subprocess.Popen], model_dir: Path, steps: int) -> list[str]:
    """SIGTERM to every process once `steps` steps are logged, as a preemption sends it; their outputs."""
    metrics, deadline = model_dir / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert all(proc.poll() is None for proc in procs), finish(*procs)
        time.sleep(0.1)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    return finish(*procs)


@pytest.fixture(scope="module")
def elastic_run(request, tmp_path_factory) -> tuple[Path, Path, int, str]:
    """A 2-process run stopped by SIGTERM and resumed on 1 process x 8 devices, and the same run uninterrupted:
    (interrupted MODEL_DIR, uninterrupted MODEL_DIR, the step it stopped at, the resumed run's output)."""
    root = tmp_path_factory.mktemp(f"elastic_{request.param}")
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    # 'shard_info' is the default: that run sets nothing.
    sharding = ["--gin.get_dataset.host_sharding='slice'"] if request.param == "slice" else []
    interrupted, straight = root / "interrupted", root / "straight"
    outputs = stop_after(two_processes(interrupted, *sharding, "--gin.TRAIN_STEPS=10000", env=env), interrupted, 2)
    stopped = max(step_losses(interrupted))
    assert f"Stopping at step {stopped} on signal {int(signal.SIGTERM)}" in outputs[0]
    assert (interrupted / "checkpoints" / str(stopped)).is_dir()
    steps = f"--gin.TRAIN_STEPS={stopped + 3}"
    [resumed] = finish(launch(interrupted, 8, *sharding, steps, args=ELASTIC_ARGS, env=env))
    # 'slice' batches are the same on any process count (test_two_processes_match_one): its uninterrupted run is the
    # cheaper 1-process x 8-device one; per-host shards need the 2 processes.
    finish(*([launch(straight, 8, *sharding, steps, args=ELASTIC_ARGS, env=env)] if sharding else
             two_processes(straight, steps, env=env)))
    return interrupted, straight, stopped, resumed


@pytest.mark.slow
@pytest.mark.parametrize("elastic_run", ["slice", "shard_info"], indirect=True)
def test_two_process_run_resumes_on_one_process(elastic_run):
    """Per-host shards ('shard_info', the default) and one sliced pipeline ('slice') both continue the global batches
    exactly: the resumed run's losses equal the uninterrupted run's, and one line says how the data continued."""
    interrupted, straight, stopped, resumed = elastic_run
    straight_losses = step_losses(straight)
    assert sorted(step_losses(interrupted)) == sorted(straight_losses) == list(range(1, stopped + 4))
    np.testing.assert_allclose([step_losses(interrupted)[s] for s in straight_losses], list(straight_losses.values()),
                               rtol=1e-4)
    assert np.all(np.isfinite(list(straight_losses.values())))
    assert straight_losses[stopped + 3] < straight_losses[1]  # learning, on every process's data
    notes = [line for line in resumed.splitlines() if line.startswith("Data position:")]
    assert len(notes) == 1, resumed[-3000:]
    assert notes[0].startswith("Data position: the checkpoint, written by 2 process(es), reads its batches from ")
    assert "on 1 process(es)" in notes[0] and "continue exactly where they stopped" in notes[0]


@pytest.mark.slow
@pytest.mark.parametrize("elastic_run", ["slice"], indirect=True)
def test_incompatible_data_position_says_what_differs(elastic_run, tmp_path):
    """Another BATCH_SIZE, or per-process files of an earlier version that do not restore as shards: one error line
    that says what differs (never "damaged"), a non-zero exit, and the checkpoint left as it was."""
    interrupted, _, stopped, _ = elastic_run
    other_batch, legacy = tmp_path / "other_batch", tmp_path / "legacy"
    for copy in (other_batch, legacy):
        shutil.copytree(interrupted, copy)
    step_dir = f"{legacy / 'checkpoints' / str(stopped + 3)}"
    dataset = legacy / "checkpoints" / str(stopped + 3) / "dataset"
    (dataset / "layout.json").unlink()
    for path in list(dataset.glob("shard_0-of-1.*")):  # the one pipeline's state, as an earlier 2-process run named it
        for process in range(2):
            shutil.copy(path, dataset / path.name.replace("shard_0-of-1", f"process_{process}-of-2"))
        path.unlink()
    expected = {
        other_batch: f"error: MODEL_DIR: Checkpoint {other_batch / 'checkpoints' / str(stopped + 3)} was trained with "
                     "BATCH_SIZE 8 and its data position holds batches of that size, but this run sets BATCH_SIZE 16. "
                     "Nothing was changed: resume with --gin.BATCH_SIZE=8, or start a new MODEL_DIR with "
                     f"INITIAL_CHECKPOINT_PATH={other_batch / 'checkpoints' / str(stopped + 3)} (it takes the parameters "
                     "only).",
        legacy: f"error: MODEL_DIR: Checkpoint {step_dir} holds the data position of each of its 2 process(es) in the "
                "per-process files of an earlier t5x_lite, which continue only as per-host shards "
                "(host_sharding='shard_info'), and this run sets host_sharding='slice'. Nothing was changed: resume a "
                "run started with host_sharding='shard_info' with that setting, or start a new MODEL_DIR with "
                f"INITIAL_CHECKPOINT_PATH={step_dir} (it takes the parameters only).",
    }
    for model_dir, error in expected.items():
        before = sorted(str(p.relative_to(model_dir)) for p in (model_dir / "checkpoints").rglob("*"))
        extra = ["--gin.BATCH_SIZE=16"] if model_dir == other_batch else ["--gin.get_dataset.host_sharding='slice'"]
        proc = launch(model_dir, 1, f"--gin.TRAIN_STEPS={stopped + 4}", *extra, args=ELASTIC_ARGS)
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode != 0
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        assert errors == [error], out[-3000:]
        assert "damaged" not in out and "Traceback" not in out
        assert sorted(str(p.relative_to(model_dir)) for p in (model_dir / "checkpoints").rglob("*")) == before
