"""Two processes x 4 CPU devices train exactly like one process with 8 devices or with 1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
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


def launch(model_dir: Path, devices_per_process: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "t5x_lite.train", *ARGS, f"--gin.MODEL_DIR='{model_dir}'", *extra],
        cwd=REPO, env=subprocess_env(devices_per_process), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def finish(*procs: subprocess.Popen) -> None:
    outputs = [proc.communicate(timeout=900)[0] for proc in procs]
    # Each failed process's log up to an abort's thread dump (the dump would crowd out why it aborted).
    failures = [
        f"process {i} of {len(procs)} exited {proc.returncode}:\n{out.split('Fatal Python error')[0][-4000:]}"
        for i, (proc, out) in enumerate(zip(procs, outputs, strict=True)) if proc.returncode != 0
    ]
    assert not failures, "\n\n".join(failures)


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
