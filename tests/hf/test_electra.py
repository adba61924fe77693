"""ELECTRA import and export against Hugging Face `transformers` (PyTorch, CPU): logit parity of the
discriminator (`ElectraForPreTraining`), the generator (`ElectraForMaskedLM`) and the classifier
(`ElectraForSequenceClassification`) on random tiny configs, with and without an embedding projection;
the round trip back to transformers; the joint pre-training parameters as a discriminator/generator pair;
fine-tuning a classifier from a discriminator directory (`hf:`, fresh classifier); tools/convert_hf.py both ways."""

import sys
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_lite import checkpoints, hf
from t5x_lite.hf import electra as hf_electra
from t5x_lite.models.electra import ElectraClassificationModel, ElectraModel
from t5x_lite.networks.electra import ElectraConfig
from tests.hf.conftest import randomised

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import convert_hf

VOCAB = 120
TINY = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 40, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}
CLASSES = {"discriminator": "ElectraForPreTraining", "generator": "ElectraForMaskedLM",
           "classification": "ElectraForSequenceClassification", "tagging": "ElectraForTokenClassification"}


def random_hf_electra(head: str, embedding_size: int):
    torch.manual_seed(0)
    config = transformers.ElectraConfig(**TINY, embedding_size=embedding_size, num_labels=3)
    return randomised(getattr(transformers, CLASSES[head])(config).eval(), lambda name: "LayerNorm.weight" in name)


def random_inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, VOCAB, (3, 10)).astype(np.int32)
    tokens[0, 7:] = 0
    tokens[2, 3:] = 0
    types = np.zeros_like(tokens)
    types[0, 4:7] = 1
    return tokens, types


def hf_logits(model, tokens, types) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(tokens > 0),
                     token_type_ids=torch.tensor(types, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("embedding_size", [32, 16])  # shared width, and ELECTRA-small's narrower embeddings
@pytest.mark.parametrize("head", ["discriminator", "generator", "classification", "tagging"])
def test_logits_match_hugging_face_and_export_round_trips(tmp_path, head, embedding_size):
    model = random_hf_electra(head, embedding_size)
    model.save_pretrained(tmp_path / "hf")
    tokens, types = random_inputs()
    expected = hf_logits(model, tokens, types)
    network, _ = hf.from_pretrained(tmp_path / "hf")
    assert network.head == head and isinstance(network.config, ElectraConfig)
    got = np.asarray(network(jnp.asarray(tokens), token_type_ids=jnp.asarray(types)))
    real = tokens > 0
    if head == "classification":
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    else:
        np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=0)

    hf.save_pretrained(network, tmp_path / "out")
    back = getattr(transformers, CLASSES[head]).from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(hf_logits(back, tokens, types)[real if head != "classification" else ...],
                               expected[real if head != "classification" else ...], atol=1e-5, rtol=0)


def test_joint_pretraining_params_export_as_a_discriminator_and_a_generator(tmp_path):
    config = ElectraConfig(vocab_size=VOCAB, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_layers=2,
                           max_position_embeddings=40, embedding_size=16)
    network = ElectraModel(config).build_network(nnx.Rngs(3))
    params = nnx.to_pure_dict(nnx.state(network, nnx.Param))
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), params)
    nnx.update(network, params)
    disc_dir, gen_dir = hf_electra.write_pretraining_pair(params, config, tmp_path)
    disc = transformers.ElectraForPreTraining.from_pretrained(disc_dir).eval()
    gen = transformers.ElectraForMaskedLM.from_pretrained(gen_dir).eval()
    assert gen.config.hidden_size == 8 and gen.config.embedding_size == disc.config.embedding_size == 16
    tokens, types = random_inputs()
    real = tokens > 0
    ours_disc = np.asarray(network(jnp.asarray(tokens), token_type_ids=jnp.asarray(types)))
    ours_gen = np.asarray(network.generator_logits(network.generator_hidden(jnp.asarray(tokens), token_type_ids=jnp.asarray(types))))
    np.testing.assert_allclose(hf_logits(disc, tokens, types)[real], ours_disc[real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(hf_logits(gen, tokens, types)[real], ours_gen[real], atol=1e-4, rtol=0)


def test_a_classifier_fine_tunes_from_a_discriminator_directory(tmp_path):
    random_hf_electra("discriminator", 16).save_pretrained(tmp_path)
    checkpoint = hf.open_checkpoint(tmp_path)
    model = ElectraClassificationModel(checkpoint.config)
    fresh = nnx.to_pure_dict(nnx.state(model.build_network(nnx.Rngs(7)), nnx.Param))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh)
    restored = checkpoints.restore_params(f"hf:{tmp_path}", abstract, model, fresh=fresh)
    converted = checkpoint.params()
    np.testing.assert_array_equal(restored["embeddings_project"]["kernel"], converted["embeddings_project"]["kernel"])
    np.testing.assert_array_equal(restored["classifier"]["out_proj"]["kernel"], fresh["classifier"]["out_proj"]["kernel"])
    assert "discriminator_predictions" not in restored


def test_an_untied_generator_head_is_refused(tmp_path):
    model = random_hf_electra("generator", 32)
    state = {name: value.clone() for name, value in model.state_dict().items()}
    state["generator_lm_head.weight"] = state["generator_lm_head.weight"] + 1.0
    weights = {name: value.numpy() for name, value in state.items()}
    with pytest.raises(ValueError, match="generator_lm_head.weight differs from the word embeddings"):
        hf_electra.params_from_hf(weights, model.config.to_dict(), hf_electra.config_from_hf(model.config.to_dict(), weights))


def test_convert_tool_round_trip_of_a_discriminator(tmp_path):
    model = random_hf_electra("discriminator", 16)
    model.save_pretrained(tmp_path / "hf")
    out = convert_hf.main(["--hf_dir", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "t5x")])
    assert "MODEL = @ElectraDiscriminatorModel()" in (out / "model.gin").read_text()
    try:
        exported = convert_hf.main(["--to_hf", "--gin_file", str(out / "model.gin"), "--checkpoint", str(out),
                                    "--out_dir", str(tmp_path / "back")])
    finally:
        gin.clear_config()
    reloaded = transformers.ElectraForPreTraining.from_pretrained(exported).eval()
    for name, value in model.state_dict().items():  # bit-identical weights
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), value.numpy(), err_msg=name)
