"""Prompt tuning (t5x_lite/adapters/prompt.py): the soft prompt prepended to the encoder's or a decoder-only
model's inputs with the masks extended, its initialisations, only it trains, decoding with it, the example
gin file, and a prompt longer than the learned positions as one error line."""

from __future__ import annotations

import json

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from t5x_lite import adapters, checkpoints, cli, decoding, partitioning
from t5x_lite import train as train_lib
from t5x_lite.adapters import prompt
from t5x_lite.data import vocab
from t5x_lite.models.causal import DecoderOnlyModel, PrefixLMModel
from t5x_lite.models.seq2seq import BartModel, EncoderDecoderModel
from t5x_lite.networks.bart import BartConfig
from t5x_lite.networks.gpt import GPTConfig
from t5x_lite.networks.t5 import T5Config
from t5x_lite.training import freezing, optimizers, steps, train_state
from tests.test_cli import run_cli

SIZES = {"vocab_size": 64, "d_model": 16, "num_heads": 2, "head_dim": 8, "d_ff": 32}
T5_CONFIG = T5Config(**SIZES, num_encoder_layers=1, num_decoder_layers=1)
PROMPT = prompt.PromptConfig(length=3, sample_size=40, seed=1)
RNG = np.random.default_rng(0)
# Two rows of inputs, the second padded: the prompt goes before the tokens, the padding stays after them.
INPUTS = np.array([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0]], np.int32)
TARGETS = np.array([[11, 12, 1], [13, 1, 0]], np.int32)


def prompted_and_plain(model, seed: int = 0) -> tuple[nnx.Module, nnx.Module]:
    """The model's network with PROMPT attached, and the same network (same parameters) without."""
    network = model.build_network(nnx.Rngs(seed))
    prompt.apply_prompt(network, PROMPT)
    return network, model.build_network(nnx.Rngs(seed))


def enc_dec_batch() -> dict[str, jax.Array]:
    return {
        "encoder_input_tokens": jnp.asarray(INPUTS),
        "decoder_input_tokens": jnp.asarray(np.pad(TARGETS[:, :-1], ((0, 0), (1, 0)))),
        "decoder_target_tokens": jnp.asarray(TARGETS),
        "decoder_loss_weights": jnp.asarray(TARGETS > 0, jnp.float32),
    }


def init_ids(network: nnx.Module) -> jax.Array:
    """[2, length] the vocabulary ids whose embeddings the fresh prompt equals (init 'vocab', one id per vector)."""
    ids = np.asarray(prompt.soft_prompt(network).init_ids)[:, 0]
    return jnp.broadcast_to(jnp.asarray(ids, jnp.int32), (2, PROMPT.length))


@pytest.mark.parametrize("model", [EncoderDecoderModel(T5_CONFIG), BartModel(BartConfig(
    **SIZES, num_encoder_layers=1, num_decoder_layers=1, max_position_embeddings=16))], ids=["t5", "bart"])
def test_the_prompt_is_prepended_to_the_encoder_inputs(model):
    network, plain = prompted_and_plain(model)
    assert adapters.adapter_paths(network) == {"token_embedder/prompt"}
    assert network.token_embedder.prompt.shape == (PROMPT.length, SIZES["d_model"])
    batch = enc_dec_batch()
    prompted = prompt.prompted_encoder_batch(network, batch)["encoder_input_tokens"]
    assert prompted.shape == (2, PROMPT.length + INPUTS.shape[1])
    assert network.encode(prompted).shape == (2, PROMPT.length + INPUTS.shape[1], SIZES["d_model"])
    # A fresh prompt is the embeddings of its sampled ids: the same logits as those ids written before the
    # inputs, so the masks (padding after the tokens, cross-attention) and positions are the extended ones.
    expected = plain(jnp.concatenate([init_ids(network), batch["encoder_input_tokens"]], 1),
                     batch["decoder_input_tokens"])
    np.testing.assert_allclose(model.network_logits(network, batch, None), expected, atol=1e-5)
    assert not np.allclose(model.network_logits(plain, batch, None), expected, atol=1e-3)


@pytest.mark.parametrize("model_cls", [DecoderOnlyModel, PrefixLMModel])
def test_the_prompt_is_prepended_to_a_decoder_only_row(model_cls):
    model = model_cls(GPTConfig(**SIZES, num_layers=2, max_position_embeddings=16))
    network, plain = prompted_and_plain(model)
    row = np.array([[0, 5, 6, 7, 20, 21], [0, 9, 10, 22, 0, 0]], np.int32)  # BOS, inputs, targets
    causal = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], np.int32)
    batch = {"decoder_input_tokens": jnp.asarray(row), "decoder_causal_attention": jnp.asarray(causal)}
    logits = model.network_logits(network, batch, None)
    assert logits.shape == (2, row.shape[1], SIZES["vocab_size"])  # aligned with the unchanged targets
    ones = jnp.ones((2, PROMPT.length), jnp.int32)
    expected = plain(jnp.concatenate([init_ids(network), batch["decoder_input_tokens"]], 1),
                     decoder_causal_attention=jnp.concatenate([ones, batch["decoder_causal_attention"]], 1)
                     if model.bidirectional_inputs else None)[:, PROMPT.length:]
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_label_init_is_the_labels_averaged_embeddings():
    bundled = vocab.get_vocabulary()
    labels = ["yes", "no", "Prospero"]
    config = prompt.PromptConfig(length=5, init="labels", labels=labels, vocabulary=bundled)
    network = EncoderDecoderModel(T5Config(**{**SIZES, "vocab_size": bundled.vocab_size}, num_encoder_layers=1,
                                           num_decoder_layers=1)).build_network(nnx.Rngs(0))
    prompt.apply_prompt(network, config)
    table = network.token_embedder.embedding[...]
    label_vectors = [table[np.asarray(bundled.encode(label))].mean(0) for label in labels]
    assert len(bundled.encode("Prospero")) > 1  # a label of several pieces is averaged
    expected = jnp.stack([label_vectors[i % len(labels)] for i in range(5)])  # cycled to fill the length
    np.testing.assert_allclose(network.token_embedder.prompt_vectors(), expected, atol=1e-6)


def test_bad_prompt_configs_are_clear_errors():
    with pytest.raises(ValueError, match="length must be a whole number >= 1"):
        prompt.PromptConfig(length=0)
    with pytest.raises(ValueError, match="init must be one of"):
        prompt.PromptConfig(init="random")
    with pytest.raises(ValueError, match="needs PromptConfig.labels"):
        prompt.PromptConfig(init="labels", labels=["yes"])
    with pytest.raises(ValueError, match="supports the T5, BART and GPT networks"):
        from t5x_lite.networks.bert import Bert, BertConfig

        prompt.apply_prompt(Bert(BertConfig(**SIZES, num_layers=1, max_position_embeddings=8), rngs=nnx.Rngs(0)),
                            PROMPT)


@pytest.fixture
def prompt_bound():
    """`add_adapters.prompt` bound as prompt_tuning_qa.gin binds it."""
    gin.clear_config()
    gin.bind_parameter("add_adapters.prompt", PROMPT)
    yield
    gin.clear_config()


def test_only_the_prompt_trains(prompt_bound):
    model = EncoderDecoderModel(T5_CONFIG)
    schedule = optimizers.constant_schedule(0.3)
    paths = adapters.adapter_paths(train_state.network_graphdef(model)[1])
    assert paths == {"token_embedder/prompt"}
    tx = freezing.train_only(optimizers.adafactor(schedule, multiply_by_parameter_scale=False), paths)
    mesh = partitioning.make_mesh({"data": 2, "fsdp": 4})
    rules = partitioning.logical_axis_rules()
    state, shardings, graphdef = train_state.create_train_state(model, tx, 0, mesh, rules)
    before = jax.device_get(state.params)
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    step = steps.make_train_step(model, graphdef, tx, schedule, shardings, batch_sharding)
    batch = {k: np.tile(np.asarray(v), (4, 1)) for k, v in enc_dec_batch().items()}
    losses = []
    for _ in range(3):
        state, metrics = step(state, partitioning.host_batch_to_global(batch, batch_sharding))
        losses.append(float(metrics["loss"]))
    after = jax.device_get(state.params)
    names = freezing.param_paths(before)
    changed = {n for n, a, b in zip(names, jax.tree.leaves(before), jax.tree.leaves(after)) if not np.array_equal(a, b)}
    assert changed == paths  # every base parameter is bit-identical
    assert losses[-1] < losses[0]
    prompt_bytes = PROMPT.length * SIZES["d_model"] * 4
    assert sum(x.nbytes for x in jax.tree.leaves(state.opt_state)) < 2 * prompt_bytes + 64  # the prompt's only
    assert set(freezing.param_paths(checkpoints.checkpointed(state, paths).params)) == paths


def trained_prompt(network: nnx.Module) -> None:
    """A nonzero offset, as after training."""
    embedder = prompt.soft_prompt(network)
    embedder.prompt[...] = jax.random.normal(jax.random.key(3), embedder.prompt.shape)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_decoding_with_a_prompt_matches_the_full_forward_argmax(method):
    model = EncoderDecoderModel(T5_CONFIG)
    network, _ = prompted_and_plain(model)
    trained_prompt(network)
    config = decoding.DecodeConfig(method=method, beam_size=1, eos_id=-1)  # beam of 1 is greedy; no early stop
    tokens = model.predict_batch(network, {"encoder_input_tokens": jnp.asarray(INPUTS)}, max_decode_length=5,
                                 decode=config)
    logits = model.network_logits(network, {"encoder_input_tokens": jnp.asarray(INPUTS),
                                            "decoder_input_tokens": jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))}, None)
    np.testing.assert_array_equal(tokens, jnp.argmax(logits, -1))


@pytest.mark.parametrize("model_cls", [DecoderOnlyModel, PrefixLMModel])
def test_decoder_only_decoding_with_a_prompt_matches_the_full_forward_argmax(model_cls):
    model = model_cls(GPTConfig(**SIZES, num_layers=2, max_position_embeddings=24))
    network, _ = prompted_and_plain(model)
    trained_prompt(network)
    inputs = np.array([[0, 5, 6, 7], [0, 9, 10, 0]], np.int32)  # BOS + inputs, the second row shorter
    causal = (np.arange(4)[None] < np.array([[4], [3]])).astype(np.int32)
    tokens = model.predict_batch(network, {"decoder_input_tokens": jnp.asarray(inputs),
                                           "decoder_causal_attention": jnp.asarray(causal)},
                                 max_decode_length=4, decode=decoding.DecodeConfig(eos_id=-1))
    # Both rows teacher-forced in one pass: each row's prompt, then its generated tokens, then padding.
    full = np.zeros((2, 7), np.int32)
    for row, length in enumerate([4, 3]):
        full[row, :length + 3] = np.concatenate([inputs[row, :length], np.asarray(tokens[row, :-1])])
    logits = model.network_logits(network, {"decoder_input_tokens": jnp.asarray(full), "decoder_causal_attention":
                                            jnp.asarray(np.pad(causal, ((0, 0), (0, 3))))}, None)
    for row, length in enumerate([4, 3]):
        np.testing.assert_array_equal(tokens[row], jnp.argmax(logits[row, length - 1:length + 3], -1))


@pytest.mark.slow
def test_the_example_gin_trains_the_prompt_only(tmp_path):
    model_dir = tmp_path / "prompt"
    gin.clear_config()
    try:
        files = ["examples/prompt_tuning_qa.gin"]
        bindings = [f"MODEL_DIR = '{model_dir}'", "INITIAL_CHECKPOINT_PATH = None", "TRAIN_STEPS = 2",
                    "BATCH_SIZE = 8", "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 8}", "train.eval_period = 2",
                    "train.eval_steps = 1", "make_evaluator.num_examples = 8", "train.checkpoint_period = 2",
                    "train.best_metric = None", "train.progress_bar = False", "PromptConfig.length = 4"]
        cli.parse_gin(files, bindings)
        cli.check_config(files, bindings)
        train_lib.train()
    finally:
        gin.clear_config()
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/bundled_qa_extractive/f1" in r for r in records)  # decoded with the prompt
    saved = ocp.StandardCheckpointHandler().metadata(checkpoints.find_state_dir(str(model_dir)))["params"]
    assert freezing.param_paths(saved) == ["token_embedder/prompt"]  # an adapter-only checkpoint


@pytest.mark.slow
def test_a_prompt_past_the_learned_positions_is_one_error_line(tmp_path):
    result = run_cli(
        "--gin_file=gin_configs/examples/prompt_tuning_qa.gin", "--gin_file=gin_configs/models/bart/tiny.gin",
        f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.INITIAL_CHECKPOINT_PATH=None",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 500, 'targets': 8}",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: The soft prompt (20 positions) + inputs 500 = 520 exceeds the model's 512 learned positions; "
        "shorten PromptConfig.length or TASK_FEATURE_LENGTHS."
    ), result.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
