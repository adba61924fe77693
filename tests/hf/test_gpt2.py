"""GPT-2 import and export against Hugging Face `transformers` (PyTorch, CPU) on a random tiny
`GPT2LMHeadModel`: logits, greedy decoding, export, `hf:` checkpoint paths, and its tokenizer."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_lite import checkpoints, hf, partitioning
from t5x_lite.decoding import DecodeConfig
from tests.hf.conftest import randomised
from tests.hf.tokenizer_fixtures import gpt2_style_bpe, save_hf_tokenizer, seqio_packed_examples

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)

VOCAB = 321  # the GPT-2-style tokenizer's 320 pieces + <|endoftext|>
EOS = VOCAB - 1
TINY = {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 40, "resid_pdrop": 0.0,
        "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": EOS, "eos_token_id": EOS}


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """(HF model, its save_pretrained directory with tokenizer files); n_inner unset (HF: 4 * n_embd)."""
    torch.manual_seed(0)
    model = randomised(transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).eval(),
                       lambda name: name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")))
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    tokenizer_json = gpt2_style_bpe(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")
    auto = save_hf_tokenizer(tokenizer_json, folder, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>")
    assert auto.eos_token_id == EOS and len(auto) == VOCAB
    return model, folder


def right_padded(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (3, 12)).astype(np.int32)
    real = np.arange(12)[None] < np.array([[12], [7], [3]])
    return np.where(real, tokens, 0), real


def hf_logits(model, tokens: np.ndarray, real: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(real)).logits.numpy()


# Each KERNELS set ('cpu_tuned' is what 'auto' picks on the CPU), unrolled and scanned.
LAYOUTS = [(False, "cpu_tuned"), (True, "cpu_tuned"), (False, "xla"), (True, "xla")]


@pytest.mark.parametrize("scan_layers,kernels", LAYOUTS)
def test_imported_logits_match_hf(gpt2_dir, scan_layers, kernels):
    model, folder = gpt2_dir
    network, _ = hf.from_pretrained(folder, scan_layers=scan_layers, kernels=kernels)
    assert network.config.scan_layers is scan_layers
    assert (network.config.d_ff, network.config.head_dim, network.config.activation) == (128, 8, "gelu_tanh")
    tokens, real = right_padded()
    logits = np.asarray(network(jnp.asarray(tokens)))  # unpacked rows: causal attention never sees the padding
    diff = float(np.abs(logits - hf_logits(model, tokens, real))[real].max())
    print(f"gpt2: max |logits - HF| = {diff:.2e}")
    assert diff < 1e-4


def hf_greedy(model, prompts: list[list[int]], length: int, eos: int | None) -> np.ndarray:
    """HF's greedy continuations, 0 after EOS; one row at a time (HF's batched GPT-2 generation needs left padding)."""
    out = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            new = model.generate(input_ids=torch.tensor([prompt]), do_sample=False, num_beams=1, max_new_tokens=length,
                                 eos_token_id=eos, pad_token_id=0).numpy()[0, len(prompt):]
        out[row, : len(new)] = new
    return out


@pytest.mark.parametrize("scan_layers", [False, True])
def test_greedy_decode_matches_hf_generate(gpt2_dir, scan_layers):
    model, folder = gpt2_dir
    network, _ = hf.from_pretrained(folder, scan_layers=scan_layers)
    length, prompts = 10, [[5, 17, 250, 9, 31, 64], [88, 3], [140, 141, 142, 200], [7, 7, 7]]
    # As EOS, a token that some rows emit early and others never: the padding after EOS is compared too.
    free = hf_greedy(model, prompts, length, None)
    eos = next(t for t in free[:, :length // 2].ravel().tolist() if not all(t in row for row in free.tolist()))
    expected = hf_greedy(model, prompts, length, eos)
    assert 0 < sum(eos in row for row in expected.tolist()) < len(prompts)
    batch = np.zeros((len(prompts), 8), np.int32)
    causal = np.zeros_like(batch)
    for row, prompt in enumerate(prompts):
        batch[row, : len(prompt)], causal[row, : len(prompt)] = prompt, 1
    ours = hf.load_model(folder, scan_layers=scan_layers)
    predict = nnx.jit(lambda m, b: ours.predict_batch(m, b, max_decode_length=length, decode=DecodeConfig(eos_id=eos)))
    got = predict(network, {"decoder_input_tokens": jnp.asarray(batch), "decoder_causal_attention": jnp.asarray(causal)})
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_export_round_trips_through_transformers(gpt2_dir, tmp_path):
    model, folder = gpt2_dir
    network, vocabulary = hf.from_pretrained(folder)
    hf.save_pretrained(network, tmp_path / "exported", vocabulary=vocabulary)
    exported = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert exported["architectures"] == ["GPT2LMHeadModel"] and exported["eos_token_id"] == EOS
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "exported").eval()
    original = model.state_dict()
    assert set(reloaded.state_dict()) == set(original)
    for name, value in reloaded.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), original[name].numpy(), err_msg=name)
    tokens, real = right_padded(seed=1)
    np.testing.assert_array_equal(hf_logits(reloaded, tokens, real), hf_logits(model, tokens, real))
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert auto("Hello, world!").input_ids == vocabulary.encode("Hello, world!")
    again, _ = hf.from_pretrained(tmp_path / "exported")
    jax.tree.map(np.testing.assert_array_equal, nnx.state(again, nnx.Param), nnx.state(network, nnx.Param))


def test_hf_checkpoint_path_and_model_gin(gpt2_dir):
    model, folder = gpt2_dir
    ours = hf.load_model(folder)
    graphdef, params = checkpoints.load_checkpoint_params(ours, f"hf:{folder}", partitioning.make_mesh({"data": -1}),
                                                     partitioning.STANDARD_RULES)
    tokens, real = right_padded(seed=2)
    logits = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens)))
    assert np.abs(logits - hf_logits(model, tokens, real))[real].max() < 1e-4
    text = hf.model_gin(ours, str(folder)).splitlines()
    for line in ("MODEL = @DecoderOnlyModel()", "PrefixLMModel.config = @GPTConfig()", "GPTConfig.d_ff = 128",
                 "GPTConfig.activation = 'gelu_tanh'", "GPTConfig.dropout_rate = %DROPOUT_RATE"):
        assert line in text, line


def test_unsupported_options_are_named(gpt2_dir, tmp_path):
    _, folder = gpt2_dir
    hf_config = json.loads((folder / "config.json").read_text())
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    for key, value in (("scale_attn_by_inverse_layer_idx", True), ("add_cross_attention", True),
                       ("activation_function", "swish")):
        (tmp_path / "config.json").write_text(json.dumps({**hf_config, key: value}))
        with pytest.raises(ValueError, match=f"config.json has {key}="):
            hf.from_pretrained(tmp_path)


def test_tokenizer_encodes_like_transformers_but_refuses_seqio_pipelines(gpt2_dir):
    _, folder = gpt2_dir
    _, vocabulary = hf.from_pretrained(folder)
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    assert (vocabulary.eos_id, vocabulary.vocab_size) == (EOS, VOCAB)
    text = "A horse! A horse! My kingdom for a horse!"
    ids = vocabulary.encode(text)
    assert ids == auto(text).input_ids and 0 in ids  # "!" is id 0, as in GPT-2's vocabulary
    assert vocabulary.decode([*ids, EOS, 7]) == auto.decode(ids)
    with pytest.raises(ValueError, match=r"gives id 0 to the ordinary token '!' .* seqio uses id 0 for padding"):
        seqio_packed_examples(vocabulary, [(text, text)], {"inputs": 32, "targets": 32})
