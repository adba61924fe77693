"""Checkpoint retention: `checkpoint_manager.keep` / `keep_period` leave exactly the steps they promise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
import tensorflow as tf

from t5x_lite import checkpoints
from t5x_lite.data.position import DataIterator, DataLayout
from t5x_lite.training.train_state import TrainState


def state_at(step: int) -> TrainState:
    return TrainState(step=jnp.asarray(step, jnp.int32), params={"w": jnp.full((4,), float(step))}, opt_state={},
                      rng=jax.random.key_data(jax.random.key(0)))


@pytest.mark.parametrize(
    ("keep", "keep_period", "expected"),
    [
        (3, 4, [4, 8, 9, 10]),  # the newest three, plus every 4th step
        (3, None, [8, 9, 10]),
        (1, 5, [5, 10]),
        (None, None, list(range(1, 11))),  # keep=None keeps every step
        (2, 20, [9, 10]),  # no step reached the period
    ],
)
def test_retention_keeps_exactly_what_it_promises(tmp_path, keep, keep_period, expected):
    """A checkpoint every step for 10 steps, saved asynchronously as the trainer saves them."""
    iterator = DataIterator(lambda layout, shard: tf.data.Dataset.range(100).map(lambda x: {"x": [x]}),
                            DataLayout("shard_info", 1, 1), 0, 1)
    manager = checkpoints.checkpoint_manager(str(tmp_path), keep=keep, keep_period=keep_period)
    for step in range(1, 11):
        next(iterator)
        checkpoints.save(manager, state_at(step), iterator)
    checkpoints.wait_until_finished(manager)
    manager.close()
    assert checkpoints.committed_steps(str(tmp_path)) == expected
    on_disk = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert on_disk == expected


@pytest.mark.parametrize(("keep", "keep_period"), [(0, None), (3, 0)])
def test_retention_rejects_empty_promises(keep, keep_period):
    with pytest.raises(ValueError, match="checkpoint_manager.keep"):
        checkpoints.retention_policy(keep, keep_period)
