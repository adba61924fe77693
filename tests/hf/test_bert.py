"""BERT import and export against Hugging Face `transformers` (PyTorch, CPU): every head, the head rule,
fine-tuning a classifier from a masked-LM directory (`hf:` with fresh heads), the tool, the tokenizer."""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_lite import checkpoints, hf
from t5x_lite.hf import bert as hf_bert
from t5x_lite.models.encoder import EncoderClassificationModel, EncoderOnlyMLMModel
from t5x_lite.networks.bert import Bert
from tests.hf.conftest import randomised
from tests.hf.tokenizer_fixtures import save_hf_tokenizer, seqio_packed_examples, wordpiece

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import convert_hf

VOCAB = 300  # the wordpiece fixture's size
TINY = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 40, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}
# variant -> (transformers class, num_labels, our head, the trainer's model)
VARIANTS = {
    "mlm": ("BertForMaskedLM", 2, "mlm", "EncoderOnlyMLMModel"),
    "pretraining": ("BertForPreTraining", 2, "mlm", "EncoderOnlyMLMModel"),
    "classification": ("BertForSequenceClassification", 3, "classification", "EncoderClassificationModel"),
    "tagging": ("BertForTokenClassification", 4, "tagging", "EncoderTaggingModel"),
}


def random_hf_bert(variant: str):
    """A tiny `BertFor*` with every parameter random (norms and biases too, so each mapping is checked)."""
    class_name, num_labels, _, _ = VARIANTS[variant]
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(transformers.BertConfig(**TINY, num_labels=num_labels)).eval()
    return randomised(model, lambda name: "LayerNorm.weight" in name)


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    """variant -> (HF model, its save_pretrained directory); the masked-LM one has tokenizer files."""
    out = {}
    for variant in VARIANTS:
        model, folder = random_hf_bert(variant), tmp_path_factory.mktemp(variant)
        model.save_pretrained(folder)
        out[variant] = (model, folder)
    tokenizer_json = wordpiece(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")
    save_hf_tokenizer(tokenizer_json, out["mlm"][1], unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                      cls_token="[CLS]", mask_token="[MASK]")
    return out


def random_inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids with padding (0) in two rows, and token types (a second segment in two rows)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, VOCAB, (3, 10)).astype(np.int32)
    tokens[0, 7:] = 0
    tokens[2, 3:] = 0
    types = np.zeros_like(tokens)
    types[0, 4:7] = 1
    types[1, 5:] = 1
    return tokens, types


def hf_outputs(model, tokens: np.ndarray, types: np.ndarray):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(tokens > 0),
                     token_type_ids=torch.tensor(types, dtype=torch.long))


def our_outputs(network: Bert, tokens: np.ndarray, types: np.ndarray) -> dict[str, np.ndarray]:
    """The head's logits under HF's output names (eager: quicker than compiling, for tiny models)."""
    hidden = network.encode(jnp.asarray(tokens), token_type_ids=jnp.asarray(types))
    if network.head != "mlm":
        return {"logits": np.asarray(network.classification_logits(hidden) if network.head == "classification"
                                     else network.tagging_logits(hidden))}
    if network.nsp is None:
        return {"logits": np.asarray(network.mlm_logits(hidden))}
    return {"prediction_logits": np.asarray(network.mlm_logits(hidden)),
            "seq_relationship_logits": np.asarray(network.nsp_logits(hidden))}


# Each KERNELS set ('cpu_tuned' is what 'auto' picks on the CPU), unrolled and scanned.
LAYOUTS = [(False, "cpu_tuned"), (True, "cpu_tuned"), (False, "xla"), (True, "xla")]


@pytest.mark.parametrize("scan_layers,kernels", LAYOUTS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_imported_logits_match_hf(bert_dirs, variant, scan_layers, kernels):
    model, folder = bert_dirs[variant]
    network, _ = hf.from_pretrained(folder, scan_layers=scan_layers, kernels=kernels)
    assert network.config.scan_layers is scan_layers
    assert network.head == VARIANTS[variant][2]
    assert network.config.next_sentence_prediction == (variant == "pretraining")
    if variant in ("classification", "tagging"):
        assert network.config.num_labels == VARIANTS[variant][1]
    tokens, types = random_inputs()
    expected, ours = hf_outputs(model, tokens, types), our_outputs(network, tokens, types)
    real = tokens > 0
    for name, logits in ours.items():
        reference = getattr(expected, name).numpy()
        if logits.ndim == 3:  # per-token outputs: padded positions are don't-cares
            logits, reference = logits[real], reference[real]
        diff = float(np.abs(logits - reference).max())
        print(f"{variant} {name}: max |logits - HF| = {diff:.2e} (max |logit| {np.abs(reference).max():.1f})")
        assert diff < 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_round_trips_through_transformers(bert_dirs, variant, tmp_path):
    model, folder = bert_dirs[variant]
    network, _ = hf.from_pretrained(folder)
    hf.save_pretrained(network, tmp_path / "exported")
    class_name = VARIANTS[variant][0]
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["architectures"] == [class_name]
    reloaded = getattr(transformers, class_name).from_pretrained(tmp_path / "exported").eval()
    original = model.state_dict()
    assert set(reloaded.state_dict()) == set(original)
    for name, value in reloaded.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), original[name].numpy(), err_msg=name)
    tokens, types = random_inputs(seed=1)
    expected, again_hf = hf_outputs(model, tokens, types), hf_outputs(reloaded, tokens, types)
    for name in ("logits", "prediction_logits", "seq_relationship_logits"):
        if hasattr(expected, name):
            np.testing.assert_array_equal(getattr(again_hf, name).numpy(), getattr(expected, name).numpy())
    again, _ = hf.from_pretrained(tmp_path / "exported")
    assert again.head == network.head
    jax.tree.map(np.testing.assert_array_equal, nnx.state(again, nnx.Param), nnx.state(network, nnx.Param))


def test_head_comes_from_the_tensors_without_architectures(bert_dirs, tmp_path):
    for variant, (_, folder) in bert_dirs.items():
        config = json.loads((folder / "config.json").read_text())
        del config["architectures"]
        (tmp_path / variant).mkdir()
        (tmp_path / variant / "config.json").write_text(json.dumps(config))
        (tmp_path / variant / "model.safetensors").symlink_to(folder / "model.safetensors")
        checkpoint = hf.open_checkpoint(tmp_path / variant)
        assert checkpoint.head == VARIANTS[variant][2], variant
        assert checkpoint.config.next_sentence_prediction == (variant == "pretraining")
    config = json.loads((bert_dirs["mlm"][1] / "config.json").read_text())
    (tmp_path / "mlm" / "config.json").write_text(json.dumps({**config, "architectures": ["BertLMHeadModel"]}))
    with pytest.raises(ValueError, match=r"architectures \['BertLMHeadModel'\]; .* converts BERT checkpoints of"):
        hf.open_checkpoint(tmp_path / "mlm")
    (tmp_path / "mlm" / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    with pytest.raises(ValueError, match=r"model_type='roberta'.*supported model types: bart, bert, deberta-v2, electra, gpt2, mt5, t5, t5gemma, umt5\."):
        hf.open_checkpoint(tmp_path / "mlm")


def test_load_model_and_model_gin_follow_the_head(bert_dirs):
    for variant, (_, folder) in bert_dirs.items():
        model = hf.load_model(folder, dropout_rate=0.1)
        assert type(model).__name__ == VARIANTS[variant][3], variant
        assert model.config.dropout_rate == 0.1
    text = hf.model_gin(hf.load_model(bert_dirs["classification"][1]), "DIR")
    for line in ("MODEL = @EncoderClassificationModel()", "EncoderOnlyMLMModel.config = @BertConfig()",
                 "EncoderTaggingModel.config = @BertConfig()", "BertConfig.num_labels = 3",
                 "BertConfig.layer_norm_eps = 1e-12", "BertConfig.dropout_rate = %DROPOUT_RATE"):
        assert line in text.splitlines(), line


def test_finetuning_a_classifier_from_a_masked_lm_directory_keeps_the_new_head_fresh(bert_dirs):
    """`INITIAL_CHECKPOINT_PATH='hf:DIR'`: the encoder (and a pooler if the directory has one) load, the
    classifier keeps its initialisation; a missing parameter outside the fresh heads stays an error."""
    model_mlm, mlm_dir = bert_dirs["mlm"]
    model_pre, pre_dir = bert_dirs["pretraining"]
    config = dataclasses.replace(hf.open_checkpoint(mlm_dir).config, num_labels=5, dropout_rate=0.1)
    model = EncoderClassificationModel(config)
    fresh = nnx.to_pure_dict(nnx.state(model.build_network(nnx.Rngs(7)), nnx.Param))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh)

    restored = checkpoints.restore_params(f"hf:{mlm_dir}", abstract, model, fresh=fresh)
    expected = hf_bert.params_from_hf({k: v.numpy() for k, v in model_mlm.state_dict().items()}, {}, config)
    for name in ("embeddings", "layers"):
        jax.tree.map(np.testing.assert_array_equal, restored[name], expected[name])
    for head in ("pooler", "classifier"):
        jax.tree.map(np.testing.assert_array_equal, restored[head], fresh[head])

    restored = checkpoints.restore_params(f"hf:{pre_dir}", abstract, model, fresh=fresh)
    np.testing.assert_array_equal(restored["pooler"]["kernel"], model_pre.bert.pooler.dense.weight.detach().numpy().T)
    jax.tree.map(np.testing.assert_array_equal, restored["classifier"], fresh["classifier"])

    with pytest.raises(ValueError, match=r"has parameters this model lacks: \['mlm/"):  # only with fresh params
        checkpoints.restore_params(f"hf:{mlm_dir}", abstract, model)
    nsp_model = EncoderOnlyMLMModel(dataclasses.replace(config, next_sentence_prediction=True))
    nsp_fresh = nnx.to_pure_dict(nnx.state(nsp_model.build_network(nnx.Rngs(7)), nnx.Param))
    nsp_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nsp_fresh)
    with pytest.raises(ValueError, match=r"has no parameter (nsp|pooler)/"):  # not a fresh head of that model
        checkpoints.restore_params(f"hf:{mlm_dir}", nsp_abstract, nsp_model, fresh=nsp_fresh)
    wrong = EncoderClassificationModel(dataclasses.replace(config, d_ff=128))
    with pytest.raises(ValueError, match=r"BertConfig.d_ff is 128 in the model config but 64 in "):
        checkpoints.restore_params(f"hf:{mlm_dir}", abstract, wrong, fresh=fresh)


def test_convert_tool_round_trip_of_a_classifier(bert_dirs, tmp_path):
    model, folder = bert_dirs["classification"]
    out = convert_hf.main(["--hf_dir", str(folder), "--out_dir", str(tmp_path / "t5x")])
    assert "MODEL = @EncoderClassificationModel()" in (out / "model.gin").read_text()
    try:
        exported = convert_hf.main(["--to_hf", "--gin_file", str(out / "model.gin"), "--checkpoint", str(out),
                                    "--out_dir", str(tmp_path / "back")])
    finally:
        import gin

        gin.clear_config()
    reloaded = transformers.BertForSequenceClassification.from_pretrained(exported).eval()
    tokens, types = random_inputs(seed=2)
    np.testing.assert_array_equal(hf_outputs(reloaded, tokens, types).logits.numpy(),
                                  hf_outputs(model, tokens, types).logits.numpy())


def test_tokenizer_gives_transformers_ids_and_works_in_a_seqio_task(bert_dirs):
    _, folder = bert_dirs["mlm"]
    _, vocabulary = hf.from_pretrained(folder)
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    assert isinstance(vocabulary, hf.TokenizersVocabulary)
    assert (vocabulary.eos_id, vocabulary.pad_id, vocabulary.vocab_size) == (auto.sep_token_id, 0, VOCAB)
    pairs = [("To be, or not to be", "that is the question"), ("Whether 'tis nobler", "in the mind")]
    for text in (t for pair in pairs for t in pair):
        assert vocabulary.encode(text) == auto(text, add_special_tokens=False).input_ids
    [packed] = seqio_packed_examples(vocabulary, pairs, {"inputs": 32, "targets": 16})
    expected = [i for text, _ in pairs for i in [*auto(text, add_special_tokens=False).input_ids, auto.sep_token_id]]
    tokens, segments = packed["encoder_input_tokens"], packed["encoder_segment_ids"]
    assert tokens[: len(expected)].tolist() == expected and not tokens[len(expected):].any()
    assert (segments > 0).sum() == len(expected) and segments.max() == 2
    first_target = packed["decoder_target_tokens"][packed["decoder_segment_ids"] == 1]
    assert vocabulary.decode(first_target.tolist()) == auto.decode(auto(pairs[0][1]).input_ids, skip_special_tokens=True)

