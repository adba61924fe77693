"""The XLNet-style permutation LM: two-stream attention's definition (identity order = left-to-right LM; a
prediction sees neither its own token nor later-in-order ones), its training through t5x_lite.train, and the
errors a user can make with it through the command line."""

from __future__ import annotations

import dataclasses
import json

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_lite import cli
from t5x_lite import train as train_lib
from t5x_lite.models.permutation_lm import PermutationLMModel
from t5x_lite.networks.gpt import GPT, GPTConfig
from t5x_lite.networks.xlnet import XLNet
from tests.test_cli import run_cli

TINY = GPTConfig(vocab_size=97, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_layers=2,
                 max_position_embeddings=40, kernels="xla")
LENGTH = 12


def tokens(rows: int = 3, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(3, TINY.vocab_size, (rows, LENGTH)), jnp.int32)


def random_ranks(rows: int = 3, seed: int = 1) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.stack([rng.permutation(LENGTH) for _ in range(rows)]), jnp.int32)


def identity_ranks(rows: int = 3, length: int = LENGTH) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))


def xlnet(config: GPTConfig = TINY) -> XLNet:
    return XLNet(config, rngs=nnx.Rngs(0))


def test_parameters_are_gpts_plus_the_query_vector():
    network, gpt = xlnet(), GPT(TINY, rngs=nnx.Rngs(1))
    ours = nnx.to_pure_dict(nnx.state(network, nnx.Param))
    assert ours.pop("query_embedding").shape == (TINY.d_model,)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(gpt, nnx.Param)))


def test_identity_order_content_stream_is_gpts_causal_forward():
    """With rank = position, the content stream's mask is GPT's causal mask: with the same weights its tied
    logits are GPT's, position by position."""
    network, gpt = xlnet(), GPT(TINY, rngs=nnx.Rngs(1))
    params = nnx.to_pure_dict(nnx.state(network, nnx.Param))
    params.pop("query_embedding")
    state = nnx.state(gpt, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(gpt, state)
    x = tokens()
    content, _ = network.streams(x, identity_ranks())
    np.testing.assert_allclose(network.token_embedder.attend(content), gpt(x), atol=1e-5, rtol=1e-5)


def test_identity_order_is_left_to_right_lm():
    """Left-to-right LM, precisely: with the identity order, the model's loss over positions 1..s-1 equals
    -mean_i log p(x_i | x_<i), where each conditional comes from a SEPARATE forward pass over the prefix x_<i alone
    (the sequence cut after x_i, whose own token the query stream cannot read). So every predicted token's
    distribution is a function of the tokens before it, and the loss is the causal LM's factorization."""
    model, network, x = PermutationLMModel(TINY), xlnet(), tokens()
    weights = jnp.ones_like(x).at[:, 0].set(0)
    batch = {"decoder_input_tokens": x, "decoder_target_tokens": x, "decoder_loss_weights": weights,
             "decoder_factorization_rank": identity_ranks()}
    loss, _ = model.loss_fn(network, batch)
    full = network(x, identity_ranks())
    prefix_log_probs = []
    for i in range(1, LENGTH):
        logits = network(x[:, : i + 1], identity_ranks(length=i + 1))[:, i]
        np.testing.assert_allclose(full[:, i], logits, atol=1e-5, rtol=1e-5)
        prefix_log_probs.append(jnp.take_along_axis(jax.nn.log_softmax(logits), x[:, i, None], axis=-1)[:, 0])
    np.testing.assert_allclose(loss, -jnp.mean(jnp.stack(prefix_log_probs)), rtol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_prediction_sees_neither_its_own_token_nor_later_ones(scan_layers):
    """For every position i: replacing x_i itself, or every token later than i in the order, leaves i's logits
    unchanged; replacing one token earlier in the order changes them (so the check is not vacuous)."""
    network = xlnet(dataclasses.replace(TINY, scan_layers=scan_layers))
    logits = nnx.jit(lambda network, x, ranks: network(x, ranks))
    x, ranks = tokens(), random_ranks()
    base = logits(network, x, ranks)
    rng = np.random.default_rng(7)
    for row in range(x.shape[0]):
        for i in range(LENGTH):
            own = x.at[row, i].set((x[row, i] + 1 + rng.integers(0, 90)) % TINY.vocab_size or 3)
            later = ranks[row] > ranks[row, i]
            others = jnp.asarray(rng.integers(3, TINY.vocab_size, LENGTH), jnp.int32)
            after = x.at[row].set(jnp.where(later, others, x[row]))
            for changed in (own, after):
                np.testing.assert_allclose(logits(network, changed, ranks)[row, i], base[row, i], atol=1e-5, rtol=1e-5)
            earlier = np.flatnonzero(ranks[row] < ranks[row, i])
            if len(earlier):
                j = int(earlier[-1])
                moved = x.at[row, j].set(x[row, j] % (TINY.vocab_size - 3) + 3 if x[row, j] != 3 else 4)
                assert np.abs(logits(network, moved, ranks)[row, i] - base[row, i]).max() > 1e-4


def test_packed_segments_do_not_see_each_other():
    network, x = xlnet(), tokens(rows=1)
    segments = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3], jnp.int32)
    positions = jnp.asarray([list(range(5)) + list(range(4)) + [0] * 3], jnp.int32)
    ranks = jnp.asarray([[3, 0, 4, 1, 2, 2, 0, 3, 1, 0, 0, 0]], jnp.int32)
    base = network(x, ranks, segments, positions)
    # Changing the second segment and the padding leaves the first segment's logits as they were.
    other = x.at[0, 5:].set(jnp.asarray([5, 6, 7, 8, 9, 10, 11], jnp.int32))
    np.testing.assert_allclose(network(other, ranks, segments, positions)[0, :5], base[0, :5], atol=1e-5)
    # And the second segment alone, unpacked, gives its packed logits.
    alone = network(x[:, 5:9], ranks[:, 5:9])
    np.testing.assert_allclose(alone[0], base[0, 5:9], atol=1e-5, rtol=1e-5)


def test_predict_batch_gives_a_token_per_position():
    model, network, x = PermutationLMModel(TINY), xlnet(), tokens()
    batch = {"decoder_input_tokens": x, "decoder_factorization_rank": random_ranks(), "decoder_target_tokens": x}
    features = model.predict_features({k: np.asarray(v) for k, v in batch.items()})
    assert set(features) == {"decoder_input_tokens", "decoder_factorization_rank"}
    predicted = model.predict_batch(network, features, max_decode_length=0)
    np.testing.assert_array_equal(predicted, jnp.argmax(network(x, batch["decoder_factorization_rank"]), axis=-1))


def test_learns_from_what_it_may_see_and_nothing_more():
    """On "twin" sequences (a a b b c c ..., 8 ids drawn uniformly from 37, 16 tokens, the last 4 of each order
    predicted), a token is known exactly when its twin comes earlier in the order and is a uniform guess
    otherwise. The twin comes later with probability (3 + 2 + 1 + 0) / (4 * 15) = 0.1 at the predicted ranks, so
    the best expected loss is 0.1 * ln 37 = 0.361. Trained briefly, the loss falls far below ln 37 = 3.61 (the
    query stream reads the content stream), and stays above that floor: a model that saw its own token could
    reach 0. Bound: the mean of the last 50 steps' losses, 5 standard errors (0.014) below the floor."""
    import optax

    config = dataclasses.replace(TINY, vocab_size=40, d_model=64, head_dim=16, d_ff=128, max_position_embeddings=16)
    model = PermutationLMModel(config)
    network = model.build_network(nnx.Rngs(0))
    optimizer = nnx.Optimizer(network, optax.adam(3e-3), wrt=nnx.Param)
    rng = np.random.default_rng(0)

    @nnx.jit
    def step(network, optimizer, batch):
        (loss, _), grads = nnx.value_and_grad(lambda n: model.loss_fn(n, batch), has_aux=True)(network)
        optimizer.update(network, grads)
        return loss

    losses = []
    for _ in range(300):
        x = np.repeat(rng.integers(3, 40, (32, 8)), 2, axis=1)
        ranks = np.stack([rng.permutation(16) for _ in range(32)])
        batch = {"decoder_input_tokens": x, "decoder_target_tokens": x, "decoder_factorization_rank": ranks,
                 "decoder_loss_weights": (ranks >= 12).astype(np.int32)}
        losses.append(float(step(network, optimizer, jax.tree.map(jnp.asarray, batch))))
    final = np.mean(losses[-50:])
    assert losses[0] > 3.0 and 0.361 - 5 * 0.014 < final < 1.0, (losses[0], final)


# ------------------------------------------------------------------ through t5x_lite.train and its command line


def train_losses(model_dir) -> list[float]:
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


@pytest.mark.slow
def test_example_config_loss_falls_on_the_bundled_corpus(tmp_path):
    gin.clear_config()
    cli.parse_gin(["examples/xlnet_tiny_pretrain.gin"],
                  [f"MODEL_DIR = '{tmp_path / 'run'}'", "BATCH_SIZE = 8", "TRAIN_STEPS = 30", "train.log_period = 10",
                   "train.eval_period = 0", "train.checkpoint_period = 1000", "train.progress_bar = False",
                   "TASK_FEATURE_LENGTHS = {'targets': 64}"])
    cli.require_macros()
    try:
        train_lib.train()
    finally:
        gin.clear_config()
    losses = train_losses(tmp_path / "run")
    print("xlnet", [f"{x:.3f}" for x in losses])
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5


@pytest.mark.slow
def test_cli_errors_of_the_permutation_lm(tmp_path):
    """A K below 1, and the permutation-LM model on a task without an order: one line each, exit 2, and no run
    folder left behind."""
    common = ["--gin_file=gin_configs/examples/xlnet_tiny_pretrain.gin", "--gin.TRAIN_STEPS=1"]
    cases = {
        "k": (["--gin.permute_factorization_order.partial_prediction_k=0.5"],
              ("error: permutation LM: partial_prediction_k=0.5 must be >= 1 (the predicted share is 1/K of the "
              "tokens; XLNet uses 6).")),
        "task": (["--gin.MIXTURE_OR_TASK_NAME='bundled_lm'"],
                 ("error: PermutationLMFeatureConverter needs the features ['factorization_rank', 'predicted'] of a "
                 "permutation-LM task (preprocessors.permutation_lm, e.g. bundled_permutation_lm).")),
    }
    for name, (bindings, message) in cases.items():
        model_dir = tmp_path / name
        result = run_cli(*common, f"--gin.MODEL_DIR='{model_dir}'", *bindings)
        assert result.returncode == 2, result.stderr[-3000:]
        assert result.stderr.strip().splitlines()[-1] == message
        assert "Traceback" not in result.stderr
        assert not model_dir.exists()
