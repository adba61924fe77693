"""A quiet, informative start-up: no C++ log lines, one summary line first, checkpoints reported when committed,
no progress bars in redirected output; and the smaller traps (a small split, a finished run, the tools)."""

from __future__ import annotations

import io
import logging as std_logging
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gin
import jax
import numpy as np
import pytest
import tensorflow as tf
from absl import logging

from t5x_lite import checkpoints, cli, evaluation, partitioning
from t5x_lite.data.position import DataIterator, DataLayout
from t5x_lite.models.seq2seq import EncoderDecoderModel
from t5x_lite.networks.t5 import T5Config
from t5x_lite.training import actions, loop, optimizers, train_state
from tests.subprocess_env import subprocess_env

REPO = Path(__file__).resolve().parent.parent
# What TensorFlow's and XLA's C++ code prints at start-up on a CPU machine (absl's prefix is e.g. `E0000 00:00:...`).
NATIVE_LOG_LINE = re.compile(r"absl::InitializeLog|^[IWEF]\d{4} \d\d:|cuInit|cudart_stub|cuda_platform|oneDNN", re.MULTILINE)
SEQIO_NOISE = ("not cached so using number of input examples", "will be removed during packing")
QUICK_RUN = ["--gin_file=gin_configs/quickstart.gin", "--gin.TRAIN_STEPS=4", "--gin.train.log_period=2",
             "--gin.train.checkpoint_period=2", "--gin.train.eval_period=4", "--gin.train.eval_steps=1"]


def run_as_user(*args: str, module: str = "t5x_lite.train", cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` (or a script) as a user runs it: without the tests' TF_CPP_MIN_LOG_LEVEL."""
    env = {k: v for k, v in subprocess_env().items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    command = [sys.executable, *(args if module == "" else ["-m", module, *args])]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def assert_quiet(console: str) -> None:
    """No C++ start-up logs, no seqio notices a user cannot act on, no progress-bar carriage returns or escapes."""
    assert not NATIVE_LOG_LINE.search(console), console[-3000:]
    assert not any(noise in console for noise in SEQIO_NOISE), console[-3000:]
    assert "\r" not in console and "\x1b[" not in console, console[-3000:]


@pytest.mark.slow
def test_quickstart_console_starts_with_the_summary_and_is_quiet(tmp_path):
    model_dir = tmp_path / "quickstart"
    result = run_as_user(*QUICK_RUN, f"--gin.MODEL_DIR='{model_dir}'")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_quiet(result.stdout + result.stderr)
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "Training T5 (EncoderDecoderModel, T5Config d_model=128 num_heads=4 head_dim=32 d_ff=256 num_encoder_layers=2 "
        "num_decoder_layers=2 vocab_size=8192) 2.9M params on bundled_span_corruption (inputs=128 targets=32), "
        f"batch 32, TRAIN_STEPS 4, mesh data=1 fsdp=1 tensor=1, MODEL_DIR {model_dir}. Fresh start."
    )
    committed = [line.split(":")[0] for line in lines if " committed: " in line]
    assert committed == ["Checkpoint 2 committed", "Checkpoint 4 committed"]

    again = run_as_user(*QUICK_RUN, f"--gin.MODEL_DIR='{model_dir}'")  # the same command on the finished run
    assert again.returncode == 0, again.stderr[-3000:]
    assert_quiet(again.stdout + again.stderr)
    lines = again.stdout.splitlines()
    assert lines[0].endswith(f"Resumed from {model_dir / 'checkpoints'} at step 4.")
    assert lines[-1] == "The run is complete at step 4 (TRAIN_STEPS=4); raise --gin.TRAIN_STEPS to continue it."
    assert not any(line.startswith("step ") for line in lines)


def test_native_logs_are_held_and_replayed_on_an_error(capfd):
    with cli.native_logs_held():
        os.write(2, b"E0000 C++ text\n")
    assert capfd.readouterr().err == ""
    with pytest.raises(ImportError), cli.native_logs_held():
        os.write(2, b"why it failed\n")
        raise ImportError("no such library")
    assert capfd.readouterr().err == "why it failed\n"


def test_native_logs_pass_with_verbosity_1(capfd):
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.DEBUG)
    try:
        with cli.native_logs_held():
            os.write(2, b"I0000 shown\n")
    finally:
        logging.set_verbosity(verbosity)
    assert capfd.readouterr().err == "I0000 shown\n"


def test_verbosity_is_read_from_the_command_line_before_absl_parses_it():
    """The entry points that import TensorFlow at import time decide before absl has parsed the flags."""
    assert [cli.verbosity_in(argv) for argv in (
        ["eval", "--verbosity=1"], ["eval", "-v", "2"], ["eval", "--gin_file=a.gin", "--gin.X=1"], ["pytest", "-v", "t.py"],
    )] == [1, 2, -1, -1]


def test_only_seqios_unactionable_warnings_are_filtered():
    seen: list[str] = []
    handler = Collect(seen)
    absl_logger = logging.get_absl_logger()
    absl_logger.addHandler(handler)
    cli.filter_unactionable_warnings()
    try:
        logging.warning("Task '%s' not cached so using number of input examples instead of preprocessed examples to "
                        "compute rate.", "t")
        logging.warning("Features not in `features_length` will be removed during packing: %s", {"x"})
        logging.warning("Task '%s' has something else to say.", "t")
    finally:
        absl_logger.removeHandler(handler)
        absl_logger.removeFilter(cli._actionable)
    assert seen == ["Task 't' has something else to say."]


class Collect(std_logging.Handler):
    """Keeps the messages of the records it gets."""

    def __init__(self, seen: list[str]):
        super().__init__()
        self.seen = seen

    def emit(self, record: std_logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_only_in_a_terminal(monkeypatch, terminal):
    """The train bar and the eval sub-bar draw on a terminal; redirected, they leave nothing behind."""
    stream = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    progress = actions.Progress(4, 0, enabled=True)
    progress.advance({"train/loss": 1.0})
    progress.close()
    runner = object.__new__(evaluation.ModelRunner)  # only its batching, which draws the eval bar
    runner.batch_size = 2
    batches = list(runner._batches(tf.data.Dataset.from_tensor_slices((np.arange(3), {"x": np.ones((3, 2))}))))
    assert [rows for _, _, rows in batches] == [2, 1]
    drawn = stream.getvalue()
    assert ("train:" in drawn and "eval:" in drawn) if terminal else drawn == ""


def tiny_state() -> train_state.TrainState:
    config = T5Config(vocab_size=64, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=1,
                      num_decoder_layers=1)
    tx = optimizers.adafactor(optimizers.constant_schedule(1e-2))
    mesh = partitioning.make_mesh({"data": -1})
    state, _, _ = train_state.create_train_state(EncoderDecoderModel(config), tx, 0, mesh,
                                                 partitioning.logical_axis_rules())
    return state.replace(step=jax.numpy.asarray(2, state.step.dtype))


def test_checkpoint_is_reported_at_the_first_step_boundary_after_its_commit(tmp_path, monkeypatch):
    reported: list[str] = []
    monkeypatch.setattr(actions, "report", reported.append)
    iterator = DataIterator(lambda layout, shard: tf.data.Dataset.range(10).map(lambda x: {"x": x}),
                            DataLayout("shard_info", 1, 1), 0, 1)
    checkpoint = actions.Checkpoint(checkpoints.checkpoint_manager(str(tmp_path)), iterator, 2, str(tmp_path))
    checkpoint(actions.Tick(2, last=False, stopping=False), tiny_state())
    assert not reported or checkpoints.committed_steps(str(tmp_path)) == [2]  # never before the commit
    deadline = time.time() + 120
    while checkpoint.manager.is_saving_in_progress() and time.time() < deadline:
        time.sleep(0.01)
    checkpoint.poll()  # the next step boundary
    assert len(reported) == 1
    assert re.fullmatch(rf"Checkpoint 2 committed: \d+\.\d MiB in {re.escape(str(tmp_path))}/checkpoints/2", reported[0])
    checkpoint.close()
    assert len(reported) == 1  # not again at exit


def test_parameter_counts_read_short():
    assert [loop.human_count(n) for n in (950, 2_912_384, 60_506_624, 2_850_000_000)] == ["950", "2.9M", "60.5M", "2.9B"]


FORTY_EXAMPLES = textwrap.dedent("""
    import seqio
    import tensorflow as tf

    from t5x_lite.data import pipeline

    def source(split, shuffle_files, seed=None):
        count = 400 if split == "train" else 40
        return tf.data.Dataset.from_tensor_slices({"inputs": [f"question {i}: what is it?" for i in range(count)],
                                                   "targets": [f"answer {i}" for i in range(count)]})

    seqio.TaskRegistry.add(
        "forty_examples", source=seqio.FunctionDataSource(source, splits=["train", "validation"]),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features=pipeline.get_mixture_or_task("bundled_qa_extractive").output_features,
    )
""")


@pytest.mark.slow
def test_a_small_validation_split_says_what_packing_did(tmp_path):
    (tmp_path / "forty_examples.py").write_text(FORTY_EXAMPLES)
    result = run_as_user(f"--gin_file={REPO / 'gin_configs' / 'quickstart.gin'}", "--gin.MODEL_DIR='run'",
                         "--gin.MIXTURE_OR_TASK_MODULE='forty_examples'", "--gin.MIXTURE_OR_TASK_NAME='forty_examples'",
                         cwd=tmp_path)
    assert result.returncode == 2
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    match = re.fullmatch(
        r"error: Split 'validation' of 'forty_examples' gave no full batch of 32 examples: packing put its 40 examples "
        r"into (\d+) rows of \{'inputs': 128, 'targets': 32\}\. Use a BATCH_SIZE of at most \1 \(evaluation reads up "
        r"to train\.eval_steps=10 batches of it\), add examples to the split, or set --gin\.train\.eval_period=0 to "
        r"skip evaluation\.", error)
    assert match and 1 <= int(match.group(1)) < 32, error
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_show_task_finds_a_module_in_the_working_folder(tmp_path):
    (tmp_path / "forty_examples.py").write_text(FORTY_EXAMPLES)
    result = run_as_user(str(REPO / "tools" / "show_task.py"), "forty_examples", "--module", "forty_examples",
                         "--split", "validation", "-n", "1", module="", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "=== task forty_examples (split validation) ===" in result.stdout
    assert "question 0: what is it?" in result.stdout
    assert_quiet(result.stdout + result.stderr)

    missing = run_as_user(str(REPO / "tools" / "show_task.py"), "--module", "no_such_tasks", module="", cwd=tmp_path)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: MIXTURE_OR_TASK_MODULE 'no_such_tasks' could not be imported")
    assert "Traceback" not in missing.stderr


@pytest.mark.slow
def test_list_checkpoints_is_quiet(tmp_path):
    result = run_as_user(str(REPO / "tools" / "list_checkpoints.py"), str(tmp_path), module="")
    assert result.returncode == 2
    assert result.stderr == f"error: {str(tmp_path)!r} has no checkpoints folder; is it a t5x_lite MODEL_DIR?\n"


def test_quickstart_comment_states_the_logged_learning_rate():
    gin.clear_config()
    try:
        cli.parse_gin([str(cli.GIN_CONFIGS_DIR / "quickstart.gin")], [])
        rate = float(optimizers.rsqrt_schedule()(1))
    finally:
        gin.clear_config()
    assert f"{rate:.4f}" == "0.0316"
    comment = (cli.GIN_CONFIGS_DIR / "quickstart.gin").read_text()
    assert "0.0316" in comment and "0.01 at first" not in comment
