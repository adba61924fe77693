"""Non-finite steps: by default the run stops before checkpointing the bad state; with
`train.skip_nonfinite_updates` the step changes nothing and is counted. Norms are logged."""

from __future__ import annotations

import json
from pathlib import Path

import gin
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from t5x_lite import cli, partitioning
from t5x_lite.models.seq2seq import EncoderDecoderModel
from t5x_lite.networks.t5 import T5Config
from t5x_lite.training import loop, optimizers, steps, train_state

CONFIG = T5Config(vocab_size=64, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=1,
                  num_decoder_layers=1)


def make_batch(weight: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tgt = rng.integers(2, CONFIG.vocab_size, (8, 6)).astype(np.int32)
    return {
        "encoder_input_tokens": rng.integers(2, CONFIG.vocab_size, (8, 10)).astype(np.int32),
        "decoder_input_tokens": np.concatenate([np.zeros((8, 1), np.int32), tgt[:, :-1]], axis=1),
        "decoder_target_tokens": tgt,
        "decoder_loss_weights": np.full(tgt.shape, weight, np.float32),
    }


def build(skip: bool):
    model = EncoderDecoderModel(CONFIG)
    mesh = partitioning.make_mesh({"data": -1})
    rules = partitioning.logical_axis_rules()
    tx = optimizers.adafactor(optimizers.constant_schedule(1e-2))
    if skip:
        tx = steps.skip_nonfinite_updates(tx)
    state, shardings, graphdef = train_state.create_train_state(model, tx, 0, mesh, rules)
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    step = steps.make_train_step(model, graphdef, tx, optimizers.constant_schedule(1e-2), shardings, batch_sharding)
    return state, step, lambda batch: partitioning.host_batch_to_global(batch, batch_sharding)


def test_a_skipped_step_changes_nothing_but_the_step_counter():
    state, step, to_global = build(skip=True)
    before = jax.device_get(state)
    state, metrics = step(state, to_global(make_batch(weight=np.nan)))  # NaN loss and gradients
    after = jax.device_get(state)
    assert int(after.step) == 1 and float(metrics["skipped"]) == 1.0
    assert int(metrics["consecutive_skips"]) == 1 and int(metrics["skipped_steps"]) == 1
    jax.tree.map(np.testing.assert_array_equal, before.params, after.params)
    jax.tree.map(np.testing.assert_array_equal, before.opt_state.inner_state, after.opt_state.inner_state)

    state, metrics = step(state, to_global(make_batch()))
    assert float(metrics["skipped"]) == 0.0 and int(metrics["consecutive_skips"]) == 0
    assert int(metrics["skipped_steps"]) == 1  # the total is kept (and checkpointed with the optimizer state)
    params = jax.device_get(state.params)
    assert not np.array_equal(params["encoder"]["layers"][0]["mlp"]["wo"]["kernel"],
                              after.params["encoder"]["layers"][0]["mlp"]["wo"]["kernel"])
    np.testing.assert_allclose(float(metrics["param_norm"]), float(optax.global_norm(params)), rtol=1e-6)


def test_without_skipping_a_nan_step_poisons_the_parameters():
    """Why the default stops the run: the update of a NaN step is applied."""
    state, step, to_global = build(skip=False)
    state, metrics = step(state, to_global(make_batch(weight=np.nan)))
    assert not np.isfinite(float(metrics["grad_norm"]))
    assert not np.isfinite(float(metrics["param_norm"]))
    assert "skipped" not in metrics


# In-process runs of the quickstart config, made tiny; `poison_steps` get an out-of-vocabulary
# target id (the gather fills NaN), so their loss is NaN.
RUN = ["BATCH_SIZE = 8", "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 8}", "train.log_period = 1",
       "train.eval_period = 0", "train.checkpoint_period = 1", "train.progress_bar = False",
       "checkpoint_manager.keep = None"]


def run(model_dir: Path, train_steps: int, poison_steps: set[int], monkeypatch, *bindings: str) -> None:
    real_next_batch = loop.next_batch

    def poisoned_next_batch(iterator, step, *args):
        batch = real_next_batch(iterator, step, *args)
        if step in poison_steps:
            batch = dict(batch, decoder_target_tokens=batch["decoder_target_tokens"].copy())
            batch["decoder_target_tokens"][0, 0] = 10**6
        return batch

    monkeypatch.setattr(loop, "next_batch", poisoned_next_batch)
    gin.clear_config()
    cli.parse_gin([str(cli.GIN_CONFIGS_DIR / "quickstart.gin")],
                     [*RUN, f"MODEL_DIR = '{model_dir}'", f"TRAIN_STEPS = {train_steps}", *bindings])
    try:
        loop.train()
    finally:
        gin.clear_config()


def committed_steps(model_dir: Path) -> list[int]:
    return sorted(ocp.path.step.checkpoint_steps(model_dir / "checkpoints"))


def records(model_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (model_dir / "metrics.jsonl").read_text().splitlines())}


def saved_params(model_dir: Path, step: int) -> dict:
    with ocp.CheckpointManager(model_dir / "checkpoints", item_names=("state", "dataset")) as manager:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state["params"]


@pytest.mark.slow
def test_default_stops_naming_the_step_and_keeps_the_good_checkpoints(tmp_path, monkeypatch):
    with pytest.raises(FloatingPointError, match=r"Non-finite loss or gradient norm at step 3 .*no checkpoint"):
        run(tmp_path, 5, {3}, monkeypatch)
    assert committed_steps(tmp_path) == [1, 2]  # step 2 committed; nothing of step 3 written
    assert not any(".orbax-checkpoint-tmp" in p.name for p in (tmp_path / "checkpoints").iterdir())
    logged = records(tmp_path)
    assert np.isfinite(logged[2]["train/grad_norm"]) and logged[2]["train/param_norm"] > 0


@pytest.mark.slow
def test_skipping_counts_skips_and_stops_after_too_many_in_a_row(tmp_path, monkeypatch):
    with pytest.raises(FloatingPointError, match=r"2 non-finite updates in a row were skipped up to step 7"):
        run(tmp_path, 8, {3, 6, 7}, monkeypatch, "train.skip_nonfinite_updates = True",
            "train.max_consecutive_skips = 2")
    logged = records(tmp_path)
    assert [logged[s]["train/skipped_steps"] for s in (2, 3, 4, 5, 6)] == [0, 1, 1, 1, 2]
    assert np.isnan(logged[3]["train/loss"]) and np.isfinite(logged[4]["train/loss"])
    assert committed_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    jax.tree.map(np.testing.assert_array_equal, saved_params(tmp_path, 2), saved_params(tmp_path, 3))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), saved_params(tmp_path, 3), saved_params(tmp_path, 4))
    assert any(jax.tree.leaves(changed))  # step 4 was applied
