"""Fine-tuning from a checkpoint, evaluating it with task metrics, and writing predictions."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import gin
import jax
import numpy as np
import pytest

from t5x_lite import checkpoints, cli, partitioning
from t5x_lite import eval as eval_lib
from t5x_lite import infer as infer_lib
from t5x_lite.models.seq2seq import EncoderDecoderModel
from t5x_lite.networks.t5 import T5Config
from t5x_lite.training import loop
from tests import sensitive_eval_task
from tests.test_cli import run_cli

T = TypeVar("T")
TINY = "models/t5_1_1/tiny.gin"
QA_LENGTHS = "{'inputs': 96, 'targets': 12}"


def parse(files, *bindings):
    gin.clear_config()
    cli.parse_gin([str(cli.GIN_CONFIGS_DIR / f) for f in files], list(bindings))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny span-corruption checkpoint (3 steps) to fine-tune from."""
    model_dir = tmp_path_factory.mktemp("pretrained")
    parse(["quickstart.gin"], f"MODEL_DIR = '{model_dir}'", "TRAIN_STEPS = 3", "BATCH_SIZE = 8",
          "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 16}", "train.eval_period = 0",
          "train.progress_bar = False")
    loop.train()
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
    summary = loop.train()
    gin.clear_config()
    assert "eval/bundled_qa_extractive/f1" in summary and "eval/bundled_qa_extractive/em" in summary
    return model_dir


def tiny_model() -> EncoderDecoderModel:
    return EncoderDecoderModel(T5Config(vocab_size=8192, d_model=128, num_heads=4, head_dim=32, d_ff=256,
                                        num_encoder_layers=2, num_decoder_layers=2))


def test_initial_checkpoint_restores_params_exactly(pretrained):
    mesh = partitioning.make_mesh({"data": -1})
    rules = partitioning.logical_axis_rules()
    _, params = checkpoints.load_checkpoint_params(tiny_model(), str(pretrained), mesh, rules)
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
    with pytest.raises(cli.UserError, match=r"INITIAL_CHECKPOINT_PATH: No checkpoint found at .*nope"):
        loop.train()
    gin.clear_config()


def test_checkpoint_of_another_shape(pretrained, tmp_path):
    parse(["runs/finetune.gin", TINY], f"MODEL_DIR = '{tmp_path / 'run'}'", f"INITIAL_CHECKPOINT_PATH = '{pretrained}'",
          "T5Config.d_ff = 512", "MIXTURE_OR_TASK_NAME = 'bundled_qa_extractive'",
          f"TASK_FEATURE_LENGTHS = {QA_LENGTHS}", "TRAIN_STEPS = 1")
    with pytest.raises(cli.UserError, match=r"Parameter decoder/layers/0/mlp/wi_0/kernel has shape \(128, 256\) in checkpoint .* but \(128, 512\)"):
        loop.train()
    gin.clear_config()


def cli_then_api(module: str, files: list[str], bindings: list[str], cli_binding: str, api_binding: str,
                 api: Callable[[], T]) -> tuple[subprocess.CompletedProcess, T]:
    """`python -m MODULE` with the gin files, `bindings` and `cli_binding`, then `api()` in this process with the
    files, `bindings` and `api_binding` (another output path). The command runs on as many simulated devices as
    this process has, so both compute alike."""
    args = [f"--gin_file={f}" for f in files] + [f"--gin.{b}" for b in (*bindings, cli_binding)]
    result = run_cli(*args, module=module, devices=jax.device_count())
    assert result.returncode == 0, result.stderr[-3000:]
    parse(files, *bindings, api_binding)
    try:
        return result, api()
    finally:
        gin.clear_config()


@pytest.mark.slow
def test_eval_cli_writes_the_metrics_of_the_python_api(finetuned, tmp_path):
    """Metrics that move with every score and prediction (`tests/sensitive_eval_task.py`), from the command and
    in-process: equal to the last bit."""
    bindings = [f"CHECKPOINT_PATH='{finetuned}'", "MIXTURE_OR_TASK_MODULE='tests.sensitive_eval_task'",
                f"MIXTURE_OR_TASK_NAME='{sensitive_eval_task.NAME}'", f"TASK_FEATURE_LENGTHS={QA_LENGTHS}",
                "make_evaluator.num_examples=16"]
    result, metrics = cli_then_api("t5x_lite.eval", ["runs/eval.gin", TINY], bindings, f"EVAL_OUTPUT_DIR='{tmp_path / 'cli'}'",
                                   f"EVAL_OUTPUT_DIR='{tmp_path / 'api'}'", eval_lib.evaluate_checkpoint)
    task = sensitive_eval_task.NAME
    assert set(metrics) == {f"eval/{task}/mean_log_likelihood", f"eval/{task}/mean_prediction_chars"}
    assert metrics[f"eval/{task}/mean_log_likelihood"] < 0 < metrics[f"eval/{task}/mean_prediction_chars"]
    record = json.loads((tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()[0])
    assert record.pop("step") == 2  # the checkpoint's step
    record.pop("time")
    assert record == metrics
    assert result.stdout.startswith(f"Evaluating checkpoint step 2 ({finetuned / 'checkpoints' / '2'}) on {task}.\n")
    assert "\r" not in result.stderr  # no eval bar where stderr is a pipe
    assert "cuInit" not in result.stderr and "absl::InitializeLog" not in result.stderr  # TF's C++ start-up logs
    printed = dict(line.split(" = ") for line in result.stdout.splitlines() if line.startswith("eval/"))
    assert printed == {name: f"{value:.4f}" for name, value in metrics.items()}


def infer_both(tmp_path: Path, name: str, bindings: list[str]) -> tuple[list[dict], list[dict], int]:
    """(the CLI's output lines, the Python API's, the count `infer()` returned) for the same config."""
    cli_out, api_out = tmp_path / f"{name}_cli.jsonl", tmp_path / f"{name}_api.jsonl"
    _, written = cli_then_api("t5x_lite.infer", ["runs/infer.gin", TINY], bindings, f"INFER_OUTPUT_FILE='{cli_out}'",
                              f"INFER_OUTPUT_FILE='{api_out}'", infer_lib.infer)
    return [json.loads(line) for line in cli_out.read_text().splitlines()], [
        json.loads(line) for line in api_out.read_text().splitlines()], written


def assert_same_predictions(cli_lines: list[dict], api_lines: list[dict]) -> None:
    """The same examples, texts and predictions; the same scores up to float32 rounding."""
    def without_score(lines):
        return [{k: v for k, v in line.items() if k != "score"} for line in lines]

    assert without_score(cli_lines) == without_score(api_lines)
    cli_scores, api_scores = [line["score"] for line in cli_lines], [line["score"] for line in api_lines]
    assert [s is None for s in cli_scores] == [s is None for s in api_scores]
    np.testing.assert_allclose([s for s in cli_scores if s is not None], [s for s in api_scores if s is not None],
                               rtol=1e-5)


@pytest.mark.slow
def test_infer_cli_writes_the_predictions_of_the_python_api(finetuned, tmp_path):
    common = [f"CHECKPOINT_PATH='{finetuned}'", f"TASK_FEATURE_LENGTHS={QA_LENGTHS}"]
    lines, api_lines, written = infer_both(tmp_path, "task", [*common, "MIXTURE_OR_TASK_NAME='bundled_qa_extractive'"])
    assert written == len(lines) == 150  # the whole validation split
    assert set(lines[0]) == {"task", "inputs", "targets", "prediction", "score"}
    assert lines[0]["inputs"].startswith("who says") and lines[0]["score"] < 0
    assert_same_predictions(lines, api_lines)

    inputs = tmp_path / "questions.txt"
    inputs.write_text("who says hello? \\n hello, said the king.\nis this a question?\n")
    lines, api_lines, written = infer_both(tmp_path, "file", [*common, f"INFER_INPUT_FILE='{inputs}'"])
    assert written == len(lines) == 2
    assert lines[1]["inputs"] == "is this a question?" and lines[1]["score"] is None
    assert_same_predictions(lines, api_lines)


def test_infer_rejects_an_empty_input_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(cli.UserError, match="is empty"):
        infer_lib.read_input_file(str(empty))


def test_infer_rejects_an_input_file_for_a_classifier(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("To be, or not to be\n")
    parse(["runs/infer.gin", "models/bert/tiny.gin"], "MODEL = @EncoderClassificationModel()",
          f"CHECKPOINT_PATH = '{tmp_path}'", f"INFER_INPUT_FILE = '{lines}'",
          "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 1}", f"INFER_OUTPUT_FILE = '{tmp_path / 'out.jsonl'}'")
    try:
        with pytest.raises(cli.UserError, match="EncoderClassificationModel predicts for a task's examples.*MIXTURE_OR_TASK_NAME"):
            infer_lib.infer()
    finally:
        gin.clear_config()
    assert not (tmp_path / "out.jsonl").exists()


def test_eval_needs_a_task_with_metrics(pretrained, tmp_path):
    parse(["runs/eval.gin", TINY], f"CHECKPOINT_PATH = '{pretrained}'", "MIXTURE_OR_TASK_NAME = 'bundled_span_corruption'",
          "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 16}", f"EVAL_OUTPUT_DIR = '{tmp_path}'")
    with pytest.raises(cli.UserError, match="defines no metric functions"):
        eval_lib.evaluate_checkpoint()
    gin.clear_config()
