"""Frozen features against Hugging Face's `output_hidden_states` on random tiny imported models: DeBERTa,
ELECTRA's discriminator, the T5 and T5Gemma encoders (BERT's: tests/models/test_encoder_only.py); the CLI's
function on an imported T5Gemma, and the error for an unsupported network."""

import gin
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_lite import cli, features, hf
from t5x_lite.networks.gpt import GPT, GPTConfig
from tests import test_deberta, test_t5gemma
from tests.hf import test_electra
from tests.hf.conftest import random_hf_t5, random_inputs, randomised
from tests.test_cli import run_cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)


def saved(model, folder) -> str:
    model.save_pretrained(folder)
    return str(folder)


def jit_features(network: nnx.Module, tokens: np.ndarray, layers: tuple[int, ...], types: np.ndarray | None = None):
    """`extract_features` under `nnx.jit` (as the CLI runs it; faster than op by op)."""
    run = nnx.jit(lambda network, tokens, types: features.extract_features(network, tokens, layers,
                                                                           token_type_ids=types))
    return run(network, jnp.asarray(tokens), None if types is None else jnp.asarray(types))


def hf_states(model, tokens: np.ndarray, types: np.ndarray | None = None) -> list[np.ndarray]:
    inputs = {"input_ids": torch.tensor(tokens, dtype=torch.long), "attention_mask": torch.tensor(tokens > 0).long()}
    if types is not None:
        inputs["token_type_ids"] = torch.tensor(types, dtype=torch.long)
    with torch.no_grad():
        return [s.numpy() for s in model(**inputs, output_hidden_states=True).hidden_states]


def assert_states_match(got: dict, expected: list[np.ndarray], tokens: np.ndarray) -> None:
    """Every requested layer equals HF's at the real tokens (padded positions are don't-cares)."""
    real = tokens > 0
    for layer, states in got.items():
        np.testing.assert_allclose(np.asarray(states)[real], expected[layer][real], atol=1e-4, rtol=1e-4)


def test_deberta_features_equal_hugging_face_hidden_states(tmp_path):
    torch.manual_seed(0)  # v2-style: token types and absolute positions, so the features path passes both on
    model = randomised(transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(**test_deberta.V2)).eval(),
                       lambda name: "LayerNorm.weight" in name)
    network, _ = hf.from_pretrained(saved(model, tmp_path))
    tokens, types = test_deberta.random_inputs()
    got = jit_features(network, tokens, (0, 1, -1), types)
    assert sorted(got) == [0, 1, 2]
    assert_states_match(got, hf_states(model, tokens, types), tokens)


def test_electra_discriminator_features_equal_hugging_face_hidden_states(tmp_path):
    model = test_electra.random_hf_electra("discriminator", embedding_size=16)  # projected to d_model 32 before layer 1
    network, _ = hf.from_pretrained(saved(model, tmp_path))
    tokens, types = test_electra.random_inputs()
    got = jit_features(network, tokens, (0, 1, 2), types)
    assert [v.shape for v in got.values()] == [(3, 10, 32)] * 3
    assert_states_match(got, hf_states(model, tokens, types), tokens)
    last = network.encode(jnp.asarray(tokens), token_type_ids=jnp.asarray(types))
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(last), atol=1e-5)


def test_t5_encoder_features_equal_hugging_face_hidden_states(tmp_path):
    model = random_hf_t5("t5_v1_1")
    network, _ = hf.from_pretrained(saved(model, tmp_path))
    tokens, _ = random_inputs(96)
    got = jit_features(network, tokens, (0, 1, 2))
    assert_states_match(got, hf_states(model.get_encoder(), tokens), tokens)  # the last after the final norm


def test_t5gemma_encoder_features_equal_hugging_face_hidden_states(tmp_path):
    model = test_t5gemma.random_hf_t5gemma(tied=True)  # 3 encoder layers: local (window 3), global, local
    # Scanned: the windows go through the scan (the CLI test below reads an unscanned one).
    network, _ = hf.from_pretrained(saved(model, tmp_path), scan_layers=True)
    tokens, _ = random_inputs(test_t5gemma.VOCAB)
    got = jit_features(network, tokens, (0, 1, 2, -1))
    assert sorted(got) == [0, 1, 2, 3]
    assert_states_match(got, hf_states(model.get_encoder(), tokens), tokens)  # the last after the final norm
    np.testing.assert_allclose(np.asarray(got[3]), np.asarray(network.encode(jnp.asarray(tokens))), atol=1e-5)
    with pytest.raises(ValueError, match="T5Gemma has no token types; pass token_type_ids only for BERT, ELECTRA"):
        features.extract_features(network, jnp.asarray(tokens), token_type_ids=jnp.zeros_like(tokens))
    with pytest.raises(ValueError, match="layers 0 \\(embeddings\\) to 3"):
        features.extract_features(network, jnp.asarray(tokens), [4])


def test_an_unsupported_network_is_named_with_the_supported_families():
    network = nnx.eval_shape(lambda: GPT(GPTConfig(vocab_size=32, d_model=8, num_heads=1, head_dim=8, d_ff=8,
                                                   num_layers=1), rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="need a BERT, ELECTRA, DeBERTa, T5 or T5Gemma network, got GPT"):
        features.hidden_states(network, jnp.ones((1, 4), jnp.int32))


def test_save_features_of_an_imported_t5gemma(tmp_path):
    """The CLI's function on a Hugging Face T5Gemma directory (`hf:` CHECKPOINT_PATH): the saved layers are
    HF's encoder hidden states of the saved tokens (`text EOS` rows, no token types)."""
    config = {"vocab_size": 8192, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "sliding_window": 4,
              "query_pre_attn_scalar": 8, "attn_logit_softcapping": 5.0, "pad_token_id": 0, "eos_token_id": 1}
    torch.manual_seed(0)  # the bundled vocabulary's 8100 ids fit
    model = transformers.T5GemmaForConditionalGeneration(transformers.T5GemmaConfig(
        encoder=config, decoder=config, vocab_size=8192, attn_implementation="eager")).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    folder = saved(model, tmp_path / "hf")
    model_gin = tmp_path / "model.gin"
    model_gin.write_text(hf.model_gin(hf.load_model(folder)))
    lines = tmp_path / "lines.txt"
    lines.write_text("To be, or not to be: that is the question.\nA horse! A horse! My kingdom for a horse.\n")
    output = tmp_path / "out" / "features.npz"
    gin.clear_config()
    cli.parse_gin([str(cli.GIN_CONFIGS_DIR / "runs" / "features.gin"), str(model_gin)],
                  [f"CHECKPOINT_PATH = 'hf:{folder}'", f"FEATURES_INPUT_FILE = '{lines}'", "SEQUENCE_LENGTH = 16",
                   "FEATURE_LAYERS = [0, -1]", f"FEATURES_OUTPUT_FILE = '{output}'"])
    try:
        features.save_features()
    finally:
        gin.clear_config()
    arrays = np.load(output)
    assert sorted(arrays) == ["layer_0", "layer_2", "mask", "tokens"]
    tokens = arrays["tokens"]
    assert tokens.shape == (2, 16) and arrays["layer_2"].shape == (2, 16, 16)
    assert (tokens == 1).sum(axis=1).tolist() == [1, 1]  # one EOS per row
    assert_states_match({i: arrays[f"layer_{i}"] for i in (0, 2)}, hf_states(model.get_encoder(), tokens), tokens)


@pytest.mark.slow
def test_cli_names_the_supported_families_for_another_model(tmp_path):
    output = tmp_path / "features.npz"
    output.write_bytes(b"earlier features")
    result = run_cli(
        "--gin_file=runs/features.gin", "--gin_file=models/gpt/tiny.gin", f"--gin.CHECKPOINT_PATH='{tmp_path}'",
        "--gin.FEATURES_INPUT_FILE='lines.txt'", f"--gin.FEATURES_OUTPUT_FILE='{output}'", module="t5x_lite.features",
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "error: Frozen features need a BERT, ELECTRA, DeBERTa, T5 or T5Gemma model; MODEL builds GPT.")
    assert output.read_bytes() == b"earlier features"
