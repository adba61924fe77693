"""ELECTRA replaced-token detection: the loss as defined (by hand on a tiny batch), samples equal to
the original count as original, no gradient through the sampling, shared embeddings, the generator's
size, samples drawn from the generator's softmax, metrics, and loading the discriminator into BERT."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5x_lite.models.electra import ElectraModel, replaced_token_labels
from t5x_lite.models.encoder import EncoderClassificationModel
from t5x_lite.networks.bert import BertConfig
from t5x_lite.networks.electra import ElectraConfig, bert_config
from t5x_lite.training import steps
from t5x_lite.training.train_state import TrainState

CONFIG = ElectraConfig(vocab_size=40, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_layers=2, max_position_embeddings=24)
INPUTS = np.array([[2, 5, 30, 7, 8, 30, 3, 0], [2, 11, 12, 30, 14, 15, 16, 3]], np.int32)  # 30 plays [MASK]
TARGETS = np.array([[0, 0, 6, 0, 0, 9, 0, 0], [0, 0, 0, 13, 0, 0, 0, 0]], np.int32)  # originals where chosen


def batch(inputs=INPUTS, targets=TARGETS) -> dict[str, jax.Array]:
    return {
        "encoder_input_tokens": jnp.asarray(inputs),
        "encoder_target_tokens": jnp.asarray(targets),
        "encoder_loss_weights": jnp.asarray((targets > 0).astype(np.int32)),
    }


def network_with_forced_sample(model: ElectraModel, token: int, seed: int = 0):
    """The model's network, random parameters, with the generator's output bias so large at `token`
    that every sample is `token` (the rest of its logits unchanged)."""
    network = model.build_network(nnx.Rngs(seed))
    network.generator.head.bias[...] = jnp.zeros((CONFIG.vocab_size,)).at[token].set(1e4)
    return network


def test_loss_equals_its_definition_by_hand():
    model = ElectraModel(CONFIG, generator_weight=0.5, discriminator_weight=3.0, max_prediction_fraction=1.0)
    network = network_with_forced_sample(model, token=9)
    loss, sums = model.loss_fn(network, batch(), nnx.Rngs(dropout=jax.random.key(3)))

    chosen = TARGETS > 0
    gen_logits = np.asarray(network.generator_logits(network.generator_hidden(jnp.asarray(INPUTS))))
    log_probs = gen_logits - jax.scipy.special.logsumexp(gen_logits, axis=-1, keepdims=True)
    mlm = -np.mean(np.take_along_axis(np.asarray(log_probs), TARGETS[..., None], -1)[..., 0][chosen])
    corrupted = np.where(chosen, 9, INPUTS)
    replaced = (corrupted != np.where(chosen, TARGETS, INPUTS)).astype(np.float32)
    assert replaced.sum() == 2  # 6 -> 9 and 13 -> 9 replaced; the 9 sampled where 9 was is original
    logits = np.asarray(network(jnp.asarray(corrupted)), np.float64)
    bce = np.log1p(np.exp(logits)) - replaced * logits
    real = INPUTS != 0
    expected = 0.5 * mlm + 3.0 * bce[real].mean()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    metrics = model.sum_metrics(sums)
    np.testing.assert_allclose(float(metrics["generator_loss"]), mlm, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["discriminator_loss"]), bce[real].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["replaced_rate"]), 2 / real.sum())
    np.testing.assert_allclose(float(metrics["discriminator_accuracy"]), np.mean((logits > 0)[real] == (replaced > 0)[real]))


def test_gathered_generator_logits_give_the_same_loss():
    everywhere = ElectraModel(CONFIG, max_prediction_fraction=1.0)
    gathered = ElectraModel(CONFIG, max_prediction_fraction=0.25)  # budget 4 of 16 positions holds the 3 chosen
    tight = ElectraModel(CONFIG, max_prediction_fraction=0.1)  # budget 2 < 3 chosen: the all-positions path
    network = network_with_forced_sample(everywhere, token=9)
    losses = [float(m.loss_fn(network, batch(), None)[0]) for m in (everywhere, gathered, tight)]
    np.testing.assert_allclose(losses, losses[0], rtol=1e-6)


def test_a_sample_equal_to_the_original_counts_as_original():
    inputs, targets = INPUTS.copy(), TARGETS.copy()
    corrupted, labels = replaced_token_labels(jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(np.where(targets > 0, targets, 0)))
    np.testing.assert_array_equal(np.asarray(corrupted), np.where(targets > 0, targets, inputs))
    assert int(labels.sum()) == 0
    # Through the model: every chosen original is 9 and the generator samples 9, so nothing is replaced.
    model = ElectraModel(CONFIG)
    targets = np.where(TARGETS > 0, 9, 0).astype(np.int32)
    _, sums = model.loss_fn(network_with_forced_sample(model, token=9), batch(targets=targets), nnx.Rngs(dropout=jax.random.key(0)))
    assert float(sums["replaced_sum"]) == 0 and float(sums["discriminator_weight_sum"]) == (INPUTS != 0).sum()


def _grads(model: ElectraModel, network) -> dict:
    graphdef, params = nnx.split(network, nnx.Param)

    def loss(params):
        return model.loss_fn(nnx.merge(graphdef, params), batch(), nnx.Rngs(dropout=jax.random.key(1)))[0]

    return nnx.to_pure_dict(jax.grad(loss)(params))


def _norm(tree) -> float:
    return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))


def test_no_gradient_flows_through_the_sampling():
    # Discriminator loss only: the generator's own parameters get no gradient (the samples are
    # integers drawn from stopped logits); the shared embeddings and the discriminator do.
    model = ElectraModel(CONFIG, generator_weight=0.0, discriminator_weight=1.0)
    grads = _grads(model, model.build_network(nnx.Rngs(0)))
    assert _norm(grads["generator"]) == 0.0
    assert _norm(grads["layers"]) > 0 and _norm(grads["discriminator_predictions"]) > 0
    assert _norm(grads["embeddings"]["word_embeddings"]) > 0
    # Generator loss only: the discriminator's layers and head get none.
    model = ElectraModel(CONFIG, generator_weight=1.0, discriminator_weight=0.0)
    grads = _grads(model, model.build_network(nnx.Rngs(0)))
    assert _norm(grads["generator"]) > 0
    assert _norm(grads["layers"]) == 0.0 and _norm(grads["discriminator_predictions"]) == 0.0


def test_embeddings_are_shared_and_the_generator_is_a_quarter_wide():
    model = ElectraModel(CONFIG)
    network = model.build_network(nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(network, nnx.Param))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    embedding_tables = [p for p, leaf in flat if leaf.shape == (CONFIG.vocab_size, CONFIG.d_model)]
    assert len(embedding_tables) == 1 and "generator" not in params["embeddings"]
    assert "embeddings" not in params["generator"]["body"]
    generator = CONFIG.generator_config()
    assert (generator.d_model, generator.num_heads, generator.d_ff) == (8, 1, 16)
    assert params["generator"]["body"]["embeddings_project"]["kernel"].shape == (32, 8)
    # Changing the one table changes the generator's logits and the discriminator's.
    tokens = jnp.asarray(INPUTS)
    before = (network.generator_logits(network.generator_hidden(tokens)), network(tokens))
    network.embeddings.word_embeddings.embedding[...] = network.embeddings.word_embeddings.embedding[...] * 2
    after = (network.generator_logits(network.generator_hidden(tokens)), network(tokens))
    assert all(not np.allclose(b, a) for b, a in zip(before, after))


def test_samples_follow_the_generator_softmax():
    # One chosen position per row over many rows; the generator's logits there are the same for every
    # row (same input), so the sample frequencies must match its softmax (excluding padding).
    model = ElectraModel(CONFIG, max_prediction_fraction=1.0)
    network = model.build_network(nnx.Rngs(0))
    network.generator.head.bias[...] = jnp.zeros((CONFIG.vocab_size,)).at[jnp.array([4, 5, 6])].set(jnp.array([8.0, 8.7, 9.1]))
    rows = 4000
    inputs = np.tile(np.array([[2, 30, 7, 3]], np.int32), (rows, 1))
    targets = np.tile(np.array([[0, 6, 0, 0]], np.int32), (rows, 1))
    hidden = network.generator_hidden(jnp.asarray(inputs))
    _, samples = model.generator_pass(network, hidden, jnp.asarray(targets), jnp.asarray(targets > 0), jax.random.key(7))
    samples = np.asarray(samples)[:, 1]
    logits = np.array(network.generator_logits(hidden[:1]))[0, 1]
    logits[0] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    counts = np.bincount(samples, minlength=CONFIG.vocab_size)
    assert counts[0] == 0
    for token in (4, 5, 6):  # each within 4.5 standard deviations of its expected count
        expected = rows * probs[token]
        assert abs(counts[token] - expected) < 4.5 * np.sqrt(expected * (1 - probs[token])) + 1


def test_train_step_reports_the_discriminator_metrics_with_microbatches():
    model = ElectraModel(CONFIG)
    network = model.build_network(nnx.Rngs(0))
    graphdef, params = nnx.split(network, nnx.Param)
    params = nnx.to_pure_dict(params)
    tx = optax.adam(1e-3)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(0)))
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree.map(lambda _: replicated, state)
    for microbatches in (1, 2):
        step = steps.make_train_step(model, graphdef, tx, optax.constant_schedule(1e-3), shardings, replicated, microbatches)
        _, metrics = step(jax.tree.map(jnp.copy, state), batch())
        assert set(metrics["model"]) == {"generator_loss", "discriminator_loss", "discriminator_accuracy", "replaced_rate",
                                         "replaced_recall"}
        assert all(np.isfinite(float(v)) for v in metrics["model"].values())


def test_the_discriminator_loads_into_the_bert_classification_model():
    electra = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: ElectraModel(CONFIG).build_network(nnx.Rngs(0))), nnx.Param)))
    classifier = EncoderClassificationModel(bert_config(CONFIG))
    bert = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: classifier.build_network(nnx.Rngs(0))), nnx.Param)))
    for name in ("embeddings", "layers"):
        assert electra[name] == bert[name]
    assert set(bert) - {"embeddings", "layers"} == {"pooler", "classifier"} == set(classifier.fresh_param_prefixes)


def test_bad_weights_and_fractions_fail_early():
    with pytest.raises(ValueError, match="generator_fraction=0.0 must be in"):
        dataclasses.replace(CONFIG, generator_fraction=0.0)
    with pytest.raises(ValueError, match="discriminator_weight=-1"):
        ElectraModel(CONFIG, discriminator_weight=-1)


@pytest.mark.slow
def test_example_pretraining_loss_falls_and_the_discriminator_fine_tunes(tmp_path):
    from t5x_lite import checkpoints
    from tests.models.test_encoder_only import run_training

    records = run_training(
        "examples/electra_tiny_pretrain.gin", tmp_path,
        "TRAIN_STEPS = 30", "BATCH_SIZE = 8", "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 64}",
        "warmup_decay_schedule.warmup_steps = 5", "train.log_period = 5", "train.eval_period = 30",
        "train.eval_steps = 2", "train.checkpoint_period = 30",
    )
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses
    evals = [r for r in records if "eval/loss" in r]
    for name in ("discriminator_accuracy", "replaced_rate", "generator_loss", "discriminator_loss"):
        assert np.isfinite(records[-2 if "eval/loss" in records[-1] else -1].get(f"train/{name}", np.nan)), records
        assert np.isfinite(evals[-1][f"eval/{name}"])
    assert 0.0 < evals[-1]["eval/replaced_rate"] <= 0.16  # at most the 15% chosen tokens (of the text ones)

    # The discriminator as BERT's encoder under a fresh pooler and classifier (INITIAL_CHECKPOINT_PATH).
    config = BertConfig(vocab_size=8192, d_model=128, num_heads=4, head_dim=32, d_ff=512, num_layers=2)
    model = EncoderClassificationModel(config)
    electra_config = ElectraConfig(**dataclasses.asdict(config))
    fresh = nnx.to_pure_dict(nnx.state(model.build_network(nnx.Rngs(7)), nnx.Param))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh)
    restored = checkpoints.restore_params(str(tmp_path), abstract, model, fresh=fresh)
    electra = checkpoints.restore_params(str(tmp_path), jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
        nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: ElectraModel(electra_config).build_network(nnx.Rngs(0))), nnx.Param))))
    np.testing.assert_array_equal(restored["layers"][1]["mlp"]["wi"]["kernel"], electra["layers"][1]["mlp"]["wi"]["kernel"])
    np.testing.assert_array_equal(restored["embeddings"]["word_embeddings"]["embedding"],
                                  electra["embeddings"]["word_embeddings"]["embedding"])
    for head in ("pooler", "classifier"):
        np.testing.assert_array_equal(restored[head]["kernel"], fresh[head]["kernel"])
