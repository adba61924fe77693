"""The command line as a user meets it: the quickstart runs, bad input gets one clear error."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gin
import pytest

from t5x_lite import cli
from t5x_lite.training import loop
from tests.subprocess_env import subprocess_env

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path = REPO, module: str = "t5x_lite.train", devices: int = 1) -> subprocess.CompletedProcess:
    """Runs `python -m MODULE ARGS` on one CPU device (as the README does) or on `devices` simulated ones."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd, env=subprocess_env(devices), capture_output=True, text=True, timeout=600, check=False,
    )


@pytest.mark.slow
def test_quickstart_command_runs(tmp_path):
    model_dir = tmp_path / "quickstart"
    result = run_cli(
        "--gin_file=gin_configs/quickstart.gin", f"--gin.MODEL_DIR='{model_dir}'",
        "--gin.TRAIN_STEPS=20", "--gin.train.log_period=10", "--gin.train.eval_period=20",
        "--gin.train.eval_steps=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [10, 20]
    assert any("eval/loss" in r for r in records)
    assert (model_dir / "checkpoints" / "20").is_dir()
    assert "\r" not in result.stderr and "train:" not in result.stderr  # no progress bar where stderr is a pipe
    assert result.stdout.startswith("Training T5 (EncoderDecoderModel, ")  # the summary line comes first


def test_cli_reports_a_bad_binding_in_one_line():
    result = run_cli("--gin_file=gin_configs/quickstart.gin", "--gin.MODEL_DIR='/tmp/x'", "--gin.no_such_thing.x=1")
    assert result.returncode == 2
    assert "error: invalid gin bindings: No configurable matching 'no_such_thing'" in result.stderr
    assert "Traceback" not in result.stderr


HELP_IMPORTS = textwrap.dedent("""
    import runpy, sys
    import t5x_lite
    before = set(sys.modules)
    import t5x_lite.cli
    after_cli = set(sys.modules)
    sys.argv = ["t5x_lite.train", "--help"]
    try:
        runpy.run_module("t5x_lite.train", run_name="__main__")
    except SystemExit:
        pass
    heavy = {"tensorflow", "seqio"}
    print("cli", sorted({m.split(".")[0] for m in after_cli - before} & heavy))
    print("help", sorted({m.split(".")[0] for m in set(sys.modules) - before} & heavy))
""")


def test_cli_and_train_help_import_no_tensorflow():
    """`import t5x_lite.cli` and `python -m t5x_lite.train --help` load neither TensorFlow nor seqio (beyond what
    `import t5x_lite` itself loads)."""
    result = subprocess.run([sys.executable, "-c", HELP_IMPORTS], cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "USAGE" in result.stdout  # the help was printed
    assert result.stdout.splitlines()[-2:] == ["cli []", "help []"]


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def parse(*bindings: str, files=("quickstart.gin",)) -> None:
    cli.parse_gin([str(cli.GIN_CONFIGS_DIR / f) for f in files], list(bindings))


def test_missing_gin_file(clean_gin):
    with pytest.raises(cli.UserError, match=r"gin file 'nope\.gin' not found \(looked in: .*gin_configs"):
        cli.parse_gin(["nope.gin"], [])


def test_unknown_binding(clean_gin):
    with pytest.raises(cli.UserError, match="No configurable matching 'trian'"):
        parse("trian.batch_size = 3")


def test_malformed_gin_names_file_and_line(clean_gin, tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("train.batch_size = 3\ntrain.train_steps = (\n")
    with pytest.raises(cli.UserError, match=r"invalid gin file .*bad.gin: EOF in multi-line statement \(line 3\)"):
        cli.parse_gin([str(bad)], [])


def test_missing_required_macro(clean_gin):
    parse(files=("quickstart.gin",))
    with pytest.raises(cli.UserError, match=r"gin macro MODEL_DIR is not set.*--gin.MODEL_DIR="):
        cli.require_macros()


def test_unknown_task_suggests_close_names(clean_gin, tmp_path):
    parse(f"MODEL_DIR = '{tmp_path}'", "MIXTURE_OR_TASK_NAME = 'bundled_span_coruption'")
    with pytest.raises(cli.UserError, match=r"Unknown task or mixture 'bundled_span_coruption'\. Did you mean 'bundled_span_corruption'"):
        loop.train()


def test_feature_lengths_missing_a_feature(clean_gin, tmp_path):
    parse(f"MODEL_DIR = '{tmp_path}'", "TASK_FEATURE_LENGTHS = {'inputs': 64}")
    with pytest.raises(cli.UserError, match=r"no length for \['targets'\].*--gin.TASK_FEATURE_LENGTHS="):
        loop.train()


def test_unwritable_model_dir(clean_gin, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    parse(f"MODEL_DIR = '{blocker / 'run'}'")
    with pytest.raises(cli.UserError, match="MODEL_DIR .* is not writable"):
        loop.train()


CHECK_REPEATEDLY = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from t5x_lite import cli
    folder, signals = sys.argv[1], Path(sys.argv[2])
    (signals / f"ready_{sys.argv[3]}").touch()
    while not (signals / "go").exists():
        time.sleep(0.001)
    for _ in range(300):
        cli.prepare_output_dir(folder)
""")


def test_processes_check_a_shared_model_dir_at_once(tmp_path):
    """Every process of a multi-host run checks MODEL_DIR is writable; one's check must not break another's."""
    model_dir, signals = tmp_path / "model_dir", tmp_path / "signals"
    signals.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", CHECK_REPEATEDLY, str(model_dir), str(signals), str(i)],
                              cwd=REPO, env=subprocess_env(), stderr=subprocess.PIPE, text=True) for i in range(4)]
    deadline = time.time() + 120
    while len(list(signals.glob("ready_*"))) < len(procs) and time.time() < deadline:
        time.sleep(0.01)
    (signals / "go").touch()  # all four check at once
    errors = [proc.communicate(timeout=300)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * len(procs), "\n".join(errors)[-3000:]
    assert list(model_dir.iterdir()) == []


def test_missing_task_module(clean_gin, tmp_path):
    parse(f"MODEL_DIR = '{tmp_path}'", "MIXTURE_OR_TASK_MODULE = 'no_such_tasks_module'")
    with pytest.raises(cli.UserError, match=r"MIXTURE_OR_TASK_MODULE 'no_such_tasks_module' could not be imported.*sys.path"):
        loop.train()


def test_vocabulary_larger_than_model(clean_gin, tmp_path):
    parse(f"MODEL_DIR = '{tmp_path}'", "T5Config.vocab_size = 1024")
    with pytest.raises(cli.UserError, match="vocabulary of 8100 ids but the model has vocab_size 1024"):
        loop.train()


def test_targets_length_too_short_for_span_corruption(clean_gin, tmp_path):
    parse(f"MODEL_DIR = '{tmp_path}'", "TASK_FEATURE_LENGTHS = {'inputs': 512, 'targets': 64}")
    with pytest.raises(cli.UserError, match=r"targets of 114 tokens.*at least 114"):
        loop.train()


def test_gin_syntax_error_names_file_and_line(clean_gin, tmp_path):
    bad = tmp_path / "bad_syntax.gin"
    bad.write_text("train.batch_size = 3\ntrain.train_steps = = 4\n")
    with pytest.raises(cli.UserError, match=r"invalid gin file .*bad_syntax.gin.*line 2"):
        cli.parse_gin([str(bad)], [])


def test_includes_work_when_the_working_folder_has_runs_and_models(clean_gin, tmp_path, monkeypatch):
    """`include 'runs/pretrain.gin'` from a folder that has its own runs/ and models/ (as after a quickstart)."""
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # what `python -m` does with the working folder
    cli.parse_gin([str(cli.GIN_CONFIGS_DIR / "quickstart.gin")], [])
    assert gin.query_parameter("TRAIN_STEPS/macro.value") == 300


def test_relative_checkpoint_path(tmp_path, monkeypatch):
    (tmp_path / "run" / "checkpoints" / "5" / "state").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    from t5x_lite import checkpoints

    assert str(checkpoints.find_state_dir("run")) == str(tmp_path / "run" / "checkpoints" / "5" / "state")
