"""End to end: fine-tune a Hugging Face T5 selectively from `hf:`, convert with tools/convert_hf.py, export back;
fine-tune a classifier on a Hugging Face BERT masked LM from `hf:`."""

import json
import shutil
import sys
from pathlib import Path

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from t5x_lite import checkpoints, cli, hf
from t5x_lite import train as train_lib
from t5x_lite.training import freezing, train_state
from tests.hf.conftest import hf_logits, random_inputs

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import convert_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def random_t5_v1_1(folder: Path):
    """A tiny T5 v1.1 whose vocabulary covers the bundled tasks' 8100 ids."""
    torch.manual_seed(0)
    hf_config = transformers.T5Config(
        vocab_size=8192, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    )
    model = transformers.T5ForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.2)
    model.save_pretrained(folder)
    shutil.copy(REPO / "t5x_lite" / "data" / "bundled" / "spiece.model", folder / "spiece.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 100}))
    return model


def final_params(model_dir: Path, step: int) -> dict:
    with ocp.CheckpointManager(model_dir / "checkpoints", item_names=("state", "dataset")) as manager:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state["params"]


@pytest.mark.slow
def test_selective_finetune_from_hf_then_export(tmp_path):
    model = random_t5_v1_1(tmp_path / "hf")
    converted = convert_hf.main(["--hf_dir", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "converted")])
    model_gin = converted / "model.gin"
    assert "T5Config.feed_forward = 'gated-gelu'" in model_gin.read_text()
    assert f"get_vocabulary.spm_path = '{converted / 'spiece.model'}'" in model_gin.read_text()

    model_dir = tmp_path / "run"
    gin.clear_config()
    cli.parse_gin(
        ["examples/finetune_top_layers.gin", str(model_gin)],
        [f"MODEL_DIR = '{model_dir}'", f"INITIAL_CHECKPOINT_PATH = 'hf:{tmp_path / 'hf'}'", "TRAIN_STEPS = 2",
         "BATCH_SIZE = 8", "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 16}", "train.eval_period = 0",
         "selective.stages = None", "selective.trainable = ['top_k_decoder_layers=1', 'layer_norms']",
         "train.progress_bar = False"],
    )
    try:
        train_lib.train()
    finally:
        gin.clear_config()

    # Frozen parameters equal the HF weights (via the Orbax conversion) exactly; the selected ones moved.
    trained = final_params(model_dir, 2)
    original = final_params(converted, 0)
    trainable = freezing.select(trained, ["top_k_decoder_layers=1", "layer_norms"])
    for name, after, before in zip(freezing.param_paths(trained), jax.tree.leaves(trained), jax.tree.leaves(original)):
        assert np.array_equal(after, before) == (name not in trainable), name

    # The converted checkpoint serves as INITIAL_CHECKPOINT_PATH too, with the same parameters as `hf:`.
    ours = hf.load_model(tmp_path / "hf")
    _, abstract = train_state.network_graphdef(ours)
    from_orbax = checkpoints.restore_params(str(converted), nnx.to_pure_dict(abstract))
    from_hf = checkpoints.restore_params(f"hf:{tmp_path / 'hf'}", nnx.to_pure_dict(abstract), ours)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(from_orbax), jax.device_get(from_hf))

    # Export the fine-tuned run: transformers loads it and gives our logits.
    exported = convert_hf.main(["--to_hf", "--gin_file", str(model_gin), "--checkpoint", str(model_dir),
                                "--out_dir", str(tmp_path / "exported"), "--vocab_dir", str(converted)])
    gin.clear_config()
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(exported).eval()
    network, vocabulary = hf.from_pretrained(exported)
    text = "Who wrote Hamlet? <extra_id_0>"
    assert transformers.AutoTokenizer.from_pretrained(exported)(text).input_ids == [*vocabulary.encode(text), 1]
    enc, dec = random_inputs(8192)
    ours_logits = np.asarray(network(enc, dec))
    assert np.abs(ours_logits - hf_logits(reloaded, enc, dec)).max() < 1e-4
    assert np.abs(hf_logits(reloaded, enc, dec) - hf_logits(model, enc, dec)).max() > 1e-3  # it did train


@pytest.mark.slow
def test_train_a_classifier_from_an_hf_masked_lm(tmp_path):
    """The whole path: `python -m t5x_lite.train` with INITIAL_CHECKPOINT_PATH='hf:DIR' of a BertForMaskedLM
    shaped like models/bert/tiny.gin, fine-tuning `EncoderClassificationModel` on a bundled task."""
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(vocab_size=8192, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=512, max_position_embeddings=512)
    model = transformers.BertForMaskedLM(hf_config).eval()
    model.save_pretrained(tmp_path / "hf")
    gin.clear_config()
    cli.parse_gin(
        ["examples/bert_tiny_classify.gin"],
        [f"MODEL_DIR = '{tmp_path / 'run'}'", f"INITIAL_CHECKPOINT_PATH = 'hf:{tmp_path / 'hf'}'", "TRAIN_STEPS = 2",
         "BATCH_SIZE = 8", "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 1}", "train.eval_period = 0",
         "train.checkpoint_period = 2", "train.best_metric = None", "train.progress_bar = False"],
    )
    try:
        train_lib.train()
    finally:
        gin.clear_config()
    params = final_params(tmp_path / "run", 2)
    # Two warm-up steps move the loaded encoder by far less than its distance from a fresh initialisation.
    hf_kernel = model.bert.encoder.layer[1].intermediate.dense.weight.detach().numpy().T
    assert np.abs(params["layers"]["1"]["mlp"]["wi"]["kernel"] - hf_kernel).max() < 1e-3
    assert params["classifier"]["kernel"].shape == (128, 2)
