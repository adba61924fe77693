"""End-to-end training on the bundled corpus: falling loss, exact resume, restored params."""

from __future__ import annotations

import json
from pathlib import Path

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5x_lite import cli
from t5x_lite.training import loop

SMALL_RUN = [
    "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 16}",
    "BATCH_SIZE = 8",
    "train.eval_steps = 2",
    "train.progress_bar = False",
]


def run_training(model_dir: Path, train_steps: int, *extra: str) -> dict[str, float]:
    """Parses the quickstart config with small sizes and trains in this process."""
    gin.clear_config()
    cli.parse_gin(
        [str(cli.GIN_CONFIGS_DIR / "quickstart.gin")],
        SMALL_RUN + [f"MODEL_DIR = '{model_dir}'", f"TRAIN_STEPS = {train_steps}", *extra],
    )
    try:
        return loop.train()
    finally:
        gin.clear_config()


def read_jsonl(model_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]


def restore_params(model_dir: Path) -> dict:
    with ocp.CheckpointManager(model_dir / "checkpoints", item_names=("state", "dataset")) as manager:
        step = manager.latest_step()
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored.state["params"]


@pytest.mark.slow
def test_loss_falls_and_metrics_are_written(tmp_path):
    summary = run_training(
        tmp_path, 60, "train.log_period = 10", "train.eval_period = 60", "train.checkpoint_period = 60"
    )
    records = read_jsonl(tmp_path)
    train_records = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_records] == [10, 20, 30, 40, 50, 60]
    for key in ("train/loss", "train/accuracy", "train/learning_rate", "train/tokens_per_second"):
        assert key in train_records[-1], key
    first, last = train_records[0]["train/loss"], train_records[-1]["train/loss"]
    assert last < first - 1.0, (first, last)
    assert np.isfinite(summary["eval/loss"])
    assert "# KERNELS='auto' ran as 'cpu_tuned' on the cpu backend." in (tmp_path / "config.gin").read_text()
    assert "train.batch_size = %BATCH_SIZE" in (tmp_path / "operative_config.gin").read_text()
    assert (tmp_path / "checkpoints" / "60").is_dir()
    assert list((tmp_path / "tensorboard").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["cpu_tuned", "xla"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, kernels):
    settings = ("train.log_period = 1", "train.eval_period = 0", "train.checkpoint_period = 3",
                "DROPOUT_RATE = 0.1", f"KERNELS = '{kernels}'")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(straight, 6, *settings)
    run_training(resumed, 3, *settings)
    run_training(resumed, 6, *settings)  # same command, larger TRAIN_STEPS: resumes at step 3

    def losses(model_dir):
        return {r["step"]: r["train/loss"] for r in read_jsonl(model_dir) if "train/loss" in r}

    assert losses(resumed) == losses(straight)  # bit-for-bit, steps 1..6
    assert sorted(losses(resumed)) == [1, 2, 3, 4, 5, 6]
    straight_params, resumed_params = restore_params(straight), restore_params(resumed)
    jax.tree.map(np.testing.assert_array_equal, straight_params, resumed_params)


class Crash(Exception):
    """Stands for a run killed after its first step."""


def test_operative_config_is_written_once_the_first_step_has_run(tmp_path, monkeypatch):
    """A run that dies at step 2 has already written the bindings it used (the model's and train's)."""
    first_batch = loop.next_batch

    def crash_at_step_2(iterator, step, *args):
        if step == 2:
            assert (tmp_path / "operative_config.gin").is_file()
            raise Crash
        return first_batch(iterator, step, *args)

    monkeypatch.setattr(loop, "next_batch", crash_at_step_2)
    with pytest.raises(Crash):
        run_training(tmp_path, 5, "train.eval_period = 0", "train.checkpoint_period = 100")
    operative = (tmp_path / "operative_config.gin").read_text()
    for binding in ("T5Config.d_model = 128", "T5Config.num_encoder_layers = 2", "train.batch_size = %BATCH_SIZE",
                    "BATCH_SIZE = 8", "train.train_steps = %TRAIN_STEPS", "TRAIN_STEPS = 5", "adafactor.decay_rate = 0.8"):
        assert binding in operative, (binding, operative)


@pytest.mark.slow
def test_dimensions_the_mesh_cannot_split_are_reported_once(tmp_path, monkeypatch):
    """The tiny T5's 4 heads on `tensor: 8`: one line per replicated parameter (the 2 encoder layers folded) and
    per activation, reported once before the first step, with the memory they cost."""
    lines = []
    monkeypatch.setattr(loop, "report", lines.append)
    run_training(tmp_path, 2, "MESH_SHAPE = {'data': 1, 'fsdp': 1, 'tensor': 8}", "train.eval_period = 0",
                 "train.checkpoint_period = 100")
    parameter = ("Parameter encoder/layers/*/attention/query/kernel [128, 4, 32] float32: dimension 1 (4) is not "
                 "divisible by tensor=8, so it is replicated: 112.0 KiB more per device (2 parameters).")
    activation = ("Activation attention/logits [8, 4, 64, 64] float32: dimension 1 (4) is not divisible by tensor=8, "
                  "so it is replicated: 448.0 KiB more per device per array.")
    assert lines.count(parameter) == 1 and lines.count(activation) == 1, lines
    assert not any("mlp" in line or "vocab" in line for line in lines if "is replicated" in line), lines


def test_checkpoint_restores_identical_params(tmp_path):
    import tensorflow as tf

    from t5x_lite import checkpoints, partitioning
    from t5x_lite.data.position import DataIterator, DataLayout
    from t5x_lite.models.seq2seq import EncoderDecoderModel
    from t5x_lite.networks.t5 import T5Config
    from t5x_lite.training import optimizers, train_state

    model = EncoderDecoderModel(T5Config(vocab_size=256, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                                         num_encoder_layers=1, num_decoder_layers=1))
    mesh = partitioning.make_mesh({"data": -1})
    rules = partitioning.logical_axis_rules()
    tx = optimizers.adafactor(optimizers.rsqrt_schedule())
    state, shardings, _ = train_state.create_train_state(model, tx, 0, mesh, rules)
    def counting(layout, shard):
        return tf.data.Dataset.range(10).map(lambda x: {"x": [x]})

    iterator = DataIterator(counting, DataLayout("shard_info", 1, 1), 0, 1)
    next(iterator)
    manager = checkpoints.checkpoint_manager(str(tmp_path), async_save=False)
    checkpoints.save(manager, state, iterator)
    other_iterator = DataIterator(counting, DataLayout("shard_info", 1, 1), 0, 1)
    fresh, _, _ = train_state.create_train_state(model, tx, 1, mesh, rules)
    restored = checkpoints.restore_latest(
        manager, train_state.abstract_train_state(fresh, shardings), other_iterator
    )
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(restored))
    assert next(other_iterator)["x"].tolist() == [1]  # the data position came back too
    manager.close()
