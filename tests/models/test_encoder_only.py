"""BERT (encoder-only): parity with Hugging Face `transformers` (PyTorch), the MLM loss, packing,
the classification/tagging models, parameter counts, frozen features, and short training runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_lite import features
from t5x_lite.hf import bert as hf_bert
from t5x_lite.models.encoder import EncoderClassificationModel, EncoderOnlyMLMModel, EncoderTaggingModel
from t5x_lite.networks.bert import Bert, BertConfig
from t5x_lite.networks.t5 import T5, T5Config
from t5x_lite.nn import stacks

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)

TINY = BertConfig(vocab_size=120, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_layers=2,
                     max_position_embeddings=40, num_labels=3)


def hf_config(**overrides) -> transformers.BertConfig:
    fields = {"vocab_size": 120, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                  "max_position_embeddings": 40, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "num_labels": 3}
    return transformers.BertConfig(**{**fields, **overrides})


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """HF initialises biases and layer-norm shifts to 0 and scales to 1; perturb every parameter so
    the parity check sees each of them."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def random_network(make, seed: int = 0) -> nnx.Module:
    """`make()`'s network with random normal parameters, without running its initialisers (fast)."""
    network = nnx.eval_shape(make)
    rng = np.random.default_rng(seed)
    shapes = nnx.to_pure_dict(nnx.state(network, nnx.Param))
    nnx.update(network, jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32), shapes))
    return network


def ours_from(hf: torch.nn.Module, head: str, **overrides) -> Bert:
    weights = {name: value.detach().numpy() for name, value in hf.state_dict().items()}
    config = dataclasses.replace(hf_bert.config_from_hf(hf.config.to_dict(), weights), **overrides)
    network = nnx.eval_shape(lambda: Bert(config, head, rngs=nnx.Rngs(1)))
    params = hf_bert.params_from_hf(weights, hf.config.to_dict(), config)
    nnx.update(network, stacks.stack_layer_params(params) if config.scan_layers else params)
    return network


TOKENS = np.array([[5, 6, 7, 8, 9, 10, 0, 0], [11, 12, 13, 14, 15, 16, 17, 18], [3, 4, 0, 0, 0, 0, 0, 0]])
TYPES = np.array([[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]])


def hf_inputs() -> dict:
    return {"input_ids": torch.tensor(TOKENS), "attention_mask": torch.tensor(TOKENS > 0),
                "token_type_ids": torch.tensor(TYPES)}


def test_masked_lm_logits_match_hugging_face_with_padding():
    hf = randomised(transformers.BertForMaskedLM(hf_config()))
    with torch.no_grad():
        expected = hf(**hf_inputs()).logits.numpy()
    real = TOKENS > 0
    for impl in ("einsum", "xla"):  # our attention, and jax.nn.dot_product_attention's
        ours = ours_from(hf, "mlm", attention_impl=impl)
        got = np.asarray(ours(jnp.asarray(TOKENS), token_type_ids=jnp.asarray(TYPES)))
        np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=0)


def test_pretraining_heads_match_hugging_face():
    hf = randomised(transformers.BertForPreTraining(hf_config()))
    ours = ours_from(hf, "mlm", next_sentence_prediction=True)
    with torch.no_grad():
        out = hf(**hf_inputs())
    hidden = ours.encode(jnp.asarray(TOKENS), token_type_ids=jnp.asarray(TYPES))
    np.testing.assert_allclose(np.asarray(ours.nsp_logits(hidden)), out.seq_relationship_logits.numpy(), atol=1e-4)
    real = TOKENS > 0
    np.testing.assert_allclose(np.asarray(ours.mlm_logits(hidden))[real], out.prediction_logits.numpy()[real], atol=1e-4)


def test_classification_and_tagging_logits_match_hugging_face():
    hf_cls = randomised(transformers.BertForSequenceClassification(hf_config()))
    hf_tag = randomised(transformers.BertForTokenClassification(hf_config()))
    with torch.no_grad():
        expected_cls = hf_cls(**hf_inputs()).logits.numpy()
        expected_tag = hf_tag(**hf_inputs()).logits.numpy()
    got_cls = ours_from(hf_cls, "classification")(jnp.asarray(TOKENS), token_type_ids=jnp.asarray(TYPES))
    got_tag = ours_from(hf_tag, "tagging")(jnp.asarray(TOKENS), token_type_ids=jnp.asarray(TYPES))
    np.testing.assert_allclose(np.asarray(got_cls), expected_cls, atol=1e-4, rtol=0)
    real = TOKENS > 0
    np.testing.assert_allclose(np.asarray(got_tag)[real], expected_tag[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_frozen_features_equal_hugging_face_hidden_states(scan_layers):
    hf = randomised(transformers.BertModel(hf_config(), add_pooling_layer=False))  # the "none" network has none
    ours = ours_from(hf, "none", scan_layers=scan_layers)
    with torch.no_grad():
        expected = hf(**hf_inputs(), output_hidden_states=True).hidden_states
    got = features.extract_features(ours, jnp.asarray(TOKENS), [0, 1, -1], token_type_ids=jnp.asarray(TYPES))
    assert sorted(got) == [0, 1, 2]
    real = TOKENS > 0
    for layer, states in got.items():
        assert states.shape == (3, 8, 32)
        np.testing.assert_allclose(np.asarray(states)[real], expected[layer].numpy()[real], atol=1e-4)
    last = ours.encode(jnp.asarray(TOKENS), token_type_ids=jnp.asarray(TYPES))
    # Unscanned, the same ops; scanned, `encode` runs a lax.scan while the features run layer by layer.
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(last), atol=1e-5 if scan_layers else 0, rtol=0)
    with pytest.raises(ValueError, match="layers 0 \\(embeddings\\) to 2"):
        features.extract_features(ours, jnp.asarray(TOKENS), [3])


def test_frozen_features_of_the_t5_encoder():
    config = T5Config(vocab_size=64, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=2,
                      num_decoder_layers=1)
    network = random_network(lambda: T5(config, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]])
    got = features.extract_features(network, tokens, [0, 1, -1])
    assert [v.shape for v in got.values()] == [(2, 5, 16)] * 3
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(network.token_embedder(tokens)))
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(network.encode(tokens)), atol=1e-6)
    assert not np.allclose(np.asarray(got[1]), np.asarray(got[0]))
    # The scanned layout (stacked layer params) gives the same states.
    scanned = nnx.eval_shape(lambda: T5(dataclasses.replace(config, scan_layers=True), rngs=nnx.Rngs(0)))
    nnx.update(scanned, stacks.stack_layer_params(nnx.to_pure_dict(nnx.state(network, nnx.Param))))
    for layer, states in features.extract_features(scanned, tokens, [0, 1, 2]).items():
        np.testing.assert_allclose(np.asarray(states), np.asarray(got[layer]), atol=1e-5)


def mlm_batch(rng: np.random.Generator, batch: int = 4, length: int = 16) -> dict[str, jnp.ndarray]:
    tokens = rng.integers(3, TINY.vocab_size, (batch, length))
    chosen = rng.random((batch, length)) < 0.15
    chosen[:, 1] = True
    return {
        "encoder_input_tokens": jnp.asarray(np.where(chosen, TINY.vocab_size - 1, tokens)),
        "encoder_target_tokens": jnp.asarray(np.where(chosen, tokens, 0)),
        "encoder_loss_weights": jnp.asarray(chosen.astype(np.int32)),
    }


def test_mlm_loss_ignores_unchosen_positions_and_the_gathered_loss_is_exact():
    model = EncoderOnlyMLMModel(TINY)
    network = random_network(lambda: model.build_network(nnx.Rngs(0)))
    batch = mlm_batch(np.random.default_rng(0))
    loss_of = nnx.jit(lambda network, batch: model.loss_fn(network, batch))
    loss, sums = loss_of(network, batch)
    # Other targets where the weight is 0 change nothing...
    noisy = dict(batch, encoder_target_tokens=jnp.where(batch["encoder_loss_weights"] > 0, batch["encoder_target_tokens"], 7))
    np.testing.assert_allclose(float(loss_of(network, noisy)[0]), float(loss), rtol=1e-6)
    # ... while a chosen position's target does.
    changed = dict(batch, encoder_target_tokens=batch["encoder_target_tokens"].at[0, 1].set(9))
    assert abs(float(loss_of(network, changed)[0]) - float(loss)) > 1e-4
    assert float(sums["weight_sum"]) == float(np.sum(batch["encoder_loss_weights"]))
    # The loss from every position's logits equals the default budget's (the chosen ones fit) and a
    # budget they overflow.
    logits = network(batch["encoder_input_tokens"])
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["encoder_target_tokens"][..., None], -1)[..., 0]
    expected = -jnp.sum(picked * batch["encoder_loss_weights"]) / jnp.sum(batch["encoder_loss_weights"])
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    assert int(np.sum(batch["encoder_loss_weights"])) > 0.05 * batch["encoder_loss_weights"].size
    overflowing = EncoderOnlyMLMModel(TINY, max_prediction_fraction=0.05)
    np.testing.assert_allclose(float(overflowing.loss_fn(network, batch)[0]), float(expected), rtol=1e-5)


def test_bf16_training_step_with_dropout_executes():
    config = BertConfig(**{**TINY.__dict__, "dtype": "bfloat16", "dropout_rate": 0.1, "remat_policy": "full"})
    model = EncoderOnlyMLMModel(config)
    network = random_network(lambda: model.build_network(nnx.Rngs(0)))
    batch = mlm_batch(np.random.default_rng(2))

    @nnx.jit
    def loss_and_grads(network, batch):
        return nnx.value_and_grad(lambda n: model.loss_fn(n, batch, nnx.Rngs(dropout=0))[0])(network)

    loss, grads = loss_and_grads(network, batch)
    assert np.isfinite(float(loss))
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in leaves)
    assert float(jnp.abs(grads.layers[0].attention.query.kernel[...]).sum()) > 0


def test_nsp_adds_its_mean_loss_and_needs_the_head():
    config = BertConfig(**{**TINY.__dict__, "next_sentence_prediction": True})
    model = EncoderOnlyMLMModel(config)
    network = random_network(lambda: model.build_network(nnx.Rngs(0)))
    batch = mlm_batch(np.random.default_rng(1))
    labels = jnp.asarray([1, 0, 1, 1])
    mlm_only = float(model.loss_fn(network, batch)[0])
    with_nsp = float(model.loss_fn(network, dict(batch, next_sentence_labels=labels))[0])
    hidden = network.encode(batch["encoder_input_tokens"])
    nsp = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(network.nsp_logits(hidden)), (1 - labels)[:, None], -1))
    np.testing.assert_allclose(with_nsp, mlm_only + float(nsp), rtol=1e-5)
    plain = EncoderOnlyMLMModel(TINY)
    with pytest.raises(ValueError, match="next_sentence_prediction = True"):
        plain.loss_fn(random_network(lambda: plain.build_network(nnx.Rngs(0))), dict(batch, next_sentence_labels=labels))


def test_packed_segments_do_not_see_each_other():
    network = random_network(lambda: Bert(TINY, "mlm", rngs=nnx.Rngs(0)))
    run = nnx.jit(lambda network, tokens, segments, positions: network(tokens, segments, positions))
    a, b = [5, 6, 7, 8, 9], [10, 11, 12]
    packed = jnp.asarray([a + b + [0, 0]])
    segments = jnp.asarray([[1] * 5 + [2] * 3 + [0, 0]])
    positions = jnp.asarray([list(range(5)) + list(range(3)) + [0, 0]])
    out = np.asarray(run(network, packed, segments, positions))

    def alone(ids):  # one example in a padded row of the same length
        pad = [0] * (10 - len(ids))
        row = np.asarray(run(network, jnp.asarray([ids + pad]), jnp.asarray([[1] * len(ids) + pad]),
                             jnp.asarray([list(range(len(ids))) + pad])))
        return row[0, : len(ids)]

    np.testing.assert_allclose(out[0, :5], alone(a), atol=1e-5)
    np.testing.assert_allclose(out[0, 5:8], alone(b), atol=1e-5)
    # Without segment ids the same packed row mixes the two examples.
    assert not np.allclose(np.asarray(network(packed))[0, :5], out[0, :5], atol=1e-3)


def test_classification_and_tagging_models():
    cls_model = EncoderClassificationModel(TINY)
    network = random_network(lambda: cls_model.build_network(nnx.Rngs(0)))
    tokens = jnp.asarray(TOKENS)
    batch = {"encoder_input_tokens": tokens, "encoder_token_type_ids": jnp.asarray(TYPES),
             "labels": jnp.asarray([[2], [0], [1]])}
    loss, sums = cls_model.loss_fn(network, batch)
    log_probs = jax.nn.log_softmax(network(tokens, token_type_ids=batch["encoder_token_type_ids"]))
    np.testing.assert_allclose(float(loss), float(-jnp.mean(log_probs[jnp.arange(3), jnp.asarray([2, 0, 1])])), rtol=1e-5)
    assert float(sums["weight_sum"]) == 3.0
    predicted = cls_model.predict_batch(network, batch, max_decode_length=1)
    assert predicted.shape == (3, 1) and predicted.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(predicted[:, 0]), np.argmax(np.asarray(log_probs), -1))
    np.testing.assert_allclose(np.asarray(cls_model.score_batch(network, batch)),
                               np.asarray(log_probs[jnp.arange(3), jnp.asarray([2, 0, 1])]), rtol=1e-5)
    # An all-padding row (the evaluator pads its last batch) has no weight.
    padded = {k: jnp.concatenate([v, jnp.zeros_like(v[:1])]) for k, v in batch.items()}
    np.testing.assert_allclose(float(cls_model.loss_fn(network, padded)[0]), float(loss), rtol=1e-5)

    tag_model = EncoderTaggingModel(TINY)
    tagger = random_network(lambda: tag_model.build_network(nnx.Rngs(0)))
    tags = jnp.asarray(np.where(TOKENS > 0, (TOKENS % 3) + 1, 0)).at[:, 0].set(0)
    tag_batch = {"encoder_input_tokens": tokens, "encoder_target_tokens": tags,
                 "encoder_loss_weights": (tags > 0).astype(jnp.int32)}
    loss, sums = tag_model.loss_fn(tagger, tag_batch)
    log_probs = jax.nn.log_softmax(tagger(tokens))
    gold = jnp.take_along_axis(log_probs, jnp.maximum(tags - 1, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), float(-jnp.sum(gold * (tags > 0)) / jnp.sum(tags > 0)), rtol=1e-5)
    predicted = np.asarray(tag_model.predict_batch(tagger, tag_batch, max_decode_length=8))
    assert predicted.shape == (3, 8) and predicted.min() >= 1 and predicted.max() <= TINY.num_labels


@gin.configurable
def _configured(model=gin.REQUIRED):
    return model


def test_bert_base_and_large_parameter_counts():
    """Encoder + pooler as Hugging Face's BertModel: bert-base-uncased 109,482,240; bert-large 335,141,888."""

    def count(gin_file: str) -> int:
        gin.clear_config()
        gin.parse_config_files_and_bindings(
            [str(Path(__file__).parents[2] / "gin_configs" / "models" / "bert" / gin_file)],
            ["DROPOUT_RATE = 0.0", "ACTIVATION_DTYPE = 'float32'", "KERNELS = 'auto'", "MODEL = @EncoderClassificationModel()",
             "_configured.model = %MODEL"],
        )
        try:
            model = _configured()
        finally:
            gin.clear_config()
        shapes = nnx.state(nnx.eval_shape(lambda: model.build_network(nnx.Rngs(0))), nnx.Param)
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))

    assert count("base.gin") - (768 * 2 + 2) == 109_482_240
    assert count("large.gin") - (1024 * 2 + 2) == 335_141_888


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="remat_policy='some'"):
        BertConfig(remat_policy="some")
    with pytest.raises(ValueError, match="Unknown BERT head 'qa'"):
        Bert(TINY, "qa", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exceeds the model's 40 learned positions"):
        random_network(lambda: Bert(TINY, "none", rngs=nnx.Rngs(0)))(jnp.ones((1, 41), jnp.int32))


# ------------------------------------------------------------------ training runs


def run_training(gin_file: str, model_dir: Path, *bindings: str) -> list[dict]:
    from t5x_lite import cli
    from t5x_lite import train as train_lib

    gin.clear_config()
    cli.parse_gin([str(cli.GIN_CONFIGS_DIR / gin_file)],
                     [*bindings, f"MODEL_DIR = '{model_dir}'", "train.progress_bar = False"])
    try:
        train_lib.train()
    finally:
        gin.clear_config()
    return [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_mlm_pretraining_loss_falls(tmp_path):
    records = run_training(
        "examples/bert_tiny_pretrain.gin", tmp_path,
        "TRAIN_STEPS = 30", "BATCH_SIZE = 8", "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 64}",
        "warmup_decay_schedule.warmup_steps = 5", "train.log_period = 5", "train.eval_period = 30",
        "train.eval_steps = 2", "train.checkpoint_period = 30",
    )
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses
    assert np.isfinite([r["eval/loss"] for r in records if "eval/loss" in r]).all()
    check_feature_cli(tmp_path)
    check_fine_tuning_starts_fresh_heads(tmp_path)


def check_fine_tuning_starts_fresh_heads(model_dir: Path) -> None:
    """A classifier initialised from the MLM checkpoint: the encoder restored, pooler/classifier fresh."""
    from t5x_lite import checkpoints

    config = BertConfig(vocab_size=8192, d_model=128, num_heads=4, head_dim=32, d_ff=512, num_layers=2)
    model = EncoderClassificationModel(config)
    fresh = nnx.to_pure_dict(nnx.state(model.build_network(nnx.Rngs(7)), nnx.Param))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh)
    restored = checkpoints.restore_params(str(model_dir), abstract, model, fresh=fresh)
    mlm = checkpoints.restore_params(str(model_dir), jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
        nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Bert(config, "mlm", rngs=nnx.Rngs(0))), nnx.Param))))
    np.testing.assert_array_equal(restored["layers"][1]["mlp"]["wi"]["kernel"], mlm["layers"][1]["mlp"]["wi"]["kernel"])
    assert not np.array_equal(restored["layers"][1]["mlp"]["wi"]["kernel"], fresh["layers"][1]["mlp"]["wi"]["kernel"])
    for head in ("pooler", "classifier"):
        np.testing.assert_array_equal(restored[head]["kernel"], fresh[head]["kernel"])
    with pytest.raises(ValueError, match="has no parameter classifier/"):  # only with fresh params
        checkpoints.restore_params(str(model_dir), abstract, model)


def check_feature_cli(model_dir: Path) -> None:
    """`save_features` (the CLI's function) on the trained checkpoint equals the network's hidden states."""
    from t5x_lite import checkpoints, cli, partitioning
    from t5x_lite.data import special_tokens, vocab

    lines = model_dir / "lines.txt"
    lines.write_text("To be, or not to be: that is the question.\nA horse!\tMy kingdom for a horse.\n")
    files = [str(cli.GIN_CONFIGS_DIR / "runs" / "features.gin"), str(cli.GIN_CONFIGS_DIR / "models/bert/tiny.gin")]
    common = [f"CHECKPOINT_PATH = '{model_dir}'", "SEQUENCE_LENGTH = 24", "_configured.model = %MODEL"]
    gin.clear_config()
    cli.parse_gin(files, [*common, f"FEATURES_INPUT_FILE = '{lines}'", "FEATURE_LAYERS = [0, -1]",
                             f"FEATURES_OUTPUT_FILE = '{model_dir / 'features.npz'}'"])
    try:
        arrays = features.save_features()
        mesh, rules = partitioning.make_mesh(), partitioning.logical_axis_rules()
        graphdef, params = checkpoints.load_checkpoint_params(_configured(), str(model_dir), mesh, rules)
    finally:
        gin.clear_config()
    saved = np.load(model_dir / "features.npz")
    assert sorted(saved) == ["layer_0", "layer_2", "mask", "tokens"]
    tokens = saved["tokens"]
    assert tokens.shape == (2, 24) and saved["layer_2"].shape == (2, 24, 128)
    sep = special_tokens.bert_special_ids(vocab.get_vocabulary()).sep
    assert (tokens == sep).sum(axis=1).tolist() == [1, 2]  # a TAB makes a sentence pair
    network = nnx.merge(graphdef, jax.device_get(params))
    states = network.encode(jnp.asarray(tokens), token_type_ids=jnp.asarray(features.bert_token_types(tokens, sep)),
                            return_hidden_states=True)[1]
    for layer in (0, 2):
        np.testing.assert_allclose(saved[f"layer_{layer}"], np.asarray(states[layer]), atol=1e-5)
        np.testing.assert_array_equal(arrays[f"layer_{layer}"], saved[f"layer_{layer}"])

    gin.clear_config()
    cli.parse_gin(files, [*common, "MIXTURE_OR_TASK_NAME = 'bundled_cls_single'", "save_features.max_examples = 3",
                             "save_features.pooling = 'mean'", f"FEATURES_OUTPUT_FILE = '{model_dir / 'pooled.npz'}'"])
    try:
        pooled = features.save_features()
    finally:
        gin.clear_config()
    assert pooled["layer_2"].shape == (3, 128) and pooled["tokens"].shape == (3, 24)


@pytest.mark.slow
def test_classification_fine_tune_beats_chance(tmp_path):
    # From the command line on one device, as a user runs it (in this process, 8 simulated devices on two
    # cores would take twice as long for the 120 steps).
    from t5x_lite.tasks import classification as ct
    from tests.test_cli import run_cli

    trained = run_cli(
        "--gin_file=examples/bert_tiny_classify.gin", f"--gin.MODEL_DIR='{tmp_path}'", "--gin.INITIAL_CHECKPOINT_PATH=None",
        "--gin.TRAIN_STEPS=120", "--gin.train.eval_period=120", "--gin.train.log_period=20",
        "--gin.train.checkpoint_period=120", "--gin.train.progress_bar=False",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "eval/bundled_cls_single/accuracy" in r][-1]
    # Balanced two-class validation set (333 + 333 excerpts of held-out text): chance is 50%.
    assert final["eval/bundled_cls_single/accuracy"] > 65.0, final
    assert final["eval/bundled_cls_single/macro_f1"] > 60.0, final

    out = tmp_path / "predictions.jsonl"
    inferred = run_cli(
        "--gin_file=runs/infer.gin", "--gin_file=models/bert/tiny.gin", "--gin.MODEL=@EncoderClassificationModel()",
        "--gin.BertConfig.num_labels=2", f"--gin.CHECKPOINT_PATH='{tmp_path}'",
        "--gin.MIXTURE_OR_TASK_NAME='bundled_cls_single'", "--gin.TASK_FEATURE_LENGTHS={'inputs': 96, 'targets': 1}",
        f"--gin.INFER_OUTPUT_FILE='{out}'", module="t5x_lite.infer",
    )
    assert inferred.returncode == 0, inferred.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 666
    assert {line["targets"] for line in lines} == set(ct.AUTHOR_LABELS)
    assert {line["prediction"] for line in lines} <= set(ct.AUTHOR_LABELS)
    assert all(line["score"] < 0 for line in lines)
    assert "[SEP]" not in lines[0]["inputs"] and "<extra_id" not in lines[0]["inputs"]
    # The written names are the predictions the evaluation scored (the last checkpoint is the last eval's).
    accuracy = 100 * np.mean([line["prediction"] == line["targets"] for line in lines])
    assert accuracy == pytest.approx(final["eval/bundled_cls_single/accuracy"]), final
