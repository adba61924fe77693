"""T5 / mT5 import and export against Hugging Face `transformers` (PyTorch, CPU) on random tiny models."""

import copy
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from t5x_lite import hf, partitioning
from t5x_lite.models.seq2seq import EncoderDecoderModel
from t5x_lite.networks.t5 import T5Config
from t5x_lite.training import train_state
from tests.hf.conftest import TINY, VARIANTS, hf_logits, random_inputs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def our_logits(network, enc, dec) -> np.ndarray:
    return np.asarray(network(jnp.asarray(enc), jnp.asarray(dec)))  # eager: quicker than compiling, for tiny models


@pytest.mark.parametrize("kernels", ["cpu_tuned", "xla"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_imported_logits_match_hf(hf_t5_dirs, variant, kernels):
    model, folder = hf_t5_dirs[variant]
    network, vocabulary = hf.from_pretrained(folder, kernels=kernels)
    assert vocabulary is None  # no tokenizer files in this directory
    assert network.config.feed_forward == VARIANTS[variant][1]
    assert network.config.tie_word_embeddings == (variant == "t5_v1_0")
    assert network.config.num_decoder_layers == TINY["num_decoder_layers"]
    enc, dec = random_inputs(TINY["vocab_size"])
    expected = hf_logits(model, enc, dec)
    logits = our_logits(network, enc, dec)
    assert logits.dtype == np.float32 and logits.shape == (3, 9, TINY["vocab_size"])
    max_abs_diff = float(np.abs(logits - expected).max())
    print(f"{variant}: max |logits - HF| = {max_abs_diff:.2e} (max |logit| {np.abs(expected).max():.1f})")
    assert max_abs_diff < 1e-4


@pytest.mark.parametrize("variant,eos_scale", [("t5_v1_0", 2.0), ("t5_v1_1", 3.0)])
def test_greedy_decode_matches_hf_generate(hf_t5_dirs, variant, eos_scale, tmp_path):
    # A larger EOS row makes some rows stop early, so the padding after EOS is compared too.
    model = copy.deepcopy(hf_t5_dirs[variant][0])
    with torch.no_grad():
        model.lm_head.weight[1] *= eos_scale
    model.save_pretrained(tmp_path)
    network, _ = hf.from_pretrained(tmp_path)
    length = 8
    enc, _ = random_inputs(TINY["vocab_size"], seed=3)
    with torch.no_grad():
        generated = model.generate(
            input_ids=torch.tensor(enc, dtype=torch.long), attention_mask=torch.tensor(enc > 0, dtype=torch.long),
            do_sample=False, num_beams=1, max_new_tokens=length, decoder_start_token_id=0, eos_token_id=1,
            pad_token_id=0, use_cache=False,  # transformers 5.23's cache breaks with num_decoder_layers != num_layers
        ).numpy()[:, 1:]  # drop the decoder start token
    expected = np.zeros((enc.shape[0], length), np.int32)
    expected[:, : generated.shape[1]] = generated
    stopped = [row for row in expected if 1 in row.tolist()]
    assert 0 < len(stopped) < len(expected) and any(row.tolist().index(1) > 0 for row in stopped)
    predict = nnx.jit(
        lambda m, e: hf.load_model(tmp_path).predict_batch(m, {"encoder_input_tokens": e}, max_decode_length=length)
    )
    np.testing.assert_array_equal(np.asarray(predict(network, jnp.asarray(enc))), expected)


@pytest.mark.parametrize("variant", ["t5_v1_0", "t5_v1_1"])
def test_export_round_trips_through_transformers(hf_t5_dirs, variant, tmp_path):
    model, folder = hf_t5_dirs[variant]
    network, _ = hf.from_pretrained(folder)
    hf.save_pretrained(network, tmp_path / "exported")
    reloaded = type(model).from_pretrained(tmp_path / "exported").eval()
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    for name, value in reloaded.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), original[name], err_msg=name)
    enc, dec = random_inputs(TINY["vocab_size"], seed=1)
    np.testing.assert_array_equal(hf_logits(reloaded, enc, dec), hf_logits(model, enc, dec))
    # ...and back: the same parameters again.
    again, _ = hf.from_pretrained(tmp_path / "exported")
    jax.tree.map(np.testing.assert_array_equal, nnx.state(again, nnx.Param), nnx.state(network, nnx.Param))


def test_sharded_safetensors_and_pytorch_bin_load_the_same_params(hf_t5_dirs, tmp_path):
    model, folder = hf_t5_dirs["t5_v1_1"]
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((folder / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    reference = nnx.state(hf.from_pretrained(folder)[0], nnx.Param)
    for name in ("sharded", "bin"):
        params = nnx.state(hf.from_pretrained(tmp_path / name)[0], nnx.Param)
        jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_bfloat16_safetensors_load_as_float32(hf_t5_dirs, tmp_path):
    model = copy.deepcopy(hf_t5_dirs["t5_v1_1"][0]).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    network, _ = hf.from_pretrained(tmp_path)
    kernel = network.encoder.layers[0].mlp.wo.kernel[...]
    expected = model.encoder.block[0].layer[1].DenseReluDense.wo.weight.detach().float().numpy().T
    assert kernel.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(kernel), expected)


def test_restore_params_onto_a_sharded_scanned_model(hf_t5_dirs):
    """The `hf:` INITIAL_CHECKPOINT_PATH path: params land on the mesh shardings, stacked for scan_layers."""
    model, folder = hf_t5_dirs["t5_v1_1"]
    config = hf.open_checkpoint(folder).config
    ours = EncoderDecoderModel(T5Config(**{**config.__dict__, "scan_layers": True, "dropout_rate": 0.1}))
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), partitioning.MESH_AXES)
    graphdef, abstract = train_state.network_graphdef(ours)
    shardings = partitioning.param_shardings(abstract, mesh, partitioning.STANDARD_RULES)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(abstract), shardings
    )
    params = hf.restore_params(str(folder), target, ours)
    kernel = params["encoder"]["layers"]["mlp"]["wi_0"]["kernel"]
    assert kernel.shape == (2, 32, 48) and kernel.sharding == shardings["encoder"]["layers"]["mlp"]["wi_0"]["kernel"]
    enc, dec = random_inputs(TINY["vocab_size"])
    logits = our_logits(nnx.merge(graphdef, params), enc, dec)
    assert np.abs(logits - hf_logits(model, enc, dec)).max() < 1e-4


def test_restore_params_names_a_mismatching_config_field(hf_t5_dirs):
    _, folder = hf_t5_dirs["t5_v1_1"]
    config = hf.open_checkpoint(folder).config
    wrong = EncoderDecoderModel(T5Config(**{**config.__dict__, "feed_forward": "relu"}))
    _, abstract = train_state.network_graphdef(wrong)
    with pytest.raises(ValueError, match=r"T5Config.feed_forward is 'relu' in the model config but 'gated-gelu'"):
        hf.restore_params(str(folder), nnx.to_pure_dict(abstract), wrong)
    with pytest.raises(ValueError, match=r"has parameters this model lacks: \['decoder/layers/0/mlp/wi_0/kernel'"):
        hf.restore_params(str(folder), nnx.to_pure_dict(abstract))  # no model: caught by the params


def test_clear_errors(hf_t5_dirs, tmp_path, monkeypatch):
    _, folder = hf_t5_dirs["t5_v1_1"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        hf.from_pretrained(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"model_type='llama'.*supported model types: .*mt5, t5"):
        hf.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "gated-relu"}))
    with pytest.raises(FileNotFoundError, match="has no weights: expected one of model.safetensors"):
        hf.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    with pytest.raises(ValueError, match="feed_forward_proj=.gated-relu."):
        hf.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"Cannot override \['d_model'\]"):
        hf.from_pretrained(folder, d_model=64)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if PyTorch were not installed
    with pytest.raises(ImportError, match=r"PyTorch pickle; reading it needs PyTorch: pip install torch==2.13.0"):
        hf.from_pretrained(tmp_path)


def test_extra_head_tensor_is_rejected(hf_t5_dirs, tmp_path):
    _, folder = hf_t5_dirs["t5_v1_0"]
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["classification_head.dense.weight"] = np.zeros((4, 32), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="tensors a T5ForConditionalGeneration does not: .*classification_head"):
        hf.from_pretrained(tmp_path)


def test_hf_prefix_in_checkpoint_paths(hf_t5_dirs):
    """CHECKPOINT_PATH / INITIAL_CHECKPOINT_PATH = 'hf:DIR' go through checkpoints.restore_params."""
    from t5x_lite import checkpoints, cli

    model, folder = hf_t5_dirs["t5_v1_0"]
    ours = hf.load_model(folder)
    mesh = partitioning.make_mesh({"data": -1})
    graphdef, params = checkpoints.load_checkpoint_params(ours, f"hf:{folder}", mesh, partitioning.STANDARD_RULES)
    enc, dec = random_inputs(TINY["vocab_size"])
    assert np.abs(our_logits(nnx.merge(graphdef, params), enc, dec) - hf_logits(model, enc, dec)).max() < 1e-4
    wrong = EncoderDecoderModel(T5Config(**{**ours.config.__dict__, "d_ff": 64}))
    with pytest.raises(cli.UserError, match=r"CHECKPOINT_PATH: T5Config.d_ff is 64 in the model config but 48 in "):
        checkpoints.load_checkpoint_params(wrong, f"hf:{folder}", mesh, partitioning.STANDARD_RULES)
