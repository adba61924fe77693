"""End-task-aware training (TARTAN): the weighted step, the meta-gradient, the dev slice, exact resume, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from t5x_lite import cli, partitioning
from t5x_lite.data import multi_objective, pipeline
from t5x_lite.models.seq2seq import EncoderDecoderModel
from t5x_lite.networks.t5 import T5Config
from t5x_lite.training import loop, optimizers
from t5x_lite.training.end_task_aware import EndTaskAware
from t5x_lite.training.weighting import MetaWeighting, StaticWeighting
from tests.test_cli import run_cli

CONFIG = T5Config(vocab_size=64, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=1,
                  num_decoder_layers=1)
LEARNING_RATE = 0.1
TAPT = "bundled_qa_extractive_inputs_span_corruption"


class SignedLossModel(EncoderDecoderModel):
    """The tiny T5 whose loss is multiplied by the batch's `loss_sign` (-1 makes an objective that opposes another
    on the same batch: its gradient is the other's, negated)."""

    def loss_fn(self, network, batch, dropout_rngs=None):
        loss, sums = super().loss_fn(network, batch, dropout_rngs)
        return loss * batch["loss_sign"][0], sums


def slot_batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One objective's batch of 8 random rows."""
    targets = rng.integers(2, CONFIG.vocab_size, (8, 6)).astype(np.int32)
    return {
        "encoder_input_tokens": rng.integers(2, CONFIG.vocab_size, (8, 10)).astype(np.int32),
        "decoder_input_tokens": np.concatenate([np.zeros((8, 1), np.int32), targets[:, :-1]], axis=1),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones(targets.shape, np.float32),
        "loss_sign": np.ones((8,), np.float32),
    }


def stacked(slots: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The slots' batches as the data pipeline gives them: [batch, slots, ...]."""
    return {key: np.stack([slot[key] for slot in slots], axis=1) for key in slots[0]}


def build(mode: EndTaskAware):
    """(state, jitted step, batch-to-mesh) of `mode` over the tiny model, plain SGD at LEARNING_RATE."""
    model = SignedLossModel(CONFIG)
    mesh = partitioning.make_mesh({"data": -1})
    rules = partitioning.logical_axis_rules()
    schedule = optimizers.constant_schedule(LEARNING_RATE)
    tx = optax.sgd(schedule)
    state, shardings, graphdef = mode.create_train_state(model, tx, 0, mesh, rules)
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    step = mode.make_train_step(model, graphdef, tx, schedule, shardings, batch_sharding, 1)
    return model, graphdef, state, step, lambda batch: partitioning.host_batch_to_global(batch, batch_sharding)


def plain_loss(model, graphdef, body: dict, head: dict, batch: dict) -> jax.Array:
    """The plain model's loss on one objective's batch with that objective's head."""
    return model.loss_fn(nnx.merge(graphdef, {**body, "logits_dense": head}), batch)[0]


def test_static_step_is_the_weighted_sum_of_the_objectives_losses_and_its_gradient():
    mode = EndTaskAware({"tapt": TAPT, "general": "bundled_span_corruption"}, StaticWeighting({"end_task": 0.5, "general": 0.2}))
    model, graphdef, state, step, to_global = build(mode)
    rng = np.random.default_rng(0)
    slots = [slot_batch(rng) for _ in range(3)]
    before = jax.device_get(state)
    weights = np.array([0.5, 1 / 3, 0.2], np.float32)  # `tapt` keeps the default 1/n

    def weighted_loss(params: dict, heads: dict) -> jax.Array:
        body = {k: v for k, v in params.items() if k != "logits_dense"}
        all_heads = [params["logits_dense"], *(jax.tree.map(lambda h, i=i: h[i], heads) for i in range(2))]
        return sum(w * plain_loss(model, graphdef, body, head, slot)
                   for w, head, slot in zip(weights, all_heads, slots))

    expected_loss, (params_grad, heads_grad) = jax.jit(jax.value_and_grad(weighted_loss, argnums=(0, 1)))(
        before.params, before.heads)
    state, metrics = step(state, to_global(stacked(slots)))
    after = jax.device_get(state)

    np.testing.assert_allclose(float(metrics["loss"]), float(expected_loss), rtol=1e-5)
    for i, name in enumerate(mode.names):
        assert float(metrics["model"][f"aux_weight/{name}"]) == pytest.approx(weights[i])
        body = {k: v for k, v in before.params.items() if k != "logits_dense"}
        head = before.params["logits_dense"] if i == 0 else jax.tree.map(lambda h, i=i: h[i - 1], before.heads)
        np.testing.assert_allclose(float(metrics["model"][f"aux_loss/{name}"]),
                                   float(plain_loss(model, graphdef, body, head, slots[i])), rtol=1e-5)
    sgd = lambda old, grad: old - LEARNING_RATE * grad
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 after.params, jax.tree.map(sgd, before.params, params_grad))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 after.heads, jax.tree.map(sgd, before.heads, heads_grad))
    assert "aux_cosine/end_task" not in metrics["model"]  # static weights compute no dev gradient


def test_meta_step_raises_an_aligned_objectives_weight_and_lowers_an_opposed_ones():
    """`same` sees the dev batch through the dev head's weights (its body gradient IS the dev gradient),
    `opposed` the same with its loss negated; the end task sees other data."""
    meta_lr = 0.5
    mode = EndTaskAware({"same": TAPT, "opposed": TAPT}, MetaWeighting(meta_lr))
    _, _, state, step, to_global = build(mode)
    rng = np.random.default_rng(1)
    end, dev = slot_batch(rng), slot_batch(rng)
    opposed = {**dev, "loss_sign": -np.ones((8,), np.float32)}
    dev_head = jax.tree.map(lambda h: h[-1], state.heads)
    state = state.replace(heads=jax.tree.map(lambda h, d: h.at[0].set(d).at[1].set(d), state.heads, dev_head))

    state, metrics = step(state, to_global(stacked([end, dev, opposed, dev])))
    model_metrics = jax.device_get(metrics["model"])
    assert model_metrics["aux_cosine/same"] == pytest.approx(1.0, abs=1e-4)
    assert model_metrics["aux_cosine/opposed"] == pytest.approx(-1.0, abs=1e-4)
    assert -1 < model_metrics["aux_cosine/end_task"] < 1
    logits = np.asarray(jax.device_get(state.weighting["logits"]))
    np.testing.assert_allclose(logits[1:], [meta_lr, -meta_lr], rtol=1e-4)
    weights = np.asarray(jax.nn.softmax(logits))
    assert weights[1] > 1 / 3 > weights[2]  # equal (1/3 each) before the step
    for name in mode.names:  # this step used the weights it started with
        assert model_metrics[f"aux_weight/{name}"] == pytest.approx(1 / 3)


def example_inputs(task: str) -> list[tuple[int, ...]]:
    """The tokenized inputs of every example of `task`'s train split, in file order."""
    ds = pipeline.get_dataset(task, {"inputs": 320, "targets": 64}, 1, EncoderDecoderModel(CONFIG).feature_converter_cls,
                              split="train", shuffle=False, num_epochs=1, pack=False, seed=0)
    return [tuple(row["encoder_input_tokens"][0]) for row in ds.as_numpy_iterator()]


def test_the_dev_slice_is_disjoint_from_the_end_tasks_training_examples():
    end_task = "bundled_qa_extractive"
    train = example_inputs(multi_objective.slice_task(end_task, "train", 0.2))
    dev = example_inputs(multi_objective.slice_task(end_task, "dev", 0.2))
    assert not set(train) & set(dev)
    assert len(train) + len(dev) == 1000  # the task's 1000 training questions, each in exactly one part
    assert 150 < len(dev) < 250, len(dev)
    mode = EndTaskAware({"tapt": "bundled_qa_extractive_inputs_span_corruption"}, MetaWeighting())
    assert mode.slot_tasks(end_task) == [multi_objective.slice_task_name(end_task, "train", 0.2),
                                        "bundled_qa_extractive_inputs_span_corruption",
                                        multi_objective.slice_task_name(end_task, "dev", 0.2)]


RUN = ["TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 16}", "BATCH_SIZE = 8", "train.log_period = 1",
       "train.eval_period = 0", "train.checkpoint_period = 2", "train.progress_bar = False", "DROPOUT_RATE = 0.1",
       "T5Config.d_model = 32", "T5Config.num_heads = 2", "T5Config.head_dim = 16", "T5Config.d_ff = 64",
       "T5Config.num_encoder_layers = 1", "T5Config.num_decoder_layers = 1",
       "EndTaskAware.auxiliaries = {'tapt': 'bundled_qa_extractive_inputs_span_corruption'}"]


def run_meta(model_dir: Path, train_steps: int) -> None:
    """examples/tartan_meta.gin, made tiny, in this process."""
    gin.clear_config()
    cli.parse_gin([str(cli.GIN_CONFIGS_DIR / "examples/tartan_meta.gin")],
                  [*RUN, f"MODEL_DIR = '{model_dir}'", f"TRAIN_STEPS = {train_steps}"])
    try:
        loop.train()
    finally:
        gin.clear_config()


def logged(model_dir: Path) -> dict[int, dict[str, float]]:
    """step -> the train metrics logged at it."""
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("train/") and "per_second" not in k}
            for r in records if "train/loss" in r}


@pytest.mark.slow
def test_meta_tartan_resumes_exactly(tmp_path):
    """A run resumed from the straight run's step-2 checkpoint (as after a stop there) logs the same losses,
    weights and cosines at steps 3 and 4 and ends with the same parameters; they restore as a plain model's.
    One auxiliary (TAPT) keeps it short."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_meta(straight, 4)
    shutil.copytree(straight / "checkpoints" / "2", resumed / "checkpoints" / "2")
    run_meta(resumed, 4)
    assert sorted(logged(resumed)) == [3, 4]
    assert logged(resumed) == {step: logged(straight)[step] for step in (3, 4)}
    assert {"train/aux_weight/tapt", "train/aux_loss/tapt", "train/aux_cosine/end_task"} <= set(logged(straight)[4])
    assert logged(straight)[4]["train/aux_weight/tapt"] != pytest.approx(1 / 2)  # the weights moved
    model = EncoderDecoderModel(T5Config(**{**vars(CONFIG), "vocab_size": 8192, "d_model": 32, "head_dim": 16,
                                            "d_ff": 64, "feed_forward": "gated-gelu"}))
    mesh = partitioning.make_mesh({"data": -1})
    params = [jax.device_get(checkpoints_params(model, run, mesh)) for run in (straight, resumed)]
    jax.tree.map(np.testing.assert_array_equal, *params)


def checkpoints_params(model, model_dir: Path, mesh) -> dict:
    """The newest checkpoint's parameters, read as a plain model's (as eval and infer read them)."""
    from t5x_lite import checkpoints

    return checkpoints.load_checkpoint_params(model, str(model_dir), mesh, partitioning.logical_axis_rules())[1]


@pytest.mark.slow
def test_a_typod_auxiliary_task_is_one_clear_error(tmp_path):
    model_dir = tmp_path / "run"
    result = run_cli("--gin_file=examples/tartan_mt.gin", f"--gin.MODEL_DIR='{model_dir}'",
                     "--gin.EndTaskAware.auxiliaries={'tapt': 'bundled_qa_extractive_inputs_span_corruptoin'}")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "error: Auxiliary objective 'tapt': Unknown task or mixture 'bundled_qa_extractive_inputs_span_corruptoin'. "
        "Did you mean 'bundled_qa_extractive_inputs_span_corruption', 'bundled_qa_extractive_inputs_bart_denoising', "
        "'bundled_qa_extractive_inputs_prefix_lm'? Register it in a module and pass "
        "--gin.MIXTURE_OR_TASK_MODULE=\"'my_module'\", or pick one of the registered names (tools/show_task.py "
        "lists them)."
    )
    assert "Traceback" not in result.stderr
    assert not (model_dir / "checkpoints").exists() or not any((model_dir / "checkpoints").iterdir())


def test_static_weights_of_an_unknown_objective_are_an_error():
    mode = EndTaskAware({"tapt": "bundled_qa_extractive_inputs_span_corruption"}, StaticWeighting({"tpat": 0.5}))
    with pytest.raises(cli.UserError, match=r"StaticWeighting.weights names \['tpat'\], which are not objectives. "
                                            r"Did you mean 'tapt'\? The objectives are \['end_task', 'tapt'\]."):
        mode.check_objectives()


def test_a_tied_head_is_an_error():
    model = EncoderDecoderModel(T5Config(**{**vars(CONFIG), "tie_word_embeddings": True}))
    with pytest.raises(cli.UserError, match="needs an output head of its own at 'logits_dense'"):
        EndTaskAware({"tapt": "t"}).check_model(model)


def test_the_weights_sum_to_one_by_default():
    assert float(jnp.sum(StaticWeighting().weights(StaticWeighting().init(["a", "b", "c"])))) == pytest.approx(1.0)
