"""The decoder start id follows the model: a Hugging Face T5Gemma trained from BOS 2 (HF's default) imports
with `decoder_start_id` 2, which its training batches and every decoding method use, and exports back with
it; a bad or mismatched value is one error line on the command line."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_lite import checkpoints, cli, hf, partitioning
from t5x_lite.decoding import DecodeConfig
from t5x_lite.models.seq2seq import BartModel, EncoderDecoderModel
from t5x_lite.networks.bart import BartConfig
from t5x_lite.networks.config_checks import ConfigError
from t5x_lite.networks.t5gemma import T5GemmaConfig
from tests.hf.conftest import random_inputs
from tests.test_cli import run_cli
from tests.test_t5gemma import DECODER, ENCODER, VOCAB

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BOS = 2  # HF's T5GemmaModuleConfig.bos_token_id, the start of published checkpoints


@pytest.fixture(scope="module")
def bos_dir(tmp_path_factory):
    """(HF model, its save_pretrained directory): the tiny T5Gemma of tests/test_t5gemma.py with HF's own
    special ids (no start id or BOS given), every parameter random."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    stacks = [{k: v for k, v in stack.items() if k != "bos_token_id"} for stack in (ENCODER, DECODER)]
    config = transformers.T5GemmaConfig(encoder=stacks[0], decoder=stacks[1], vocab_size=VOCAB,
                                        attn_implementation="eager")
    model = transformers.T5GemmaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for _, param in model.named_parameters():
            param.normal_(0.0, 0.1)
        embeddings = model.model.decoder.embed_tokens.weight  # EOS (1) scores like token 81, which row 2 emits
        embeddings[1] = embeddings[81] * 1.05  # second: that row stops early, the others do not
    folder = tmp_path_factory.mktemp("t5gemma_bos")
    model.save_pretrained(folder)
    return model, folder


def padded(tokens: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros((tokens.shape[0], length), np.int32)
    out[:, : tokens.shape[1]] = tokens
    return out


def test_import_decodes_like_generate_with_hf_defaults(bos_dir):
    """Greedy decoding equals `generate(do_sample=False)` with HF's defaults (start id, EOS, padding);
    sampling at temperature 0 too, and a beam of 1 (not stopping at EOS) up to each row's EOS."""
    model, folder = bos_dir
    ours = hf.load_model(folder)
    assert ours.decoder_start_id == BOS
    assert "EncoderDecoderModel.decoder_start_id = 2" in hf.model_gin(ours).splitlines()
    length = 6
    enc, _ = random_inputs(VOCAB, seed=3)
    with torch.no_grad():
        generated = model.generate(input_ids=torch.tensor(enc, dtype=torch.long),
                                   attention_mask=torch.tensor(enc > 0, dtype=torch.long), do_sample=False,
                                   max_new_tokens=length).numpy()
    assert (generated[:, 0] == BOS).all()
    network, _ = hf.from_pretrained(folder)

    def predict(decoder, config: DecodeConfig) -> np.ndarray:
        run = nnx.jit(lambda m, e: decoder.predict_batch(m, {"encoder_input_tokens": e}, max_decode_length=length,
                                                         decode=config, rng=jnp.zeros((2,), jnp.uint32)))
        return np.asarray(run(network, jnp.asarray(enc)))

    expected = padded(generated[:, 1:], length)
    assert 0 < (expected == 1).any(axis=1).sum() < len(expected)  # some rows stop early (EOS 1), some do not
    np.testing.assert_array_equal(predict(ours, DecodeConfig()), expected)
    np.testing.assert_array_equal(predict(ours, DecodeConfig("sample", temperature=0.0)), expected)
    until_eos = np.cumsum(np.cumsum(expected == 1, axis=1), axis=1) <= 1
    beam = predict(ours, DecodeConfig("beam", beam_size=1, eos_id=-1))
    np.testing.assert_array_equal(np.where(until_eos, beam, 0), expected)


def converted(model: EncoderDecoderModel, pack: bool) -> dict[str, np.ndarray]:
    """The model's feature converter over two examples (targets 3 and 2 tokens long), as one batch."""
    import tensorflow as tf

    examples = [{"inputs": [7, 8, 5, 1], "targets": [3, 9, 1]}, {"inputs": [8, 4, 9, 1], "targets": [4, 1]}]
    ds = tf.data.Dataset.from_generator(
        lambda: iter(examples), output_signature={k: tf.TensorSpec([None], tf.int32) for k in ("inputs", "targets")})
    features = list(model.feature_converter_cls(pack=pack)(ds, {"inputs": 10, "targets": 6}).as_numpy_iterator())
    return {name: np.stack([f[name] for f in features]) for name in features[0]}


def test_training_batches_start_with_the_start_id(bos_dir):
    """Packed and unpacked, plain and ranked converters: every target sequence's decoder inputs begin with the
    start id, and the teacher-forced logits equal HF's for the same `labels` (HF shifts them in from BOS)."""
    model, folder = bos_dir
    ours = hf.load_model(folder)
    unpacked = converted(ours, pack=False)
    np.testing.assert_array_equal(unpacked["decoder_input_tokens"], [[BOS, 3, 9, 1, 0, 0], [BOS, 4, 1, 0, 0, 0]])
    packed = converted(ours, pack=True)
    np.testing.assert_array_equal(packed["decoder_input_tokens"][0, :5], [BOS, 3, 9, BOS, 4])
    ranked = converted(EncoderDecoderModel(ours.config, reading_orders=True), pack=False)  # seqio's default start
    np.testing.assert_array_equal(ranked["decoder_input_tokens"], [[0, 3, 9, 1, 0, 0], [0, 4, 1, 0, 0, 0]])
    assert "encoder_attention_rank" in ranked

    network, _ = hf.from_pretrained(folder)
    logits = np.asarray(ours.network_logits(network, {k: jnp.asarray(v) for k, v in unpacked.items()}, None))
    labels = torch.tensor(np.where(unpacked["decoder_loss_weights"] > 0, unpacked["decoder_target_tokens"], -100))
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(unpacked["encoder_input_tokens"], dtype=torch.long),
                         attention_mask=torch.tensor(unpacked["encoder_input_tokens"] > 0, dtype=torch.long),
                         labels=labels.long()).logits.numpy()
    real = unpacked["decoder_loss_weights"] > 0
    assert np.abs(logits - expected)[real].max() < 1e-4


def test_export_writes_the_models_start_id(bos_dir, tmp_path):
    _, folder = bos_dir
    network, _ = hf.from_pretrained(folder)
    params = nnx.to_pure_dict(nnx.state(network, nnx.Param))
    hf.write_pretrained(params, hf.load_model(folder), tmp_path / "bos")
    written = json.loads((tmp_path / "bos" / "config.json").read_text())
    assert [written["decoder_start_token_id"], written["bos_token_id"], written["decoder"]["bos_token_id"]] == [BOS] * 3
    assert hf.load_model(tmp_path / "bos").decoder_start_id == BOS
    hf.write_pretrained(params, EncoderDecoderModel(network.config, decoder_start_id=5), tmp_path / "five")
    reloaded = transformers.T5GemmaForConditionalGeneration.from_pretrained(tmp_path / "five")
    assert reloaded.generation_config.decoder_start_token_id == 5
    assert reloaded.prepare_decoder_input_ids_from_labels(torch.tensor([[3, 1]])).tolist() == [[5, 3]]
    assert hf.load_model(tmp_path / "five").decoder_start_id == 5
    hf.save_pretrained(network, tmp_path / "saved", decoder_start_id=5)
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == json.loads(
        (tmp_path / "five" / "config.json").read_text())


def test_a_model_starting_elsewhere_than_its_hf_checkpoint_is_refused(bos_dir):
    _, folder = bos_dir
    wrong = EncoderDecoderModel(hf.load_model(folder).config)
    with pytest.raises(cli.UserError, match=(
        r"^CHECKPOINT_PATH: EncoderDecoderModel.decoder_start_id is 0 in the model config but 2 in .*config.json; "
        r"set --gin.EncoderDecoderModel.decoder_start_id=2 or use the model gin file")):
        checkpoints.load_checkpoint_params(wrong, f"hf:{folder}", partitioning.make_mesh({"data": -1}),
                                           partitioning.STANDARD_RULES)


def test_a_start_id_outside_the_vocabulary_is_named():
    config = T5GemmaConfig(vocab_size=VOCAB)
    with pytest.raises(ConfigError, match=r"^BartModel.decoder_start_id=96 must be a token id in \[0, 96\) "):
        BartModel(BartConfig(vocab_size=VOCAB), decoder_start_id=VOCAB)
    with pytest.raises(ConfigError, match=r"^EncoderDecoderModel.decoder_start_id=True must be a token id"):
        EncoderDecoderModel(config, decoder_start_id=True)
    assert EncoderDecoderModel(config, decoder_start_id=VOCAB - 1).decoder_start_id == VOCAB - 1


@pytest.mark.slow
def test_bad_start_ids_are_one_error_line(bos_dir, tmp_path):
    """Through the command line, each exits 2 with one line and writes nothing: a negative id (training the
    quickstart T5), and a start id other than the `hf:` checkpoint's (inference)."""
    model_dir = tmp_path / "run"
    result = run_cli("--gin_file=gin_configs/quickstart.gin", f"--gin.MODEL_DIR='{model_dir}'",
                     "--gin.EncoderDecoderModel.decoder_start_id=-1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: EncoderDecoderModel.decoder_start_id=-1 must be a token id in [0, 8192) (T5Config.vocab_size=8192).")
    assert "Traceback" not in result.stderr and not model_dir.exists()

    _, folder = bos_dir
    model_gin = tmp_path / "model.gin"
    model_gin.write_text(hf.model_gin(hf.load_model(folder)))
    (tmp_path / "inputs.txt").write_text("question: why?\n")
    output = tmp_path / "out" / "predictions.jsonl"
    result = run_cli("--gin_file=gin_configs/runs/infer.gin", f"--gin_file={model_gin}",
                     f"--gin.CHECKPOINT_PATH='hf:{folder}'", f"--gin.INFER_INPUT_FILE='{tmp_path / 'inputs.txt'}'",
                     "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 4}", f"--gin.INFER_OUTPUT_FILE='{output}'",
                     "--gin.EncoderDecoderModel.decoder_start_id=0", module="t5x_lite.infer")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: CHECKPOINT_PATH: EncoderDecoderModel.decoder_start_id is 0 in the model config but 2 in "
        f"{folder / 'config.json'}; set --gin.EncoderDecoderModel.decoder_start_id=2 or use the model gin file "
        "that tools/convert_hf.py writes for it.")
    assert "Traceback" not in result.stderr and not output.exists()
