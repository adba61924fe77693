"""DeBERTa-v3 replaced-token detection: gradient-disentangled embedding sharing (which loss reaches which
table, by jax.grad), the sharing settings, a fine-tuning `Deberta` starting from the merged table E_G + E_delta,
HF export of the discriminator reloading in `transformers` (and its frozen features), and a bad setting reported in one line."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from t5x_lite import checkpoints, hf
from t5x_lite.features import extract_features
from t5x_lite.models.electra import DebertaRtdModel
from t5x_lite.models.encoder import EncoderClassificationModel
from t5x_lite.networks.deberta_rtd import DebertaRtdConfig
from tests.test_cli import run_cli

CONFIG = DebertaRtdConfig(vocab_size=40, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_layers=1,
                          max_position_embeddings=24, position_buckets=8)  # one layer each: quick to compile
INPUTS = np.array([[2, 5, 30, 7, 8, 30, 3, 0], [2, 11, 12, 30, 14, 15, 16, 3]], np.int32)  # 30 plays [MASK]
TARGETS = np.array([[0, 0, 6, 0, 0, 9, 0, 0], [0, 0, 0, 13, 0, 0, 0, 0]], np.int32)
BATCH = {"encoder_input_tokens": jnp.asarray(INPUTS), "encoder_target_tokens": jnp.asarray(TARGETS),
         "encoder_loss_weights": jnp.asarray((TARGETS > 0).astype(np.int32))}
WORD = ("embeddings", "word_embeddings", "embedding")
DELTA = ("embeddings", "word_embeddings", "delta", "embedding")
GENERATOR_WORD = ("generator", *WORD)


def get(tree: dict, path: tuple) -> np.ndarray | None:
    for key in path:
        if key not in tree:
            return None
        tree = tree[key]
    return np.asarray(tree)


def network(sharing: str = "gdes", seed: int = 0):
    config = DebertaRtdConfig(**{**CONFIG.__dict__, "embedding_sharing": sharing})
    return config, DebertaRtdModel(config).build_network(nnx.Rngs(seed))


def with_random_delta(net) -> None:
    """Makes E_delta nonzero, as after training, so that a merge that forgets it shows."""
    delta = net.embeddings.word_embeddings.delta.embedding
    delta[...] = jax.random.normal(jax.random.key(5), delta.shape) * 0.1


def gradients(net) -> tuple[dict, dict]:
    """jax.grad of the MLM loss and of the replaced-token loss (one batch, one sampling key) for every parameter."""
    model = DebertaRtdModel(CONFIG, max_prediction_fraction=1.0)  # one path of the generator's logits to compile
    graphdef, params = nnx.split(net, nnx.Param)

    def losses(params):
        sums = model.loss_fn(nnx.merge(graphdef, params), BATCH, nnx.Rngs(dropout=jax.random.key(3)))[1]
        return jnp.stack([sums["generator_loss_sum"], sums["discriminator_loss_sum"]])

    both = nnx.to_pure_dict(jax.jit(jax.jacrev(losses))(params))
    return jax.tree.map(lambda g: g[0], both), jax.tree.map(lambda g: g[1], both)


def test_gdes_each_loss_reaches_only_its_table():
    _, net = network("gdes")
    params = nnx.to_pure_dict(nnx.state(net, nnx.Param))
    assert get(params, GENERATOR_WORD) is None  # E_G is one parameter, stored under the discriminator's name
    assert not np.any(get(params, DELTA))  # E_delta starts at zeros
    assert dataclasses.replace(CONFIG, num_layers=4).generator_config().num_layers == 2  # half the layers
    mlm, rtd = gradients(net)
    assert not np.any(get(mlm, DELTA)) and np.any(get(mlm, WORD))
    assert not np.any(get(rtd, WORD)) and np.any(get(rtd, DELTA))
    assert not np.any(rtd["generator"]["layers"][0]["mlp"]["wi"]["kernel"])
    assert not np.any(mlm["layers"][0]["mlp"]["wi"]["kernel"])


@pytest.mark.parametrize("sharing", ["es", "nes"])
def test_plain_sharing_and_no_sharing(sharing):
    _, net = network(sharing)
    params = nnx.to_pure_dict(nnx.state(net, nnx.Param))
    assert get(params, DELTA) is None
    shared = net.embeddings.word_embeddings is net.generator.embeddings.word_embeddings
    assert shared == (sharing == "es")  # es: one table that both losses update; nes: a table each
    assert (get(params, GENERATOR_WORD) is None) == (sharing == "es")


def test_the_generator_reads_its_enhanced_mask_decoder():
    config = DebertaRtdConfig(**{**CONFIG.__dict__, "enhanced_mask_decoder": True})
    net = DebertaRtdModel(config).build_network(nnx.Rngs(0))
    assert net.emd_positions is None and net.generator.emd_positions is not None  # the MLM side only
    tokens = jnp.asarray(INPUTS)
    np.testing.assert_array_equal(net.generator_hidden(tokens), net.generator.mlm_states(tokens))
    assert not np.allclose(net.generator_hidden(tokens), net.generator.encode(tokens))


def save_params(params: dict, model_dir) -> None:
    with ocp.CheckpointManager(model_dir / "checkpoints", item_names=("state",)) as manager:
        manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))
        manager.wait_until_finished()


def abstract(tree: dict) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_fine_tuning_starts_from_the_merged_table(tmp_path):
    config, net = network("gdes")
    with_random_delta(net)
    saved = nnx.to_pure_dict(nnx.state(net, nnx.Param))
    save_params(saved, tmp_path)

    classifier = EncoderClassificationModel(config.discriminator_config())
    fresh = nnx.to_pure_dict(nnx.state(classifier.build_network(nnx.Rngs(7)), nnx.Param))
    restored = checkpoints.restore_params(str(tmp_path), abstract(fresh), classifier, fresh=fresh)
    np.testing.assert_array_equal(get(restored, WORD), get(saved, WORD) + get(saved, DELTA))
    assert get(restored, DELTA) is None
    np.testing.assert_array_equal(restored["layers"][0]["mlp"]["wi"]["kernel"], saved["layers"][0]["mlp"]["wi"]["kernel"])
    np.testing.assert_array_equal(restored["classifier"]["kernel"], fresh["classifier"]["kernel"])
    # The pre-training model itself (resuming, or as INITIAL_CHECKPOINT_PATH) keeps the two apart.
    again = checkpoints.restore_params(str(tmp_path), abstract(saved), DebertaRtdModel(config))
    np.testing.assert_array_equal(get(again, WORD), get(saved, WORD))
    np.testing.assert_array_equal(get(again, DELTA), get(saved, DELTA))


def test_exported_discriminator_reloads_in_transformers_with_the_same_hidden_states(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, net = network("gdes")
    with_random_delta(net)
    hf.write_pretrained(nnx.to_pure_dict(nnx.state(net, nnx.Param)), config, tmp_path / "exported")
    tokens = np.array([[2, 5, 17, 7, 8, 30, 3, 0, 0], [2, 11, 12, 30, 14, 15, 16, 21, 3]], np.int32)
    ours = np.asarray(net.encode(jnp.asarray(tokens)))
    ids, mask = torch.tensor(tokens, dtype=torch.long), torch.tensor(tokens > 0)
    # DebertaV2ForSequenceClassification (a fresh classifier) over the exported DebertaV2Model.
    model = transformers.DebertaV2ForSequenceClassification.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        theirs = model.deberta(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    real = tokens > 0
    np.testing.assert_allclose(theirs[real], ours[real], atol=1e-4)
    features = extract_features(net, jnp.asarray(tokens), layers=(-1,))  # the RTD network is a Deberta there
    np.testing.assert_allclose(np.asarray(features[CONFIG.num_layers])[real], theirs[real], atol=1e-4)


@pytest.mark.slow
def test_a_bad_sharing_setting_is_one_error_line(tmp_path):
    model_dir = tmp_path / "run"
    result = run_cli("--gin_file=gin_configs/examples/deberta_v3_tiny_rtd.gin", f"--gin.MODEL_DIR='{model_dir}'",
                     "--gin.DebertaRtdConfig.embedding_sharing='gdse'")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: DebertaRtdConfig.embedding_sharing='gdse' is not one of ['gdes', 'es', 'nes'].")
    assert "Traceback" not in result.stderr
    assert not (model_dir / "checkpoints").exists()

