"""Fine-tuning from a checkpoint, evaluating it with task metrics, and writing predictions."""

from __future__ import annotations

import json
from pathlib import Path

import gin
import jax
import numpy as np
import pytest

from t5x_lite import checkpoints, config, partitioning
from t5x_lite import eval as eval_lib
from t5x_lite import infer as infer_lib
from t5x_lite import train as train_lib
from t5x_lite.models.seq2seq import EncoderDecoderModel
from t5x_lite.networks.t5 import T5Config
from tests.test_cli import run_cli

TINY = "models/t5_1_1/tiny.gin"
QA_LENGTHS = "{'inputs': 96, 'targets': 12}"


def parse(files, *bindings):
    gin.clear_config()
    config.parse_gin([str(config.GIN_CONFIGS_DIR / f) for f in files], list(bindings))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny span-corruption checkpoint (3 steps) to fine-tune from."""
    model_dir = tmp_path_factory.mktemp("pretrained")
    parse(["quickstart.gin"], f"MODEL_DIR = '{model_dir}'", "TRAIN_STEPS = 3", "BATCH_SIZE = 8",
          "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 16}", "train.eval_period = 0",
          "train.progress_bar = False")
    train_lib.train()
    gin.clear_config()
    return model_dir


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory) -> Path:
    model_dir = tmp_path_factory.mktemp("finetuned")
    parse(["runs/finetune.gin", TINY], f"MODEL_DIR = '{model_dir}'", f"INITIAL_CHECKPOINT_PATH = '{pretrained}'",
          "MIXTURE_OR_TASK_NAME = 'bundled_qa_extractive'", f"TASK_FEATURE_LENGTHS = {QA_LENGTHS}",
          "TRAIN_STEPS = 2", "BATCH_SIZE = 8", "train.eval_period = 2", "train.eval_steps = 1",
          "make_evaluator.num_examples = 8", "ModelRunner.batch_size = 8", "train.progress_bar = False",
          "train.best_metric = 'eval/bundled_qa_extractive/f1'")
    summary = train_lib.train()
    gin.clear_config()
    assert "eval/bundled_qa_extractive/f1" in summary and "eval/bundled_qa_extractive/em" in summary
    return model_dir


def tiny_model() -> EncoderDecoderModel:
    return EncoderDecoderModel(T5Config(vocab_size=8192, d_model=128, num_heads=4, head_dim=32, d_ff=256,
                                        num_encoder_layers=2, num_decoder_layers=2))


def test_initial_checkpoint_restores_params_exactly(pretrained):
    mesh = partitioning.make_mesh({"data": -1})
    rules = partitioning.logical_axis_rules()
    _, params = checkpoints.load_model_params(tiny_model(), str(pretrained), mesh, rules)
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(pretrained / "checkpoints", item_names=("state", "dataset")) as manager:
        saved = manager.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state["params"]
    restored, expected = jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(jax.device_get(saved))
    assert len(restored) == len(expected)  # (checkpoints key layers by str, the model by int)
    for a, b in zip(restored, expected):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_finetune_starts_a_fresh_optimizer_and_keeps_the_best(finetuned):
    steps = sorted(int(p.name) for p in (finetuned / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2]  # the step counter restarted (the pre-trained run ended at step 3)
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(finetuned / "checkpoints", item_names=("state", "dataset")) as manager:
        state = manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    assert int(state["opt_state"][0]["count"]) == 2  # fresh Adafactor state: 2 updates, not 5
    assert [p.name for p in (finetuned / "best").iterdir() if p.name.isdigit()] == ["2"]
    records = [json.loads(line) for line in (finetuned / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/bundled_qa_extractive/f1" in r for r in records)


def test_missing_initial_checkpoint(tmp_path):
    parse(["runs/finetune.gin", TINY], f"MODEL_DIR = '{tmp_path / 'run'}'", f"INITIAL_CHECKPOINT_PATH = '{tmp_path / 'nope'}'",
          "MIXTURE_OR_TASK_NAME = 'bundled_qa_extractive'", f"TASK_FEATURE_LENGTHS = {QA_LENGTHS}", "TRAIN_STEPS = 1")
    with pytest.raises(config.UserError, match=r"INITIAL_CHECKPOINT_PATH: No checkpoint found at .*nope"):
        train_lib.train()
    gin.clear_config()


def test_checkpoint_of_another_shape(pretrained, tmp_path):
    parse(["runs/finetune.gin", TINY], f"MODEL_DIR = '{tmp_path / 'run'}'", f"INITIAL_CHECKPOINT_PATH = '{pretrained}'",
          "T5Config.d_ff = 512", "MIXTURE_OR_TASK_NAME = 'bundled_qa_extractive'",
          f"TASK_FEATURE_LENGTHS = {QA_LENGTHS}", "TRAIN_STEPS = 1")
    with pytest.raises(config.UserError, match=r"Parameter decoder/layers/0/mlp/wi_0/kernel has shape \(128, 256\) in checkpoint .* but \(128, 512\)"):
        train_lib.train()
    gin.clear_config()


@pytest.mark.slow
def test_eval_cli_writes_metrics(finetuned, tmp_path):
    out = tmp_path / "eval"
    result = run_cli("--gin_file=runs/eval.gin", f"--gin_file={TINY}", f"--gin.CHECKPOINT_PATH='{finetuned}'",
                     "--gin.MIXTURE_OR_TASK_NAME='bundled_qa_yes_no'", f"--gin.TASK_FEATURE_LENGTHS={QA_LENGTHS}",
                     f"--gin.EVAL_OUTPUT_DIR='{out}'", "--gin.make_evaluator.num_examples=8",
                     module="t5x_lite.eval")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval/bundled_qa_yes_no/accuracy = " in result.stdout
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["step"] == 2 and 0.0 <= record["eval/bundled_qa_yes_no/accuracy"] <= 100.0


@pytest.mark.slow
def test_infer_cli_on_a_task_and_on_a_file(finetuned, tmp_path):
    out = tmp_path / "task.jsonl"
    result = run_cli("--gin_file=runs/infer.gin", f"--gin_file={TINY}", f"--gin.CHECKPOINT_PATH='{finetuned}'",
                     "--gin.MIXTURE_OR_TASK_NAME='bundled_qa_extractive'", f"--gin.TASK_FEATURE_LENGTHS={QA_LENGTHS}",
                     f"--gin.INFER_OUTPUT_FILE='{out}'", module="t5x_lite.infer")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 150  # the whole validation split
    assert set(lines[0]) == {"task", "inputs", "targets", "prediction", "score"}
    assert lines[0]["inputs"].startswith("who says") and lines[0]["score"] < 0
    inputs = tmp_path / "questions.txt"
    inputs.write_text("who says hello? \\n hello, said the king.\nis this a question?\n")
    out_file = tmp_path / "file.jsonl"
    gin.clear_config()
    parse(["runs/infer.gin", TINY], f"CHECKPOINT_PATH = '{finetuned}'", f"INFER_INPUT_FILE = '{inputs}'",
          f"TASK_FEATURE_LENGTHS = {QA_LENGTHS}", f"INFER_OUTPUT_FILE = '{out_file}'")
    assert infer_lib.infer() == 2
    gin.clear_config()
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert lines[1]["inputs"] == "is this a question?" and lines[1]["score"] is None


def test_infer_rejects_an_empty_input_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(config.UserError, match="is empty"):
        infer_lib.read_input_file(str(empty))


def test_infer_rejects_an_input_file_for_a_classifier(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("To be, or not to be\n")
    parse(["runs/infer.gin", "models/bert/tiny.gin"], "MODEL = @EncoderClassificationModel()",
          f"CHECKPOINT_PATH = '{tmp_path}'", f"INFER_INPUT_FILE = '{lines}'",
          "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 1}", f"INFER_OUTPUT_FILE = '{tmp_path / 'out.jsonl'}'")
    try:
        with pytest.raises(config.UserError, match="EncoderClassificationModel predicts for a task's examples.*MIXTURE_OR_TASK_NAME"):
            infer_lib.infer()
    finally:
        gin.clear_config()
    assert not (tmp_path / "out.jsonl").exists()


def test_eval_needs_a_task_with_metrics(pretrained, tmp_path):
    parse(["runs/eval.gin", TINY], f"CHECKPOINT_PATH = '{pretrained}'", "MIXTURE_OR_TASK_NAME = 'bundled_span_corruption'",
          "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 16}", f"EVAL_OUTPUT_DIR = '{tmp_path}'")
    with pytest.raises(config.UserError, match="defines no metric functions"):
        eval_lib.evaluate_checkpoint()
    gin.clear_config()
