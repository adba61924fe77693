"""tools/list_checkpoints.py lists steps, commit times, sizes, and complete vs partial."""

from __future__ import annotations

import datetime
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import pytest
import tensorflow as tf

from t5x_lite import checkpoints, partitioning
from t5x_lite.data.position import DataIterator, DataLayout
from t5x_lite.models.seq2seq import EncoderDecoderModel
from t5x_lite.networks.t5 import T5Config
from t5x_lite.training import optimizers, train_state

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import list_checkpoints


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def state_at(step: int) -> train_state.TrainState:
    """A tiny T5's train state at `step`."""
    config = T5Config(vocab_size=64, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=1,
                      num_decoder_layers=1)
    mesh = partitioning.make_mesh({"data": -1})
    tx = optimizers.adafactor(optimizers.constant_schedule(1e-2))
    state, _, _ = train_state.create_train_state(EncoderDecoderModel(config), tx, 0, mesh,
                                                 partitioning.logical_axis_rules())
    return state.replace(step=jax.numpy.asarray(step, state.step.dtype))


def make_run(model_dir: Path) -> None:
    """Steps 1 and 2 committed, and step 3 as Orbax leaves a write that was killed."""
    iterator = DataIterator(lambda layout, shard: tf.data.Dataset.range(10).map(lambda x: {"x": x}),
                            DataLayout("shard_info", 1, 1), 0, 1)
    with checkpoints.checkpoint_manager(str(model_dir), async_save=False) as manager:
        for step in (1, 2):
            checkpoints.save(manager, state_at(step), iterator)
    folder = model_dir / "checkpoints"
    shutil.copytree(folder / "2" / "state", folder / "3.orbax-checkpoint-tmp" / "state")


def test_lists_complete_and_partial_checkpoints(tmp_path):
    started = datetime.datetime.now(datetime.timezone.utc)
    make_run(tmp_path)
    infos = checkpoints.list_checkpoints(str(tmp_path))
    assert [(i.step, i.complete) for i in infos] == [(1, True), (2, True), (3, False)]
    assert [Path(i.path).name for i in infos] == ["1", "2", "3.orbax-checkpoint-tmp"]
    assert [i.size_bytes for i in infos] == [folder_size(Path(i.path)) for i in infos]
    assert all(i.size_bytes > 20_000 for i in infos)  # the arrays, not just metadata
    for info in infos:
        assert started - datetime.timedelta(seconds=1) <= info.time <= datetime.datetime.now(datetime.timezone.utc)
    assert [p.name for p in checkpoints.partial_checkpoints(str(tmp_path))] == ["3.orbax-checkpoint-tmp"]


def test_prints_a_table(tmp_path, capsys):
    make_run(tmp_path)
    assert list_checkpoints.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "time", "(UTC)", "size", "status", "path"]
    rows = [line.split() for line in lines[1:4]]
    assert [(r[0], r[5]) for r in rows] == [("1", "complete"), ("2", "complete"), ("3", "partial")]
    assert rows[0][6] == str(tmp_path / "checkpoints" / "1")
    assert rows[0][4] == "KiB" and float(rows[0][3]) > 20
    assert lines[4].startswith("3 checkpoint(s), ")


@pytest.mark.slow
def test_lists_the_best_checkpoint_with_its_metric(tmp_path, capsys):
    make_run(tmp_path)
    metric = "eval/qa/f1"
    (tmp_path / "config.gin").write_text(f"train.best_metric = '{metric}'\n")
    with checkpoints.best_checkpoint_manager(str(tmp_path), metric) as manager:
        for step, f1 in ((1, 0.25), (2, 0.5)):
            checkpoints.save_if_best(manager, state_at(step), {metric: f1, "eval/loss": 3.0}, metric)
    assert list_checkpoints.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    best = lines[4].split()
    assert (best[0], best[5], best[6], best[7]) == ("2", "best", str(tmp_path / "best" / "2"), "eval/qa/f1=0.5000")
    assert lines[5].startswith("3 checkpoint(s) and 1 best, ")


def test_sizes_read_like_du():
    assert [list_checkpoints.human_size(n) for n in (0, 1023, 1536, 5 * 2**20, 3 * 2**40)] == [
        "0 B", "1023 B", "1.5 KiB", "5.0 MiB", "3.0 TiB"]


def test_not_a_run_folder(tmp_path, capsys):
    assert list_checkpoints.main([str(tmp_path)]) == 2
    assert f"{str(tmp_path)!r} has no checkpoints folder" in capsys.readouterr().err


def test_committed_checkpoint_survives_a_new_manager_and_partial_is_removed(tmp_path):
    """What a re-run does: Orbax's cleanup removes the partial folder, never a committed step."""
    make_run(tmp_path)
    with checkpoints.checkpoint_manager(str(tmp_path)) as manager:
        assert manager.all_steps() == [1, 2]
    deadline = time.time() + 60  # Orbax removes it in a background thread (awaited by the next save)
    while len(os.listdir(tmp_path / "checkpoints")) > 2 and time.time() < deadline:
        time.sleep(0.1)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
