"""Evaluation and inference split across processes: 2 processes x 4 CPU devices (each decoding its share of every
batch) give the metrics (during training and from `eval`) and the output lines (`infer`) of 1 process with 8 devices,
on example counts that leave padding rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from t5x_lite import evaluation, partitioning
from tests import sensitive_eval_task
from tests.subprocess_env import subprocess_env
from tests.test_multihost import free_port

REPO = Path(__file__).resolve().parent.parent
QA_LENGTHS = "{'inputs': 96, 'targets': 12}"
# The QA task with metrics that move with every score and prediction; 11 examples in batches of 8 (the last: 3
# rows and 5 of padding, all of them in process 1's half).
TASK_ARGS = ["--gin.MIXTURE_OR_TASK_MODULE='tests.sensitive_eval_task'",
             f"--gin.MIXTURE_OR_TASK_NAME='{sensitive_eval_task.NAME}'", f"--gin.TASK_FEATURE_LENGTHS={QA_LENGTHS}",
             "--gin.make_evaluator.num_examples=11", "--gin.ModelRunner.batch_size=8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """A tiny T5 trained by 2 processes for 2 steps on the sensitive QA task, evaluated with its metrics at step 2
    (keeping the best checkpoint, a save all processes must decide alike); the run folder and those metrics."""
    model_dir = tmp_path_factory.mktemp("trained")
    run_processes(
        "t5x_lite.train", 2, "--gin_file=runs/pretrain.gin", "--gin_file=models/t5_1_1/tiny.gin", *TASK_ARGS,
        f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8", "--gin.train.eval_period=2",
        "--gin.train.eval_steps=1", "--gin.train.checkpoint_period=2", "--gin.train.progress_bar=False",
        f"--gin.train.best_metric='eval/{sensitive_eval_task.NAME}/mean_log_likelihood'",
    )
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    [metrics] = [{k: v for k, v in r.items() if k.startswith(f"eval/{sensitive_eval_task.NAME}/")}
                 for r in records if f"eval/{sensitive_eval_task.NAME}/mean_log_likelihood" in r]
    assert (model_dir / "best").is_dir()
    return model_dir, metrics


def run_processes(module: str, processes: int, *args: str) -> list[str]:
    """Runs `python -m MODULE ARGS` as `processes` processes sharing 8 simulated CPU devices; their outputs."""
    devices = 8 // processes
    multihost = [f"--coordinator_address=127.0.0.1:{free_port()}", f"--num_processes={processes}"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, *args, *(multihost + [f"--process_id={i}"] if processes > 1 else [])],
            cwd=REPO, env=subprocess_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(processes)
    ]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    failures = [f"process {i} of {processes} exited {proc.returncode}:\n{output[-4000:]}"
                for i, (proc, output) in enumerate(zip(procs, outputs, strict=True)) if proc.returncode != 0]
    assert not failures, "\n\n".join(failures)
    return outputs


def eval_metrics(checkpoint: Path, output_dir: Path, processes: int) -> tuple[dict[str, float], list[str]]:
    """The metrics `eval` wrote, and what each process printed."""
    outputs = run_processes(
        "t5x_lite.eval", processes, "--gin_file=runs/eval.gin", "--gin_file=models/t5_1_1/tiny.gin", *TASK_ARGS,
        f"--gin.CHECKPOINT_PATH='{checkpoint}'", f"--gin.EVAL_OUTPUT_DIR='{output_dir}'",
    )
    [record] = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    record.pop("time")
    return record, outputs


@pytest.mark.slow
def test_two_processes_evaluate_like_one(trained, tmp_path):
    """`eval` by 1 and by 2 processes, and the 2-process training run's own evaluation of the same parameters."""
    model_dir, during_training = trained
    one, _ = eval_metrics(model_dir, tmp_path / "one", 1)
    two, printed = eval_metrics(model_dir, tmp_path / "two", 2)
    task = sensitive_eval_task.NAME
    assert one.pop("step") == two.pop("step") == 2
    assert set(two) == set(one) == set(during_training) == {f"eval/{task}/mean_log_likelihood",
                                                            f"eval/{task}/mean_prediction_chars"}
    for metrics in (two, during_training):  # greedy predictions: the same; scores: up to float rounding
        assert metrics[f"eval/{task}/mean_prediction_chars"] == one[f"eval/{task}/mean_prediction_chars"]
        np.testing.assert_allclose(metrics[f"eval/{task}/mean_log_likelihood"], one[f"eval/{task}/mean_log_likelihood"],
                                   rtol=1e-6)
    assert "process 0 decodes 4 rows of each." in printed[0]  # its half of every batch of 8
    lines = [[line for line in output.splitlines() if line.startswith("eval/")] for output in printed]
    assert lines[0] == lines[1] == [f"{name} = {value:.4f}" for name, value in sorted(one.items())]  # shared


def infer_lines(model_dir: Path, inputs: Path, output: Path, processes: int) -> list[dict]:
    """The lines `infer` wrote for the input file in batches of 8 (7 inputs: with 2 processes, process 0 decodes
    4 rows and process 1 3 and a padding row)."""
    outputs = run_processes(
        "t5x_lite.infer", processes, "--gin_file=runs/infer.gin", "--gin_file=models/t5_1_1/tiny.gin",
        f"--gin.CHECKPOINT_PATH='{model_dir}'", f"--gin.INFER_INPUT_FILE='{inputs}'",
        f"--gin.TASK_FEATURE_LENGTHS={QA_LENGTHS}", "--gin.ModelRunner.batch_size=8", f"--gin.INFER_OUTPUT_FILE='{output}'",
    )
    assert f"Wrote 7 predictions to {output}." in outputs[0]
    assert all("Wrote" not in out for out in outputs[1:])  # process 0 alone writes the file
    return [json.loads(line) for line in output.read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_infer_like_one(trained, tmp_path):
    model_dir, _ = trained
    words = ["hello", "goodbye", "yes", "no", "maybe", "never", "always"]
    questions = [f"who says {word}? {word}, said the king." for word in words]
    inputs = tmp_path / "questions.jsonl"
    inputs.write_text("".join(json.dumps({"inputs": q, "targets": w}) + "\n" for q, w in zip(questions, words)))
    one = infer_lines(model_dir, inputs, tmp_path / "one.jsonl", 1)
    two = infer_lines(model_dir, inputs, tmp_path / "two.jsonl", 2)
    assert len(one) == 7 and [line["inputs"] for line in one] == questions  # the original order
    assert [{**line, "score": None} for line in two] == [{**line, "score": None} for line in one]
    np.testing.assert_allclose([line["score"] for line in two], [line["score"] for line in one], rtol=1e-6)


@pytest.mark.parametrize(("mesh_shape", "rows"), [({"data": -1}, 8), ({"data": 2, "tensor": 4}, 6),
                                                  ({"data": 1, "tensor": -1}, 5)])
def test_a_batch_is_rounded_up_to_whole_rows_per_device(mesh_shape, rows):
    mesh = partitioning.make_mesh(mesh_shape)
    sharding = partitioning.batch_sharding(mesh, partitioning.logical_axis_rules())
    assert evaluation.rows_per_batch(5, sharding) == rows
    assert evaluation.rows_on_this_process(rows, sharding) == rows  # one process holds every row
    rows_of_ids = np.arange(rows * 3).reshape(rows, 3)
    batch = partitioning.split_batch_to_mesh({"x": rows_of_ids}, mesh, partitioning.logical_axis_rules())
    np.testing.assert_array_equal(partitioning.gather_to_host(batch)["x"], rows_of_ids)
