"""The Python API (`t5x_lite.load`): the same parameters, predictions, scores and training as the command line's."""

from __future__ import annotations

import json
import runpy
import tempfile
from pathlib import Path

import gin
import jax
import numpy as np
import pytest

import t5x_lite
from t5x_lite import checkpoints, cli, partitioning
from t5x_lite import infer as infer_lib
from t5x_lite.models.seq2seq import EncoderDecoderModel
from t5x_lite.networks.t5 import T5Config
from t5x_lite.training import loop
from tests.test_finetune_eval_infer import TINY, parse
from tests.test_readme_example import readme_block

# The tiny T5 with one layer each side: the wiring, in fewer seconds of compiling.
ONE_LAYER = ("T5Config.num_encoder_layers = 1", "T5Config.num_decoder_layers = 1")
LENGTHS = {"inputs": 96, "targets": 12}
QUESTIONS = [
    {"inputs": "Who says \"to be or not to be\"? \\n Hamlet: To be or not to be.", "targets": "Hamlet"},
    {"inputs": "Who says \"hello\"? \\n Romeo: hello. Juliet: goodbye.", "targets": "Romeo"},
    {"inputs": "Who says \"goodbye\"? \\n Romeo: hello. Juliet: goodbye.", "targets": "Juliet"},
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny span-corruption run (2 steps) to load."""
    model_dir = tmp_path_factory.mktemp("pretrained")
    parse(["quickstart.gin"], f"MODEL_DIR = '{model_dir}'", "TRAIN_STEPS = 2", "BATCH_SIZE = 8",
          "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 8}", "train.eval_period = 0", "train.progress_bar = False", *ONE_LAYER)
    loop.train()
    gin.clear_config()
    return model_dir


@pytest.fixture(scope="module")
def model(pretrained) -> t5x_lite.api.Model:
    return t5x_lite.load(str(pretrained))


def cli_params(path: str) -> dict:
    """The parameters the command line's CHECKPOINT_PATH restore gives."""
    mesh = partitioning.make_mesh({"data": -1})
    one_layer = EncoderDecoderModel(T5Config(vocab_size=8192, d_model=128, num_heads=4, head_dim=32, d_ff=256,
                                             num_encoder_layers=1, num_decoder_layers=1))
    return checkpoints.load_checkpoint_params(one_layer, path, mesh, partitioning.logical_axis_rules())[1]


def assert_same_params(a: dict, b: dict) -> None:
    a, b = partitioning.named_leaves(jax.device_get(a)), partitioning.named_leaves(jax.device_get(b))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_load_takes_a_run_dir_a_step_folder_and_an_hf_folder(model, pretrained, tmp_path):
    assert_same_params(model.params, cli_params(str(pretrained)))
    step_folder = pretrained / "checkpoints" / "2"
    assert_same_params(t5x_lite.load(str(step_folder)).params, cli_params(str(step_folder)))
    assert model.feature_lengths == {"inputs": 32, "targets": 8}  # the run's TASK_FEATURE_LENGTHS
    model.save(f"hf:{tmp_path / 'hf'}")
    from_hf = t5x_lite.load(f"hf:{tmp_path / 'hf'}")
    assert_same_params(from_hf.params, model.params)
    assert type(from_hf.model) is type(model.model) and from_hf.model.config == model.model.config


def test_saved_checkpoint_predicts_and_scores_in_infer_as_in_the_api(model, tmp_path):
    saved = model.save(str(tmp_path / "saved"))
    inputs_file, output_file = tmp_path / "questions.jsonl", tmp_path / "predictions.jsonl"
    inputs_file.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    parse(["runs/infer.gin", TINY], f"CHECKPOINT_PATH = '{saved}'", f"INFER_INPUT_FILE = '{inputs_file}'",
          f"TASK_FEATURE_LENGTHS = {LENGTHS}", f"INFER_OUTPUT_FILE = '{output_file}'", *ONE_LAYER)
    infer_lib.infer()
    gin.clear_config()
    lines = [json.loads(line) for line in output_file.read_text().splitlines()]
    assert model.predict(QUESTIONS, feature_lengths=LENGTHS) == [line["prediction"] for line in lines]
    scores = model.score([q["inputs"] for q in QUESTIONS], [q["targets"] for q in QUESTIONS], feature_lengths=LENGTHS)
    np.testing.assert_allclose(scores, [line["score"] for line in lines], rtol=1e-5)
    assert_same_params(t5x_lite.load(str(saved)).params, model.params)


def gin_macros(model_dir: Path, *names: str) -> list:
    """Macro values of a run's config.gin."""
    gin.clear_config()
    cli.parse_gin([str(model_dir / "config.gin")], [])
    values = [gin.query_parameter(f"{name}/macro.value") for name in names]
    gin.clear_config()
    return values


def test_evaluate_gives_the_tasks_metrics(model):
    metrics = model.evaluate("bundled_qa_extractive", LENGTHS, gin=["make_evaluator.num_examples = 8"])
    assert set(metrics) == {"eval/bundled_qa_extractive/em", "eval/bundled_qa_extractive/f1"}


def test_bad_path_and_unknown_task_raise_the_command_lines_errors(model, tmp_path):
    with pytest.raises(cli.UserError) as error:
        t5x_lite.load(str(tmp_path / "nothing"))
    assert str(error.value) == (
        f"CHECKPOINT_PATH: No checkpoint found at '{tmp_path / 'nothing'}': expected a MODEL_DIR of a t5x_lite run, "
        "its `checkpoints` folder, or a step folder such as MODEL_DIR/checkpoints/1000.")
    with pytest.raises(cli.UserError, match=r"^Unknown task or mixture 'bundled_qa_extractiv'\. Did you mean "
                                            r"'bundled_qa_extractive'"):
        model.evaluate("bundled_qa_extractiv", LENGTHS)
    with pytest.raises(cli.UserError, match=r"^Example 0 has no target"):
        model.score(["a question", "another"], None)


def test_a_checkpoint_without_its_runs_config_and_a_second_save_are_refused(model, tmp_path):
    (tmp_path / "orphan" / "state").mkdir(parents=True)
    with pytest.raises(cli.UserError, match=r"^No config.gin found for the checkpoint .*orphan: load\(\) reads"):
        t5x_lite.load(str(tmp_path / "orphan"))
    with pytest.raises(cli.UserError, match=r"state exists already; save to a new folder\.$"):
        model.save(str(tmp_path / "orphan"))


@pytest.mark.slow
def test_readme_block_runs_and_trains_as_the_command_line(pretrained, tmp_path, monkeypatch):
    """The README's "Python API" block as written; its `train` (examples given as a list) runs the same task through
    the same gin as `python -m t5x_lite.train`: the same losses and parameters, which the object then holds."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "quickstart").symlink_to(pretrained)
    (tmp_path / "readme_api.py").write_text(readme_block("## Python API", "python"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # train()'s default MODEL_DIR goes in tmp_path
    trained = runpy.run_path(str(tmp_path / "readme_api.py"))["model"]
    assert (tmp_path / "runs" / "my_model" / "state").is_dir() and (tmp_path / "runs" / "my_model" / "config.gin").is_file()

    api_dir, cli_dir = Path(trained.checkpoint_path), tmp_path / "cli"
    task, lengths, steps = gin_macros(api_dir, "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS", "TRAIN_STEPS")
    parse(["runs/finetune.gin", TINY], f"MODEL_DIR = '{cli_dir}'", f"INITIAL_CHECKPOINT_PATH = '{pretrained}'",
          f"MIXTURE_OR_TASK_NAME = '{task}'", f"TASK_FEATURE_LENGTHS = {lengths}", f"TRAIN_STEPS = {steps}",
          "BATCH_SIZE = 8", "train.eval_period = 0", "train.progress_bar = False", *ONE_LAYER)
    loop.train()
    gin.clear_config()

    def losses(run: Path) -> list[float]:
        return [r["train/loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    assert losses(api_dir) and losses(api_dir) == losses(cli_dir)
    assert_same_params(trained.params, cli_params(str(cli_dir)))
