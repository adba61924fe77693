"""The BART-style encoder-decoder: HF parity, cached decoding, masks and packing, training."""

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
from t5x_lite.decoding import DecodeConfig
from t5x_lite.hf import bart as hf_bart
from t5x_lite.models.seq2seq import BartModel
from t5x_lite.networks.bart import Bart, BartConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)

TINY = BartConfig(
    vocab_size=97, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_encoder_layers=2, num_decoder_layers=2,
    max_position_embeddings=24,
)
NO_EOS = -1  # an id no decoder emits: decode the full length


def random_hf_bart(config: BartConfig) -> transformers.BartForConditionalGeneration:
    """A tiny BartForConditionalGeneration with every parameter random (norms, biases, final_logits_bias)."""
    torch.manual_seed(0)
    hf_config = transformers.BartConfig(
        vocab_size=config.vocab_size, d_model=config.d_model, encoder_layers=config.num_encoder_layers,
        decoder_layers=config.num_decoder_layers, encoder_attention_heads=config.num_heads,
        decoder_attention_heads=config.num_heads, encoder_ffn_dim=config.d_ff, decoder_ffn_dim=config.d_ff,
        max_position_embeddings=config.max_position_embeddings, scale_embedding=config.scale_embedding,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, activation_function="gelu",
        pad_token_id=0, bos_token_id=0, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=None,
    )
    hf = transformers.BartForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                param.uniform_(0.5, 1.5) if name.endswith("weight") else param.normal_(0.0, 0.2)
            else:
                param.normal_(0.0, 0.2)
        hf.final_logits_bias.normal_(0.0, 0.5)
    return hf


def network_from_hf(hf: transformers.BartForConditionalGeneration, config: BartConfig) -> Bart:
    network = Bart(config, rngs=nnx.Rngs(1))
    state = nnx.state(network, nnx.Param)
    params = hf_bart.params_from_hf(hf.state_dict(), hf.config.to_dict(), config)
    assert jax.tree.structure(nnx.to_pure_dict(state)) == jax.tree.structure(params)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(network, state)
    return network


@pytest.fixture(scope="module")
def hf_and_ours():
    hf = random_hf_bart(TINY)
    return hf, network_from_hf(hf, TINY)


@nnx.jit
def forward(network: Bart, encoder_tokens: jax.Array, decoder_tokens: jax.Array) -> jax.Array:
    return network(encoder_tokens, decoder_tokens)


def batch_with_padding(config: BartConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    encoder = rng.integers(2, config.vocab_size, (3, 11))
    encoder[0, 7:] = 0
    encoder[2, 4:] = 0
    decoder = rng.integers(2, config.vocab_size, (3, 9))
    decoder[:, 0] = 0  # BOS = pad id
    return encoder, decoder


@pytest.mark.parametrize("scale_embedding", [False, True])
def test_logits_match_hf(scale_embedding, hf_and_ours):
    cfg = dataclasses.replace(TINY, scale_embedding=scale_embedding)
    if scale_embedding:
        hf = random_hf_bart(cfg)
        network = network_from_hf(hf, cfg)
    else:
        hf, network = hf_and_ours
    encoder, decoder = batch_with_padding(cfg)
    with torch.no_grad():
        expected = hf(
            input_ids=torch.tensor(encoder), attention_mask=torch.tensor(encoder > 0),
            decoder_input_ids=torch.tensor(decoder),
        ).logits.numpy()
    logits = np.asarray(forward(network, jnp.asarray(encoder), jnp.asarray(decoder)))
    diff = float(np.abs(logits - expected).max())
    print(f"scale_embedding={scale_embedding}: max |logits - HF| = {diff:.2e} (max |logit| {np.abs(expected).max():.1f})")
    assert diff < 1e-4


def test_hf_mapping_round_trips_and_rejects_mismatches(hf_and_ours):
    hf, network = hf_and_ours
    state_dict = {k: v.numpy() for k, v in hf.state_dict().items()}
    back = hf_bart.params_to_hf(nnx.to_pure_dict(nnx.state(network, nnx.Param)), TINY)
    tied = {"model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"}
    assert set(back) == set(state_dict) - tied
    for name, value in back.items():
        expected = state_dict[name]
        if name.endswith("embed_positions.weight"):  # HF's 2 offset rows are never read; we write zeros
            value, expected = value[2:], expected[2:]
        np.testing.assert_array_equal(value, expected, err_msg=name)

    # BartModel names (no `model.` prefix) import too; a padded vocabulary gets zero rows and biases.
    bare = {k.removeprefix("model."): v for k, v in state_dict.items() if k != "lm_head.weight"}
    params = hf_bart.params_from_hf(bare, {}, dataclasses.replace(TINY, vocab_size=128))
    assert params["token_embedder"]["embedding"].shape == (128, TINY.d_model)
    assert not params["final_logits_bias"][TINY.vocab_size:].any()

    with pytest.raises(ValueError, match="no tensor 'decoder.layers.1.fc2.bias'"):
        hf_bart.params_from_hf({k: v for k, v in bare.items() if k != "decoder.layers.1.fc2.bias"}, {}, TINY)
    with pytest.raises(ValueError, match=r"with 2\+1 layers does not: \['decoder.layers.1"):
        hf_bart.params_from_hf(bare, {}, dataclasses.replace(TINY, num_decoder_layers=1))
    with pytest.raises(ValueError, match=r"encoder.embed_positions.weight.*\(24, 32\).*needs \(30, 32\)"):
        hf_bart.params_from_hf(bare, {}, dataclasses.replace(TINY, max_position_embeddings=30))


def uncached_greedy(network: Bart, encoder: np.ndarray, steps: int) -> np.ndarray:
    """Greedy decoding by re-running the whole decoder for every new token (no cache); the decoder row is
    zero-padded to a fixed width (one compilation), which causal attention never sees."""
    decoder = np.zeros((encoder.shape[0], steps), np.int32)
    for t in range(1, steps + 1):
        logits = forward(network, jnp.asarray(encoder), jnp.asarray(decoder))
        token = np.asarray(jnp.argmax(logits[:, t - 1], axis=-1))
        if t < steps:
            decoder[:, t] = token
    return np.concatenate([decoder[:, 1:], token[:, None]], axis=1)


def test_cached_greedy_equals_uncached_and_hf_generate(hf_and_ours):
    hf, network = hf_and_ours
    steps = 8
    encoder, _ = batch_with_padding(TINY, seed=1)
    model = BartModel(TINY)
    predict = nnx.jit(lambda m, b: model.predict_batch(m, b, max_decode_length=steps, decode=DecodeConfig(eos_id=NO_EOS)))
    cached = np.asarray(predict(network, {"encoder_input_tokens": jnp.asarray(encoder)}))
    np.testing.assert_array_equal(cached, uncached_greedy(network, encoder, steps))
    with torch.no_grad():
        generated = hf.generate(
            input_ids=torch.tensor(encoder), attention_mask=torch.tensor(encoder > 0), max_new_tokens=steps,
            do_sample=False, num_beams=1, decoder_start_token_id=0, eos_token_id=None, forced_bos_token_id=None,
            forced_eos_token_id=None, no_repeat_ngram_size=0, pad_token_id=0,
        )
    np.testing.assert_array_equal(cached, generated[:, 1:].numpy())  # HF's output starts with the start id


def test_decoder_is_causal_and_encoder_ignores_padding(hf_and_ours):
    _, network = hf_and_ours
    encoder, decoder = batch_with_padding(TINY, seed=2)
    base = np.asarray(forward(network, jnp.asarray(encoder), jnp.asarray(decoder)))
    changed = decoder.copy()
    changed[:, 5] = (changed[:, 5] + 1) % TINY.vocab_size
    after = np.asarray(forward(network, jnp.asarray(encoder), jnp.asarray(changed)))
    np.testing.assert_array_equal(after[:, :5], base[:, :5])
    assert np.abs(after[:, 5:] - base[:, 5:]).max(axis=-1).min() > 1e-3
    # A longer padding tail changes nothing; a real encoder token changes every decoder position.
    longer = np.pad(encoder, ((0, 0), (0, 4)))
    np.testing.assert_allclose(forward(network, jnp.asarray(longer), jnp.asarray(decoder)), base, atol=1e-5)
    changed = encoder.copy()
    changed[:, 2] = (changed[:, 2] + 1) % TINY.vocab_size
    after = np.asarray(forward(network, jnp.asarray(changed), jnp.asarray(decoder)))
    assert np.abs(after - base).max(axis=-1).min() > 1e-3


def test_packed_rows_equal_separate_rows(hf_and_ours):
    """Packing (seqio's segment ids and positions) keeps examples apart, positions restart per example."""
    _, network = hf_and_ours
    rng = np.random.default_rng(4)
    enc = [rng.integers(2, TINY.vocab_size, n) for n in (5, 4)]
    dec = [np.concatenate([[0], rng.integers(2, TINY.vocab_size, n - 1)]) for n in (4, 3)]

    def pack(parts, width):
        pad = np.zeros(width - sum(map(len, parts)), int)
        tokens = np.concatenate([*parts, pad])
        segments = np.concatenate([np.full(len(p), i + 1) for i, p in enumerate(parts)] + [pad])
        positions = np.concatenate([np.arange(len(p)) for p in parts] + [pad])
        return tokens[None], segments[None], positions[None]

    (et, es, ep), (dt, ds, dp) = pack(enc, 12), pack(dec, 9)
    packed = nnx.jit(lambda m, *a: m(*a))(network, *map(jnp.asarray, (et, dt, es, ds, ep, dp)))
    # Each example alone, one per (zero-padded) row.
    alone = forward(
        network, jnp.asarray([np.pad(e, (0, 12 - len(e))) for e in enc]), jnp.asarray([np.pad(d, (0, 9 - len(d))) for d in dec])
    )
    for i, d in enumerate(dec):
        np.testing.assert_allclose(np.asarray(packed)[0, ds[0] == i + 1], alone[i, : len(d)], atol=1e-5)


def test_config_and_decode_length_errors(hf_and_ours):
    _, network = hf_and_ours
    with pytest.raises(ValueError, match="BartConfig.activation='swish'"):
        BartConfig(activation="swish")
    with pytest.raises(ValueError, match="BartConfig.attention_dropout_rate=1.0"):
        BartConfig(attention_dropout_rate=1.0)
    encoded = jnp.zeros((1, 3, TINY.d_model))
    with pytest.raises(ValueError, match="max_decode_length 25 exceeds the decoder's 24 learned positions"):
        network.init_decode_state(encoded, jnp.ones((1, 3), bool), 25)


# ------------------------------------------------------------------ gin files and training through t5x_lite.train


@gin.configurable("test_bart_model")
def model_from_gin(model=gin.REQUIRED):
    return model


@pytest.mark.parametrize("size,params", [("tiny", 2.11e6), ("base", 139.5e6), ("large", 406.4e6)])
def test_model_gin_files(size, params):
    gin.clear_config()
    cli.parse_gin(["runs/pretrain.gin", f"models/bart/{size}.gin"], ["test_bart_model.model = %MODEL"])
    model = model_from_gin()
    gin.clear_config()
    assert isinstance(model, BartModel)
    network = nnx.eval_shape(lambda: model.build_network(nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(network, nnx.Param)))
    assert abs(count - params) < 0.005 * params, count


@pytest.mark.slow
def test_loss_falls_on_the_bundled_corpus(tmp_path):
    model_dir = tmp_path / "bart"
    gin.clear_config()
    cli.parse_gin(
        ["examples/bart_tiny_pretrain.gin"],
        [f"MODEL_DIR = '{model_dir}'", "TRAIN_STEPS = 30", "BATCH_SIZE = 8",
         "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 64}", "train.log_period = 10", "train.eval_period = 0",
         "train.checkpoint_period = 1000", "train.progress_bar = False"],
    )
    cli.require_macros()
    try:
        train_lib.train()
    finally:
        gin.clear_config()
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    print("bart", [f"{x:.3f}" for x in losses])
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5


def test_bfloat16_train_step_executes_and_matches_float32():
    """bf16 activations: forward and backward run (XLA CPU rejects some bf16 dot layouts only at run time)."""
    encoder, decoder = batch_with_padding(TINY, seed=6)
    batch = {
        "encoder_input_tokens": jnp.asarray(encoder),
        "decoder_input_tokens": jnp.asarray(decoder),
        "decoder_target_tokens": jnp.asarray(np.roll(decoder, -1, axis=1)),
        "decoder_loss_weights": jnp.ones(decoder.shape, jnp.int32),
    }
    losses = {}
    for dtype in ("float32", "bfloat16"):
        model = BartModel(dataclasses.replace(
            TINY, num_encoder_layers=1, num_decoder_layers=1, dtype=dtype, dropout_rate=0.1, attention_dropout_rate=0.1
        ))
        network = model.build_network(nnx.Rngs(0))
        step = nnx.jit(lambda m, b, model=model: nnx.value_and_grad(lambda m: model.loss_fn(m, b, nnx.Rngs(dropout=1))[0])(m))
        loss, grads = step(network, batch)
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
        losses[dtype] = float(loss)
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.02)
