"""The example recipes in gin_configs/examples/ and tools/pretraining_helps.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import seqio

from t5x_lite import checkpoints, cli
from t5x_lite import train as train_lib
from t5x_lite.data import registration
from t5x_lite.tasks import qa as qa_tasks
from tests.subprocess_env import subprocess_env

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "t5x_lite" / "data" / "bundled"
sys.path.insert(0, str(REPO / "tools"))

import pretraining_helps

TINY = "models/t5_1_1/tiny.gin"
LENGTHS = "{'inputs': 64, 'targets': 16}"


def parse(files, *bindings):
    gin.clear_config()
    cli.parse_gin(files, list(bindings))


def saved_params(model_dir: Path, step: int) -> dict:
    with ocp.CheckpointManager(model_dir / "checkpoints", item_names=("state", "dataset")) as manager:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state["params"]


def write_corpus(folder: Path) -> tuple[list[str], str]:
    """Two train files and a validation file of plain text (one document per line)."""
    folder.mkdir()
    lines = (BUNDLED / "validation.txt").read_text().splitlines()
    (folder / "part-0.txt").write_text("\n".join(lines[:50]) + "\n")
    (folder / "part-1.txt").write_text("\n".join(lines[50:90]) + "\n")
    (folder / "valid.txt").write_text("\n".join(lines[90:]) + "\n")
    return [str(folder / "part-*.txt")], str(folder / "valid.txt")


# ------------------------------------------------------------------ text_files_task


def test_text_files_task_registers_once_and_returns_the_name(tmp_path):
    train_files, valid = write_corpus(tmp_path / "corpus")
    name = registration.text_files_task(name="test_text_files_once", train_files=train_files, validation_files=valid)
    assert name == "test_text_files_once"
    task = seqio.get_mixture_or_task(name)
    assert task.source.list_shards("train") == [str(tmp_path / "corpus" / f"part-{i}.txt") for i in (0, 1)]
    assert task.source.list_shards("validation") == [valid]
    assert registration.text_files_task(name=name, train_files=train_files, validation_files=valid) == name
    assert seqio.get_mixture_or_task(name) is task  # same files: not registered again

    # Other files under the same name (a re-parsed config): the task follows them.
    registration.text_files_task(name=name, train_files=str(tmp_path / "corpus" / "part-0.txt"), validation_files=None)
    task = seqio.get_mixture_or_task(name)
    assert list(task.splits) == ["train"] and task.source.list_shards("train") == [str(tmp_path / "corpus" / "part-0.txt")]


def test_text_files_task_errors(tmp_path):
    train_files, valid = write_corpus(tmp_path / "corpus")
    with pytest.raises(ValueError, match="'bundled_span_corruption' is already registered"):
        registration.text_files_task(name="bundled_span_corruption", train_files=train_files, validation_files=valid)
    with pytest.raises(FileNotFoundError, match=r"no file matches .*nope\.txt.* for split 'validation'"):
        registration.text_files_task(name="test_text_files_missing", train_files=train_files,
                              validation_files=str(tmp_path / "nope.txt"))
    assert "test_text_files_missing" not in seqio.TaskRegistry.names()


# ------------------------------------------------------------------ gin_configs/examples


@gin.configurable("test_examples_probe")
def probe(value=gin.REQUIRED):
    """Evaluates a gin value (here the `@text_files_task()` macro) the way `train()` does."""
    return value


def test_dapt_gin_registers_the_task_named_in_gin(tmp_path):
    train_files, valid = write_corpus(tmp_path / "corpus")
    parse(["examples/dapt.gin", TINY], f"MODEL_DIR = '{tmp_path / 'dapt'}'", "INITIAL_CHECKPOINT_PATH = 'runs/quickstart'",
          f"DAPT_TRAIN_FILES = {train_files!r}", f"DAPT_VALIDATION_FILES = {valid!r}",
          "DAPT_TASK_NAME = 'test_dapt_parse'", "test_examples_probe.value = %MIXTURE_OR_TASK_NAME")
    cli.require_macros()
    assert gin.query_parameter("train.initial_checkpoint_path") is not None
    assert "test_dapt_parse" not in seqio.TaskRegistry.names()  # registered when the run starts
    assert probe() == "test_dapt_parse"
    task = seqio.get_mixture_or_task("test_dapt_parse")
    assert task.source.list_shards("validation") == [valid]
    assert gin.query_parameter("constant_schedule.learning_rate") == 1e-3
    gin.clear_config()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A 2-step span-corruption checkpoint of the tiny model."""
    model_dir = tmp_path_factory.mktemp("pretrained")
    parse(["quickstart.gin"], f"MODEL_DIR = '{model_dir}'", "TRAIN_STEPS = 2", "BATCH_SIZE = 8",
          f"TASK_FEATURE_LENGTHS = {LENGTHS}", "train.eval_period = 0", "train.progress_bar = False")
    train_lib.train()
    gin.clear_config()
    return model_dir


@pytest.mark.slow
def test_dapt_gin_continues_pretraining_on_the_gin_named_files(pretrained, tmp_path, monkeypatch):
    train_files, valid = write_corpus(tmp_path / "corpus")
    restored = {}
    real_restore = checkpoints.restore_params

    def spy(path, abstract, *args, **kwargs):
        params = real_restore(path, abstract, *args, **kwargs)
        restored[path] = jax.device_get(params)  # a copy: the train step donates the device buffers
        return params

    monkeypatch.setattr(checkpoints, "restore_params", spy)
    model_dir = tmp_path / "dapt"
    parse(["examples/dapt.gin", TINY], f"MODEL_DIR = '{model_dir}'", f"INITIAL_CHECKPOINT_PATH = '{pretrained}'",
          f"DAPT_TRAIN_FILES = {train_files!r}", f"DAPT_VALIDATION_FILES = {valid!r}",
          "DAPT_TASK_NAME = 'test_dapt_span_corruption'", "TRAIN_STEPS = 2", "BATCH_SIZE = 8",
          f"TASK_FEATURE_LENGTHS = {LENGTHS}", "train.eval_period = 2", "train.eval_steps = 1",
          "train.progress_bar = False")
    cli.require_macros()
    summary = train_lib.train()
    gin.clear_config()

    # The task was registered from the files named in gin, and evaluated on the validation file.
    task = seqio.get_mixture_or_task("test_dapt_span_corruption")
    assert task.source.list_shards("train") == [str(tmp_path / "corpus" / f"part-{i}.txt") for i in (0, 1)]
    assert task.source.list_shards("validation") == [valid]
    assert np.isfinite(summary["eval/loss"]) and "train/loss" in summary
    assert "text_files_task.train_files = %DAPT_TRAIN_FILES" in (model_dir / "config.gin").read_text()

    # The parameters came from the checkpoint (then took 2 small steps), the step counter restarted.
    assert list(restored) == [str(pretrained)]
    start = jax.tree.leaves(jax.device_get(saved_params(pretrained, 2)))
    for a, b in zip(jax.tree.leaves(restored[str(pretrained)]), start):
        np.testing.assert_array_equal(a, b)
    after = jax.tree.leaves(jax.device_get(saved_params(model_dir, 2)))
    assert sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    changes = [np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b**2)) + 1e-12) for a, b in zip(after, start)]
    assert 0 < max(changes) < 0.01  # 2 Adafactor steps at 1e-3 move each tensor by ~0.2% of its scale


def test_finetune_bundled_qa_gin_parses():
    parse(["examples/finetune_bundled_qa.gin", TINY], "MODEL_DIR = '/tmp/unused'", "INITIAL_CHECKPOINT_PATH = None")
    cli.require_macros()
    assert gin.query_parameter("MIXTURE_OR_TASK_NAME/macro.value") == "bundled_qa_mixture"
    assert gin.query_parameter("TASK_FEATURE_LENGTHS/macro.value") == {"inputs": 320, "targets": 64}
    assert gin.query_parameter("constant_schedule.learning_rate") == 1e-3
    gin.clear_config()


# ------------------------------------------------------------------ UL2


def test_ul2_gin_parses_and_pretraining_helps_names_it():
    parse(["examples/ul2_tiny_pretrain.gin"], "MODEL_DIR = '/tmp/unused'")
    cli.require_macros()
    assert gin.query_parameter("MIXTURE_OR_TASK_NAME/macro.value") == "bundled_ul2"
    assert gin.query_parameter("TRAIN_STEPS/macro.value") == 600
    gin.clear_config()
    assert pretraining_helps.PRETRAIN_GIN["ul2"] == "examples/ul2_tiny_pretrain.gin"
    assert pretraining_helps.parse_args(["--pretrain_objective", "ul2"]).pretrain_objective == "ul2"


@pytest.mark.slow
@pytest.mark.parametrize(
    "files,bindings",
    [
        (["examples/ul2_tiny_pretrain.gin"], []),  # encoder-decoder
        (["examples/prefix_lm_tiny_pretrain.gin"], ["MIXTURE_OR_TASK_NAME = 'bundled_ul2_prefix_lm'"]),  # decoder-only
    ],
)
def test_ul2_loss_falls_on_the_bundled_corpus(tmp_path, files, bindings):
    parse(files, f"MODEL_DIR = '{tmp_path / 'run'}'", "TRAIN_STEPS = 30", "BATCH_SIZE = 8",
          "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 64}", "train.log_period = 10", "train.eval_period = 0",
          "train.checkpoint_period = 1000", "train.progress_bar = False", *bindings)
    cli.require_macros()
    try:
        train_lib.train()
    finally:
        gin.clear_config()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    print(files[0], [f"{x:.3f}" for x in losses])
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5


# ------------------------------------------------------------------ tools/pretraining_helps.py


def test_small_task_is_a_seeded_subset(tmp_path):
    name, names, examples = pretraining_helps.register_small_task("extractive", 0.1, 0, tmp_path)
    assert (name, names, examples) == ("bundled_qa_extractive_10pct", ["bundled_qa_extractive_10pct"], 100)
    subset = (tmp_path / "extractive_train_10pct.jsonl").read_text().splitlines()
    full = (qa_tasks.QA_DIR / "extractive_train.jsonl").read_text().splitlines()
    assert len(subset) == 100 and set(subset) <= set(full)
    task = seqio.get_mixture_or_task(name)
    assert task.source.num_input_examples("train") == 100 and task.source.num_input_examples("validation") == 150
    pretraining_helps.register_small_task("extractive", 0.1, 0, tmp_path / "again")
    assert (tmp_path / "again" / "extractive_train_10pct.jsonl").read_text().splitlines() == subset  # same seed, same subset

    name, names, examples = pretraining_helps.register_small_task("mixture", 0.05, 0, tmp_path / "mix")
    assert name == "bundled_qa_mixture_5pct" and len(names) == 4 and examples == 30 + 40 + 60 + 50


@pytest.mark.slow
def test_pretraining_helps_smoke(tmp_path):
    env = subprocess_env()  # one CPU device, as a user runs it
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "pretraining_helps.py"), "--out_dir", "demo",  # relative to cwd
         "--pretrain_steps", "2", "--pretrain_batch_size", "8", "--finetune_steps", "2", "--batch_size", "8",
         "--eval_period", "2", "--eval_steps", "1", "--eval_examples", "8", "--small_fraction", "0.05",
         "--no_progress_bar"],
        check=False, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("metric", "pretrained", "scratch", "pretrained_small", "scratch_small", "settings"):
        assert key in summary
    assert summary["metric"] == summary["task_metric"] == "eval/bundled_qa_extractive/f1"
    for run in pretraining_helps.RUNS:
        assert 0 <= summary[run] == summary["task_metric_last"][run] <= 100 and np.isfinite(summary["eval_loss_last"][run])
        assert (tmp_path / "demo" / run / "metrics.jsonl").is_file()
    settings = summary["settings"]
    assert settings["finetune_steps"] == 2 and settings["pretrain_steps"] == 2 and settings["small_train_examples"] == 50
    assert settings["pretrain_objective"] == "bart_denoising"
    assert settings["learning_rate"] == 1e-3 and settings["optimizer"] == "adafactor"
    assert (tmp_path / "demo" / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "demo" / "results.json").read_text()) == summary
    # The pre-trained twin started from the pre-training run's parameters; the scratch twin from none.
    def run_config(run):
        return " ".join((tmp_path / "demo" / run / "config.gin").read_text().replace("\\\n", " ").split())

    assert f"INITIAL_CHECKPOINT_PATH = '{tmp_path / 'demo' / 'pretrain'}'" in run_config("pretrained")
    assert "INITIAL_CHECKPOINT_PATH = None" in run_config("scratch")
    assert "MIXTURE_OR_TASK_NAME = 'bundled_bart_denoising'" in run_config("pretrain")

    again = subprocess.run([sys.executable, str(REPO / "tools" / "pretraining_helps.py"), "--out_dir",
                            str(tmp_path / "demo")], check=False, capture_output=True, text=True, timeout=300,
                           env=env)
    assert again.returncode != 0 and "pass --overwrite" in again.stderr
