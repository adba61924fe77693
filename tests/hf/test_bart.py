"""BART import and export against Hugging Face `transformers` (PyTorch, CPU) on a random tiny
`BartForConditionalGeneration` with BART's own special ids (<s>=0, <pad>=1, </s>=2): logits, greedy
decoding, export, and its tokenizer in a seqio task."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_lite import hf
from t5x_lite.decoding import DecodeConfig
from tests.hf.conftest import hf_logits, random_inputs, randomised
from tests.hf.tokenizer_fixtures import bart_style_bpe, save_hf_tokenizer, seqio_packed_examples

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)

VOCAB = 321  # the BART-style tokenizer's 320 pieces + <mask>
EOS = 2
TINY = {"vocab_size": VOCAB, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
        "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 24,
        "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0}


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    """(HF model, its save_pretrained directory with tokenizer files), every parameter random."""
    torch.manual_seed(0)
    model = randomised(transformers.BartForConditionalGeneration(transformers.BartConfig(**TINY)).eval(),
                       lambda name: ("layer_norm" in name or "layernorm" in name) and name.endswith("weight"))
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, 0.5)
    folder = tmp_path_factory.mktemp("bart")
    model.save_pretrained(folder)
    tokenizer_json = bart_style_bpe(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")
    auto = save_hf_tokenizer(tokenizer_json, folder, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                             unk_token="<unk>", mask_token="<mask>")
    assert (auto.bos_token_id, auto.pad_token_id, auto.eos_token_id, len(auto)) == (0, 1, EOS, VOCAB)
    return model, folder


# Each KERNELS set ('cpu_tuned' is what 'auto' picks on the CPU), unrolled and scanned.
LAYOUTS = [(False, "cpu_tuned"), (True, "cpu_tuned"), (False, "xla"), (True, "xla")]


@pytest.mark.parametrize("scan_layers,kernels", LAYOUTS)
def test_imported_logits_match_hf(bart_dir, scan_layers, kernels):
    model, folder = bart_dir
    network, _ = hf.from_pretrained(folder, scan_layers=scan_layers, kernels=kernels)
    assert network.config.scan_layers is scan_layers
    assert (network.config.num_heads, network.config.d_ff, network.config.vocab_size) == (4, 64, VOCAB)
    enc, dec = random_inputs(VOCAB, first_id=3)
    diff = float(np.abs(np.asarray(network(jnp.asarray(enc), jnp.asarray(dec))) - hf_logits(model, enc, dec)).max())
    print(f"bart: max |logits - HF| = {diff:.2e}")
    assert diff < 1e-4


def hf_greedy(model, enc: np.ndarray, length: int, eos: int | None) -> np.ndarray:
    """HF's greedy decoding from t5x_lite's start id 0, 0 after EOS (no forced tokens)."""
    with torch.no_grad():
        generated = model.generate(
            input_ids=torch.tensor(enc, dtype=torch.long), attention_mask=torch.tensor(enc > 0), do_sample=False,
            num_beams=1, max_new_tokens=length, decoder_start_token_id=0, eos_token_id=eos, pad_token_id=0,
            forced_bos_token_id=None, forced_eos_token_id=None,
        ).numpy()[:, 1:]  # drop the decoder start token
    out = np.zeros((enc.shape[0], length), np.int32)
    out[:, : generated.shape[1]] = generated
    return out


@pytest.mark.parametrize("scan_layers", [False, True])
def test_greedy_decode_matches_hf_generate(bart_dir, scan_layers):
    model, folder = bart_dir
    network, _ = hf.from_pretrained(folder, scan_layers=scan_layers)
    length = 8
    enc, _ = random_inputs(VOCAB, seed=3, first_id=3)
    # As EOS, a token that some rows emit early and others never: the padding after EOS is compared too.
    free = hf_greedy(model, enc, length, None)
    eos = next(t for t in free[:, :length // 2].ravel().tolist() if not all(t in row for row in free.tolist()))
    expected = hf_greedy(model, enc, length, eos)
    assert 0 < sum(eos in row for row in expected.tolist()) < len(enc)
    ours = hf.load_model(folder, scan_layers=scan_layers)
    predict = nnx.jit(lambda m, e: ours.predict_batch(m, {"encoder_input_tokens": e}, max_decode_length=length,
                                                      decode=DecodeConfig(eos_id=eos)))
    np.testing.assert_array_equal(np.asarray(predict(network, jnp.asarray(enc))), expected)


def test_export_round_trips_through_transformers(bart_dir, tmp_path):
    model, folder = bart_dir
    network, vocabulary = hf.from_pretrained(folder)
    hf.save_pretrained(network, tmp_path / "exported", vocabulary=vocabulary)
    exported = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert exported["architectures"] == ["BartForConditionalGeneration"]
    assert (exported["eos_token_id"], exported["decoder_start_token_id"]) == (EOS, 0)
    reloaded = transformers.BartForConditionalGeneration.from_pretrained(tmp_path / "exported").eval()
    original = model.state_dict()
    assert set(reloaded.state_dict()) == set(original)
    for name, value in reloaded.state_dict().items():
        value, expected = value.numpy(), original[name].numpy()
        if name.endswith("embed_positions.weight"):  # HF never reads its 2 offset rows; we write zeros there
            assert not value[:2].any()
            value, expected = value[2:], expected[2:]
        np.testing.assert_array_equal(value, expected, err_msg=name)
    enc, dec = random_inputs(VOCAB, seed=1, first_id=3)
    np.testing.assert_array_equal(hf_logits(reloaded, enc, dec), hf_logits(model, enc, dec))
    again, _ = hf.from_pretrained(tmp_path / "exported")
    jax.tree.map(np.testing.assert_array_equal, nnx.state(again, nnx.Param), nnx.state(network, nnx.Param))
    text = hf.model_gin(hf.load_model(tmp_path / "exported")).splitlines()
    for line in ("MODEL = @BartModel()", "BartConfig.num_heads = 4", "BartConfig.scale_embedding = False",
                 "BartConfig.attention_dropout_rate = %DROPOUT_RATE"):
        assert line in text, line


def test_unsupported_options_are_named(bart_dir, tmp_path):
    _, folder = bart_dir
    hf_config = json.loads((folder / "config.json").read_text())
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, "decoder_attention_heads": 2}))
    with pytest.raises(ValueError, match="encoder_attention_heads=4 but decoder_attention_heads=2"):
        hf.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, "normalize_before": True}))
    with pytest.raises(ValueError, match="config.json has normalize_before=True"):
        hf.from_pretrained(tmp_path)


def test_tokenizer_works_in_a_seqio_task(bart_dir):
    _, folder = bart_dir
    _, vocabulary = hf.from_pretrained(folder)
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    assert (vocabulary.eos_id, vocabulary.pad_id, vocabulary.special_tokens["pad"]) == (EOS, 0, "<pad>")
    pairs = [("To be, or not to be", "that is the question"), ("Whether 'tis nobler", "in the mind")]
    [packed] = seqio_packed_examples(vocabulary, pairs, {"inputs": 64, "targets": 32})
    expected = [i for text, _ in pairs for i in [*auto(text, add_special_tokens=False).input_ids, EOS]]
    tokens, segments = packed["encoder_input_tokens"], packed["encoder_segment_ids"]
    assert 0 not in expected and tokens[: len(expected)].tolist() == expected and not tokens[len(expected):].any()
    assert (segments > 0).sum() == len(expected) and segments.max() == 2
    first_target = packed["decoder_target_tokens"][packed["decoder_segment_ids"] == 1]
    assert vocabulary.decode([*first_target.tolist(), 0, 0]) == pairs[0][1]
