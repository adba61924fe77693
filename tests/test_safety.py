"""Safe by default (#23): strict gin (typo'd and missing macros, bad values, unquoted strings), `--help`, the
run-folder lease, and one error line, with nothing left behind, for every failed start. Through the public CLI."""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gin
import pytest

from t5x_lite import cli, run_lease
from tests.subprocess_env import subprocess_env
from tests.test_cli import REPO, run_cli

QUICKSTART = "--gin_file=gin_configs/quickstart.gin"
TINY_FINETUNE = ("--gin_file=runs/finetune.gin", "--gin_file=models/t5_1_1/tiny.gin",
                 "--gin.MIXTURE_OR_TASK_NAME='bundled_qa_extractive'",
                 "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.TRAIN_STEPS=10")
# absl/TensorFlow log lines (their C++ start-up notices, library warnings): not the command's own output.
LOG_LINE = re.compile(r"([IWEF]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] |WARNING: All log messages before absl)")


def own_lines(stderr: str) -> list[str]:
    """stderr without the library log lines: what the command itself printed (its error, or a traceback)."""
    return [line for line in stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]


def assert_one_error(result: subprocess.CompletedProcess, message: str) -> None:
    """The command failed with exactly `error: <message>` and nothing else of its own (no traceback)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert own_lines(result.stderr) == [f"error: {message}"], result.stderr[-3000:]


# ------------------------------------------------------------------ strict configuration


@pytest.mark.parametrize(("typo", "meant"), [("TRAIN_STEP", "TRAIN_STEPS"), ("BATCHSIZE", "BATCH_SIZE")])
def test_a_macro_no_binding_reads_is_an_error(tmp_path, typo, meant):
    result = run_cli(QUICKSTART, f"--gin.MODEL_DIR='{tmp_path / 'run'}'", f"--gin.{typo}=10")
    assert_one_error(result, f"macro {typo} is not used by any binding; did you mean {meant}?")
    assert not (tmp_path / "run").exists()


def test_an_unused_macro_in_the_users_own_gin_file_is_an_error(tmp_path):
    own = tmp_path / "my_run.gin"
    own.write_text("include 'quickstart.gin'\nTRAIN_STEPS = 20\nEVAL_STEPS = 2\n")
    result = run_cli(f"--gin_file={own}", f"--gin.MODEL_DIR='{tmp_path / 'run'}'")
    assert_one_error(result, "macro EVAL_STEPS is not used by any binding; check its name, or remove it")


def test_a_missing_macro_names_the_near_name_given(tmp_path):
    result = run_cli(QUICKSTART, f"--gin.MODEL_DIRR='{tmp_path / 'run'}'")
    assert_one_error(result, "gin macro MODEL_DIR is not set (did you mean MODEL_DIRR?); set it in a gin file or pass "
                             "e.g. --gin.MODEL_DIR=\"'runs/my_run'\"")


def test_finetune_without_its_initial_checkpoint(tmp_path):
    result = run_cli(*TINY_FINETUNE, f"--gin.MODEL_DIR='{tmp_path / 'run'}'")
    assert_one_error(result, "gin macro INITIAL_CHECKPOINT_PATH is not set; set it in a gin file or pass e.g. "
                             "--gin.INITIAL_CHECKPOINT_PATH=\"'runs/quickstart'\"")
    assert not (tmp_path / "run").exists()


def test_a_string_without_inner_quotes(tmp_path):
    result = run_cli("--gin_file=quickstart.gin", "--gin.MODEL_DIR=runs/x", cwd=tmp_path)
    assert_one_error(result, "MODEL_DIR needs a quoted string: --gin.MODEL_DIR=\"'runs/x'\"")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_batch_size_zero(tmp_path):
    result = run_cli(QUICKSTART, f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.BATCH_SIZE=0")
    assert_one_error(result, "BATCH_SIZE must be a whole number >= 1, got 0; e.g. --gin.BATCH_SIZE=32")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_period_of_zero(tmp_path):
    result = run_cli(QUICKSTART, f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.train.checkpoint_period=0")
    assert_one_error(result, "train.checkpoint_period must be a whole number >= 1, got 0; "
                             "e.g. --gin.train.checkpoint_period=1000")


def test_a_bad_model_config_value(tmp_path):
    """A network config's own check (raised while gin builds MODEL) is one line too, with no run folder made."""
    result = run_cli(QUICKSTART, f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.T5Config.dropout_rate=1.5")
    assert_one_error(result, "T5Config.dropout_rate=1.5 must be in [0, 1).")
    assert not (tmp_path / "run").exists()


MY_TASKS = textwrap.dedent("""
    from t5x_lite.data import registration

    registration.register_span_corruption_task(
        "my_corpus_span_corruption", {"train": "corpus.txt", "validation": "corpus.txt"})
""")
LENGTHS_FLAG = "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': 128, 'targets': 32}\""


@pytest.mark.parametrize(("lengths", "bad"), [("{'inputs': 0, 'targets': 16}", "['inputs'] must be a whole number >= 1, got 0"),
                                              ("{'inputs': 64, 'targets': -3}", "['targets'] must be a whole number >= 1, got -3")])
@pytest.mark.slow
def test_feature_lengths_of_a_users_task(tmp_path, lengths, bad):
    """A length of 0 crashed TensorFlow (exit 139), a negative one gave a seqio trace."""
    (tmp_path / "my_tasks.py").write_text(MY_TASKS)
    (tmp_path / "corpus.txt").write_text("one line of text\n" * 20)
    result = run_cli(f"--gin_file={cli.GIN_CONFIGS_DIR / 'quickstart.gin'}", "--gin.MODEL_DIR='run'",
                     "--gin.MIXTURE_OR_TASK_MODULE='my_tasks'", "--gin.MIXTURE_OR_TASK_NAME='my_corpus_span_corruption'",
                     f"--gin.TASK_FEATURE_LENGTHS={lengths}", cwd=tmp_path)
    assert_one_error(result, f"TASK_FEATURE_LENGTHS{bad}; e.g. {LENGTHS_FLAG}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("lengths", ["{'inputs': 64, 'targets': 0}", "{'inputs': -1, 'targets': 16}"])
@pytest.mark.slow
def test_feature_lengths_of_a_bundled_task(tmp_path, lengths):
    args = [a for a in TINY_FINETUNE if not a.startswith("--gin.TASK_FEATURE_LENGTHS")]
    result = run_cli(*args, f"--gin.TASK_FEATURE_LENGTHS={lengths}", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
                     f"--gin.INITIAL_CHECKPOINT_PATH='{tmp_path / 'none'}'")
    assert result.returncode == 2
    (line,) = own_lines(result.stderr)
    assert re.fullmatch(r"error: TASK_FEATURE_LENGTHS\['(inputs|targets)'\] must be a whole number >= 1, got -?\d+; "
                        rf"e\.g\. {re.escape(LENGTHS_FLAG)}", line), line


def test_eval_checks_its_values_too(tmp_path):
    result = run_cli("--gin_file=runs/eval.gin", "--gin_file=models/t5_1_1/tiny.gin", "--gin.CHECKPOINT_PATH='x'",
                     "--gin.MIXTURE_OR_TASK_NAME='bundled_qa_extractive'", f"--gin.EVAL_OUTPUT_DIR='{tmp_path}'",
                     "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 0}", module="t5x_lite.eval")
    assert_one_error(result, f"TASK_FEATURE_LENGTHS['targets'] must be a whole number >= 1, got 0; e.g. {LENGTHS_FLAG}")


# ------------------------------------------------------------------ --help


HELP_PROBE = textwrap.dedent("""
    import runpy, sys
    module = sys.argv[1]
    sys.argv = [module, "--help"]
    try:
        runpy.run_module(module, run_name="__main__")
    except SystemExit as e:
        print("EXIT", e.code)
    print("HEAVY", sorted({"tensorflow", "seqio"} & {m.split(".")[0] for m in sys.modules}))
""")
ENTRY_POINTS = {"t5x_lite.train": ("runs/pretrain.gin", "runs/finetune.gin"), "t5x_lite.eval": ("runs/eval.gin",),
                "t5x_lite.infer": ("runs/infer.gin",), "t5x_lite.features": ("runs/features.gin",)}


def run_file_macros(*names: str) -> set[str]:
    """The macros the run files define (`NAME = ...` lines)."""
    text = "\n".join((cli.GIN_CONFIGS_DIR / name).read_text() for name in names)
    return set(re.findall(r"^([A-Z_]+) = ", text, re.MULTILINE))


@pytest.mark.parametrize("module", list(ENTRY_POINTS))
def test_help_lists_the_run_files_macros_and_loads_no_tensorflow(module):
    """`python -m <entry> --help` exits 0 with one line per macro of its run files, before TensorFlow is loaded
    (that import alone takes seconds)."""
    start = time.time()
    result = subprocess.run([sys.executable, "-c", HELP_PROBE, module], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300, check=False)
    seconds = time.time() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-2:] == ["EXIT 0", "HEAVY []"]
    assert result.stdout.startswith(f"USAGE: python -m {module} ")
    listed = re.findall(r"^ [ *]([A-Z_]+) +(\S.*); e\.g\. (--gin\S*)", result.stdout, re.MULTILINE)
    assert {name for name, _, _ in listed} == run_file_macros(*ENTRY_POINTS[module])
    print(f"{module} --help: {seconds:.1f}s")


def test_help_exits_zero_at_the_command_line():
    result = run_cli("--help", module="t5x_lite.infer")
    assert result.returncode == 0, result.stderr[-3000:]
    assert " *INFER_OUTPUT_FILE " in result.stdout


# ------------------------------------------------------------------ the shipped configs pass the checks


TRAIN_BINDINGS = ["MODEL_DIR = '/tmp/x'", "MIXTURE_OR_TASK_NAME = 'bundled_span_corruption'",
                  "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 16}", "TRAIN_STEPS = 10"]
RUNS = {
    "runs/pretrain.gin": (TRAIN_BINDINGS, cli.REQUIRED_MACROS),
    "runs/finetune.gin": ([*TRAIN_BINDINGS, "INITIAL_CHECKPOINT_PATH = '/tmp/ck'"], cli.REQUIRED_MACROS),
    "runs/eval.gin": (["CHECKPOINT_PATH = '/tmp/ck'", "MIXTURE_OR_TASK_NAME = 'bundled_qa_mixture'",
                       "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 16}", "EVAL_OUTPUT_DIR = '/tmp/e'"],
                      cli.EVAL_REQUIRED_MACROS),
    "runs/infer.gin": (["CHECKPOINT_PATH = '/tmp/ck'", "MIXTURE_OR_TASK_NAME = 'bundled_qa_mixture'",
                        "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 16}", "INFER_OUTPUT_FILE = '/tmp/p.jsonl'"],
                       cli.INFER_REQUIRED_MACROS),
    "runs/features.gin": (["CHECKPOINT_PATH = '/tmp/ck'", "FEATURES_OUTPUT_FILE = '/tmp/f.npz'"],
                          cli.FEATURES_REQUIRED_MACROS),
}
FINETUNE = ["INITIAL_CHECKPOINT_PATH = '/tmp/ck'", "MODEL_DIR = '/tmp/x'"]
EXAMPLES = {
    "quickstart.gin": ["MODEL_DIR = '/tmp/x'"],
    **{f"examples/{name}_pretrain.gin": ["MODEL_DIR = '/tmp/x'"]
       for name in ("bart_tiny", "bert_tiny", "deberta_tiny", "electra_tiny", "gpt_tiny", "prefix_lm_tiny", "t5_denoising", "t5gemma_tiny",
                    "ul2_tiny", "xlnet_tiny")},
    "examples/deberta_v3_tiny_rtd.gin": ["MODEL_DIR = '/tmp/x'"],
    "examples/bert_tiny_classify.gin": FINETUNE,
    "examples/finetune_bundled_qa.gin": FINETUNE,
    "examples/finetune_qa_extractive.gin": FINETUNE,
    "examples/finetune_top_layers.gin": FINETUNE,
    "examples/lora_finetune_qa.gin": FINETUNE,
    "examples/prompt_tuning_qa.gin": FINETUNE,
    "examples/dapt.gin": [*FINETUNE, "DAPT_TRAIN_FILES = ['a.txt']", "DAPT_VALIDATION_FILES = ['b.txt']"],
    "examples/tartan_mt.gin": ["MODEL_DIR = '/tmp/x'"],
    "examples/tartan_meta.gin": ["MODEL_DIR = '/tmp/x'"],
    "examples/tartan_aang.gin": ["MODEL_DIR = '/tmp/x'"],
}


@pytest.fixture
def clean_gin():
    for entry_point in ("eval", "infer", "features"):  # their configurables, which their run files bind
        importlib.import_module(f"t5x_lite.{entry_point}")
    gin.clear_config()
    yield
    gin.clear_config()


def test_every_shipped_gin_file_passes_the_checks(clean_gin):
    """Every run file with every model file, and every example, with the macros a user sets on the command line."""
    cases = [([run, str(model.relative_to(cli.GIN_CONFIGS_DIR))], bindings, required)
             for run, (bindings, required) in RUNS.items()
             for model in sorted((cli.GIN_CONFIGS_DIR / "models").glob("*/*.gin"))]
    cases += [([name, *(["models/t5_1_1/tiny.gin"] if "tiny" not in name and name != "quickstart.gin" else [])],
                bindings, cli.REQUIRED_MACROS) for name, bindings in EXAMPLES.items()]
    assert {name for name in EXAMPLES} == {str(p.relative_to(cli.GIN_CONFIGS_DIR))
                                           for p in [cli.GIN_CONFIGS_DIR / "quickstart.gin",
                                                     *(cli.GIN_CONFIGS_DIR / "examples").glob("*.gin")]}
    for files, bindings, required in cases:
        gin.clear_config()
        cli.parse_gin(files, bindings)
        cli.check_config(files, bindings, required)


def test_only_macros_the_user_set_must_be_read(clean_gin, tmp_path):
    """A shipped file may define a macro no binding reads; one the user sets, on the command line or in an own
    gin file (and what it includes), must be read."""
    model = tmp_path / "fixed_dtype_model.gin"
    model.write_text((cli.GIN_CONFIGS_DIR / "models/t5_1_1/tiny.gin").read_text()
                     .replace("%ACTIVATION_DTYPE", "'float32'"))
    own = tmp_path / "own.gin"
    own.write_text(f"include '{model}'\n")
    files, bindings = ["runs/pretrain.gin", str(own)], TRAIN_BINDINGS
    cli.parse_gin(files, bindings)
    cli.check_config(files, bindings)  # runs/pretrain.gin's ACTIVATION_DTYPE is read by nothing now
    gin.clear_config()
    cli.parse_gin(files, [*bindings, "ACTIVATION_DTYPE = 'bfloat16'"])
    with pytest.raises(cli.UserError, match="^macro ACTIVATION_DTYPE is not used by any binding"):
        cli.check_config(files, [*bindings, "ACTIVATION_DTYPE = 'bfloat16'"])
    model.write_text(model.read_text() + "MY_DTYPE = 'bfloat16'\n")
    gin.clear_config()
    cli.parse_gin(files, bindings)
    with pytest.raises(cli.UserError, match="^macro MY_DTYPE is not used by any binding"):
        cli.check_config(files, bindings)


# ------------------------------------------------------------------ one error, nothing left behind


@pytest.mark.slow
def test_a_wrong_initial_checkpoint_is_one_line_every_time(tmp_path):
    """It used to be followed, in 2 or 3 runs of 5, by Orbax's "cannot schedule new futures after interpreter
    shutdown" trace (its temporary-folder cleanup thread outlived the error); and it left an empty MODEL_DIR."""
    for attempt in range(3):
        model_dir = tmp_path / f"run{attempt}"
        result = run_cli(*TINY_FINETUNE, f"--gin.MODEL_DIR='{model_dir}'",
                         f"--gin.INITIAL_CHECKPOINT_PATH='{tmp_path / 'nope'}'")
        assert_one_error(result, f"INITIAL_CHECKPOINT_PATH: No checkpoint found at '{tmp_path / 'nope'}': expected a "
                                 "MODEL_DIR of a t5x_lite run, its `checkpoints` folder, or a step folder such as "
                                 "MODEL_DIR/checkpoints/1000.")
        assert not model_dir.exists()


UNKNOWN_TASK = ("--gin.MIXTURE_OR_TASK_NAME='no_such_task'",)
UNKNOWN_TASK_ERROR = "Unknown task or mixture 'no_such_task'"


@pytest.mark.slow
def test_a_failed_start_keeps_a_folder_that_existed(tmp_path):
    """Only a folder the failed run created is removed, and only when it holds no file."""
    held_a_file, was_empty = tmp_path / "held_a_file", tmp_path / "was_empty"
    (held_a_file / "sub").mkdir(parents=True)
    (held_a_file / "notes.txt").write_text("mine")
    was_empty.mkdir()
    for model_dir in (held_a_file, was_empty):
        result = run_cli(QUICKSTART, f"--gin.MODEL_DIR='{model_dir}'", *UNKNOWN_TASK)
        assert result.returncode == 2 and UNKNOWN_TASK_ERROR in result.stderr, result.stderr[-3000:]
    assert (held_a_file / "notes.txt").read_text() == "mine" and (held_a_file / "sub").is_dir()
    assert was_empty.is_dir() and not any(was_empty.iterdir())


# ------------------------------------------------------------------ the run-folder lease


def write_lease(model_dir: Path, host: str, pid: int, age_s: float) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    then = time.time() - age_s
    (model_dir / run_lease.LEASE_FILE).write_text(json.dumps(
        {"host": host, "pid": pid, "started": then - 60, "refreshed": then, "token": "theirs"}))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.slow
def test_a_live_lease_refuses_the_run(tmp_path):
    model_dir = tmp_path / "run"
    write_lease(model_dir, "other-host", 4242, age_s=5)
    result = run_cli(QUICKSTART, f"--gin.MODEL_DIR='{model_dir}'")
    assert result.returncode == 2
    (line,) = own_lines(result.stderr)
    assert re.fullmatch(rf"error: MODEL_DIR {re.escape(str(model_dir))} is in use by pid 4242 on host other-host since "
                        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(lease refreshed \d+ s ago\); wait for it, or pick another "
                        r"MODEL_DIR", line), line
    assert json.loads((model_dir / run_lease.LEASE_FILE).read_text())["token"] == "theirs"  # untouched


@pytest.mark.parametrize(("host", "age_s", "reason"), [
    (socket.gethostname(), 1, r"its process \d+ is gone"),
    ("other-host", 30, r"not refreshed for \d+ s"),
])
@pytest.mark.slow
def test_a_stale_lease_is_taken_over(tmp_path, host, age_s, reason):
    """Stale: on this host its process is gone; anywhere, not refreshed for run_lease.stale_after_s."""
    model_dir = tmp_path / "run"
    pid = dead_pid()
    write_lease(model_dir, host, pid, age_s)
    result = run_cli(QUICKSTART, f"--gin.MODEL_DIR='{model_dir}'", "--gin.run_lease.stale_after_s=20", *UNKNOWN_TASK)
    assert result.returncode == 2 and UNKNOWN_TASK_ERROR in result.stderr, result.stderr[-3000:]
    assert re.search(rf"Took over the lease on MODEL_DIR {re.escape(str(model_dir))} from pid {pid} on host "
                     rf"{re.escape(host)} \({reason}\)\.", result.stderr), result.stderr[-3000:]
    assert not (model_dir / run_lease.LEASE_FILE).exists()  # released when the run ended


def test_the_lease_is_refreshed_and_released(tmp_path):
    lease = run_lease.Lease(str(tmp_path), stale_after_s=10, refresh_s=0.05)
    lease.acquire()
    first = lease.read()
    assert (first.host, first.pid) == (socket.gethostname(), os.getpid())
    time.sleep(0.3)
    assert lease.read().refreshed > first.refreshed and lease.read().started == first.started
    other = run_lease.Lease(str(tmp_path), stale_after_s=10, refresh_s=1)
    with pytest.raises(cli.UserError, match=f"is in use by pid {os.getpid()}"):
        other.acquire()
    lease.release()
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_start_up_releases_the_lease(tmp_path):
    """Outside the training loop (which checkpoints on SIGTERM) the run ends as SIGTERM ends it, lease released."""
    model_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "t5x_lite.train", QUICKSTART, f"--gin.MODEL_DIR='{model_dir}'"],
                               cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (model_dir / run_lease.LEASE_FILE).exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGTERM, err[-3000:]
    assert not (model_dir / run_lease.LEASE_FILE).exists()


TWO_RUN_ARGS = (QUICKSTART, "--gin.TRAIN_STEPS=40", "--gin.train.log_period=10", "--gin.train.eval_period=20",
                "--gin.train.eval_steps=2", "--gin.train.checkpoint_period=20")


def train_process(model_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "t5x_lite.train", *TWO_RUN_ARGS, f"--gin.MODEL_DIR='{model_dir}'"],
                            cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_outputs(model_dir: Path) -> tuple[list[tuple[int, float]], list[str], int]:
    """(step and loss of each metrics record, committed checkpoints, TensorBoard event files) of a run."""
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r.get("train/loss", r.get("eval/loss"))) for r in records]
    return losses, sorted(p.name for p in (model_dir / "checkpoints").iterdir()), len(
        list((model_dir / "tensorboard").iterdir()))


@pytest.mark.slow
def test_a_second_run_into_a_held_model_dir_refuses_and_the_first_loses_nothing(tmp_path):
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    first, reference = train_process(shared), train_process(alone)
    deadline = time.time() + 300
    while not (shared / run_lease.LEASE_FILE).exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    second = run_cli(*TWO_RUN_ARGS, f"--gin.MODEL_DIR='{shared}'")
    assert first.poll() is None, "the first run ended before the second one started; make it longer"
    assert second.returncode == 2
    (line,) = own_lines(second.stderr)
    assert re.fullmatch(rf"error: MODEL_DIR {re.escape(str(shared))} is in use by pid {first.pid} on host "
                        rf"{re.escape(socket.gethostname())} since .*; wait for it, or pick another MODEL_DIR", line)
    for process in (first, reference):
        _, err = process.communicate(timeout=900)
        assert process.returncode == 0, err[-3000:]
    assert run_outputs(shared) == run_outputs(alone)
    losses, checkpoints, event_files = run_outputs(shared)
    assert [step for step, _ in losses] == [10, 20, 20, 30, 40, 40] and checkpoints == ["20", "40"]
    assert event_files == 1
    assert not (shared / run_lease.LEASE_FILE).exists()
