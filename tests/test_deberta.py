"""DeBERTa-v2/v3 against Hugging Face `transformers` (PyTorch, CPU): hidden states and every head's logits
of random tiny models (v3 layout and a v2-style one), export that reloads in transformers, the encoder
trainer models building DeBERTa networks, refused checkpoints (the gin sizes: tests/test_gin_configs.py)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_lite import hf
from t5x_lite.models.encoder import EncoderClassificationModel
from t5x_lite.networks.deberta import Deberta, DebertaConfig
from t5x_lite.nn import disentangled
from tests.hf.conftest import randomised
from tests.subprocess_env import subprocess_env

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)

VOCAB = 90
# v3: shared keys, both position terms, normed relative table, log buckets (8 buckets < the 24 tokens used).
V3 = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
      "intermediate_size": 64, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
      "attention_probs_dropout_prob": 0.0, "relative_attention": True, "position_buckets": 8,
      "norm_rel_ebd": "layer_norm", "share_att_key": True, "pos_att_type": "p2c|c2p", "layer_norm_eps": 1e-7,
      "max_relative_positions": -1, "position_biased_input": False, "type_vocab_size": 0}
# v2-style: own position projections, absolute positions and token types too, raw distances up to 16.
V2 = {**V3, "position_buckets": -1, "max_relative_positions": 16, "norm_rel_ebd": "none", "share_att_key": False,
      "position_biased_input": True, "type_vocab_size": 2}
# variant -> (config, transformers class, num_labels, our head)
VARIANTS = {
    "v3_mlm": (V3, "DebertaV2ForMaskedLM", 2, "mlm"),
    "v3_classification": (V3, "DebertaV2ForSequenceClassification", 3, "classification"),
    "v3_tagging": (V3, "DebertaV2ForTokenClassification", 4, "tagging"),
    "v2_mlm": (V2, "DebertaV2ForMaskedLM", 2, "mlm"),
}


@pytest.fixture(scope="module")
def deberta_dirs(tmp_path_factory):
    """variant -> (random HF model, its save_pretrained directory)."""
    out = {}
    for variant, (config, class_name, num_labels, _) in VARIANTS.items():
        torch.manual_seed(0)
        model = getattr(transformers, class_name)(transformers.DebertaV2Config(**config, num_labels=num_labels))
        model = randomised(model.eval(), lambda name: "LayerNorm.weight" in name)
        folder = tmp_path_factory.mktemp(variant)
        model.save_pretrained(folder)
        out[variant] = (model, folder)
    return out


def random_inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """24-token rows (past the 8 buckets' exact range) with padding in two rows, and token types."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCAB, (3, 24)).astype(np.int32)
    tokens[0, 17:] = 0
    tokens[2, 5:] = 0
    types = np.zeros_like(tokens)
    types[1, 12:] = 1
    return tokens, types


def hf_outputs(model, tokens: np.ndarray, types: np.ndarray):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(tokens > 0),
                     token_type_ids=torch.tensor(types, dtype=torch.long), output_hidden_states=True)


def our_logits(network, tokens: np.ndarray, types: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    hidden, states = network.encode(jnp.asarray(tokens), token_type_ids=jnp.asarray(types), return_hidden_states=True)
    head = {"mlm": network.mlm_logits, "classification": network.classification_logits,
            "tagging": network.tagging_logits}[network.head]
    return np.asarray(head(hidden)), [np.asarray(s) for s in states]


def test_log_buckets_match_transformers():
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    relative = np.arange(-600, 601)
    expected = make_log_bucket_position(torch.tensor(relative), 256, 512).numpy()
    np.testing.assert_array_equal(np.asarray(disentangled.log_bucket_position(jnp.asarray(relative), 256, 512)),
                                  expected)


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_imported_hidden_states_and_logits_match_hf(deberta_dirs, variant, scan_layers):
    model, folder = deberta_dirs[variant]
    network, _ = hf.from_pretrained(folder, scan_layers=scan_layers)
    assert network.head == VARIANTS[variant][3]
    tokens, types = random_inputs()
    expected = hf_outputs(model, tokens, types)
    logits, states = our_logits(network, tokens, types)
    real = tokens > 0
    for ours, theirs in zip(states, expected.hidden_states, strict=True):
        np.testing.assert_allclose(ours[real], theirs.numpy()[real], atol=1e-4, rtol=1e-4)
    reference = expected.logits.numpy()
    if logits.ndim == 3:  # per-token outputs: padded positions are don't-cares
        logits, reference = logits[real], reference[real]
    np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_reloads_in_transformers_with_the_same_logits(deberta_dirs, variant, tmp_path):
    model, folder = deberta_dirs[variant]
    network, _ = hf.from_pretrained(folder)
    hf.save_pretrained(network, tmp_path / "exported")
    class_name = VARIANTS[variant][1]
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["architectures"] == [class_name]
    reloaded = getattr(transformers, class_name).from_pretrained(tmp_path / "exported").eval()
    tokens, types = random_inputs(seed=1)
    np.testing.assert_array_equal(hf_outputs(reloaded, tokens, types).logits.numpy(),
                                  hf_outputs(model, tokens, types).logits.numpy())


def test_encoder_trainer_models_build_deberta_and_train(deberta_dirs):
    """The masked-LM and classification trainer models take a `DebertaConfig`: finite losses, MLM gradients."""
    tokens, types = random_inputs()
    mlm = hf.load_model(deberta_dirs["v3_mlm"][1])
    targets = np.where(np.arange(tokens.shape[1]) % 5 == 1, tokens, 0)
    batch = {"encoder_input_tokens": tokens, "encoder_target_tokens": targets, "encoder_loss_weights": targets > 0}
    network = mlm.build_network(nnx.Rngs(0))
    assert isinstance(network, Deberta)
    grads = nnx.jit(nnx.grad(lambda net, batch: mlm.loss_fn(net, batch)[0]))(network, batch)
    norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(nnx.state(grads, nnx.Param))]
    assert np.isfinite(norms).all() and min(norms) > 0
    classify = EncoderClassificationModel(mlm.config)
    classifier = classify.build_network(nnx.Rngs(0))
    assert isinstance(classifier, Deberta) and classifier.head == "classification"
    batch = {"encoder_input_tokens": tokens, "encoder_token_type_ids": types, "labels": np.array([[1], [0], [1]])}
    assert np.isfinite(float(classify.loss_fn(classifier, batch)[0]))
    assert DebertaConfig(pos_att_type=["c2p"]).pos_att_type == ("c2p",)  # gin lists compare as the checkpoint's

def test_unsupported_checkpoints_are_refused(deberta_dirs, tmp_path):
    config = json.loads((deberta_dirs["v3_mlm"][1] / "config.json").read_text())
    for key, value, message in (("conv_kernel_size", 3, r"conv_kernel_size=3; t5x_lite's DeBERTa supports only 0"),
                                ("embedding_size", 16, r"embedding_size=16; .* only embedding_size == hidden_size")):
        (tmp_path / key).mkdir()
        (tmp_path / key / "config.json").write_text(json.dumps({**config, key: value}))
        (tmp_path / key / "model.safetensors").symlink_to(deberta_dirs["v3_mlm"][1] / "model.safetensors")
        with pytest.raises(ValueError, match=message):
            hf.open_checkpoint(tmp_path / key)


@pytest.mark.slow
def test_convert_tool_refuses_a_convolution_checkpoint_in_one_line(deberta_dirs, tmp_path):
    """tools/convert_hf.py on a DeBERTa-v2 with the convolution layer: one `error:` line, nothing written."""
    source = tmp_path / "conv"
    source.mkdir()
    config = json.loads((deberta_dirs["v3_mlm"][1] / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "conv_kernel_size": 3}))
    (source / "model.safetensors").symlink_to(deberta_dirs["v3_mlm"][1] / "model.safetensors")
    before = sorted(p.name for p in source.iterdir())
    tool = Path(__file__).resolve().parents[1] / "tools" / "convert_hf.py"
    result = subprocess.run([sys.executable, str(tool), "--hf_dir", str(source), "--out_dir", str(tmp_path / "out")],
                            env=subprocess_env(1), capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: config.json has conv_kernel_size=3; t5x_lite's DeBERTa supports only 0.")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and sorted(p.name for p in source.iterdir()) == before
