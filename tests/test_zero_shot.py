"""Zero- and few-shot evaluation: the leave-one-out QA mixtures, k-shot prompts, NUM_SHOTS in `t5x_lite.eval`,
and `tools/unseen_format.py`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gin
import numpy as np
import pytest
import seqio

from t5x_lite import checkpoints, cli, evaluation, partitioning
from t5x_lite import eval as eval_lib
from t5x_lite import train as train_lib
from t5x_lite.data.preprocessors import few_shot
from t5x_lite.models.causal import DecoderOnlyModel
from t5x_lite.tasks import qa as qa_tasks
from tests.test_cli import run_cli

REPO = Path(__file__).resolve().parents[1]
GPT = "models/gpt/tiny.gin"
RANK_TASK = "bundled_qa_yes_no_rank"
LENGTHS = {"inputs": 448, "targets": 4}


def test_leave_one_out_mixtures_hold_exactly_the_other_three_formats():
    for held_out in qa_tasks.BUNDLED_FORMATS:
        mixture = seqio.get_mixture_or_task(qa_tasks.leave_one_out_mixture(held_out))
        expected = {f"bundled_qa_{f}" for f in qa_tasks.BUNDLED_FORMATS if f != held_out}
        assert {task.name for task in mixture.tasks} == expected and len(mixture.tasks) == 3
    with pytest.raises(ValueError, match="Unknown UnifiedQA format 'essay'"):
        qa_tasks.leave_one_out_mixture("essay")


def test_yes_no_rank_task_has_a_yes_and_a_no_row_per_question():
    rows = list(seqio.get_mixture_or_task(RANK_TASK).get_dataset(LENGTHS, split="validation", shuffle=False)
                .take(6).as_numpy_iterator())
    assert [int(r["idx"]) for r in rows] == [0, 0, 1, 1, 2, 2]
    assert [r["targets_pretokenized"] for r in rows[:2]] == [b"yes", b"no"]
    assert all(sum(bool(r["is_correct"]) for r in rows[i:i + 2]) == 1 for i in range(0, 6, 2))


def toy_pool(lengths: list[int]) -> list[few_shot.Shot]:
    """Shots whose inputs are [i+10] * n (distinct per shot) and targets [EOS]."""
    return [(np.full(n, i + 10, np.int32), np.array([1], np.int32)) for i, n in enumerate(lengths)]


def test_choose_shots_is_seeded_fits_the_budget_and_skips_the_query():
    pool = toy_pool([3, 3, 3, 3, 3, 3, 3, 3])
    query = pool[5][0]
    first = few_shot.choose_shots(pool, 3, seed=0, query=7, query_inputs=query, budget=100)
    assert len(first) == 3 and len(set(first)) == 3
    assert first == few_shot.choose_shots(pool, 3, seed=0, query=7, query_inputs=query, budget=100)  # deterministic
    draws = {tuple(few_shot.choose_shots(pool, 3, seed=s, query=7, query_inputs=query, budget=100)) for s in range(6)}
    assert len(draws) > 1  # the seed picks them
    every = few_shot.choose_shots(pool, 8, seed=0, query=7, query_inputs=query, budget=100)
    assert sorted(every) == [0, 1, 2, 3, 4, 6, 7]  # all but the query itself
    assert len(few_shot.choose_shots(pool, 3, seed=0, query=7, query_inputs=query, budget=12)) == 3  # 4 tokens each
    assert len(few_shot.choose_shots(pool, 3, seed=0, query=7, query_inputs=query, budget=11)) < 3
    long_first = toy_pool([9, 1, 1])  # 10, 2 and 2 tokens: in a budget of 4 only the two short ones fit
    assert all(sorted(few_shot.choose_shots(long_first, 2, s, 0, np.array([99]), budget=4)) == [1, 2] for s in range(8))
    prompt = few_shot.prompt_inputs(pool, first, np.array([5, 1], np.int32))
    assert prompt.tolist() == [t for i in first for t in [i + 10] * 3 + [1]] + [5, 1]


@pytest.fixture(scope="module")
def two_shot_task() -> tuple[str, list[few_shot.Shot]]:
    name = few_shot.few_shot_task(seqio.get_mixture_or_task("bundled_qa_yes_no"), 2, 0, LENGTHS)
    return name, few_shot.shot_pool(seqio.get_mixture_or_task("bundled_qa_yes_no"), LENGTHS)


def split_inputs(task: str, split: str, n: int | None = None) -> list[list[int]]:
    ds = seqio.get_mixture_or_task(task).get_dataset(LENGTHS, split=split, shuffle=False)
    return [ex["inputs"].tolist() for ex in (ds.take(n) if n else ds).as_numpy_iterator()]


def test_k_shot_prompts_put_two_train_examples_before_each_query(two_shot_task):
    name, pool = two_shot_task
    train = {tuple(x) for x in split_inputs("bundled_qa_yes_no", "train")}
    validation = split_inputs("bundled_qa_yes_no", "validation", 20)
    assert [tuple(shot[0]) for shot in pool] == [tuple(x) for x in split_inputs("bundled_qa_yes_no", "train")]
    prompts = split_inputs(name, "validation", 20)
    assert prompts == split_inputs(name, "validation", 20)  # the same every time
    for position, (prompt, query) in enumerate(zip(prompts, validation)):
        assert len(prompt) <= LENGTHS["inputs"] and prompt[-len(query):] == query
        chosen = few_shot.choose_shots(pool, 2, 0, position, np.array(query), LENGTHS["inputs"] - len(query))
        assert len(chosen) == 2 and prompt == few_shot.prompt_inputs(pool, chosen, np.array(query)).tolist()
        assert all(tuple(pool[i][0]) in train and list(pool[i][0]) not in validation for i in chosen)
    assert seqio.get_mixture_or_task(name).metric_fns == seqio.get_mixture_or_task("bundled_qa_yes_no").metric_fns


def test_k_shot_on_the_train_split_never_shows_the_query(two_shot_task):
    """The pool is the train split in order, so train query i is pool entry i: never among its own shots."""
    name, pool = two_shot_task
    for position, prompt in enumerate(split_inputs(name, "train", 10)):
        query = pool[position][0]
        chosen = few_shot.choose_shots(pool, 2, 0, position, query, LENGTHS["inputs"] - len(query))
        assert prompt == few_shot.prompt_inputs(pool, chosen, query).tolist()
        assert position not in chosen and not any(np.array_equal(pool[i][0], query) for i in chosen)


def test_k_shot_prompts_that_cannot_fit_are_an_error():
    task = seqio.get_mixture_or_task("bundled_qa_yes_no")
    name = few_shot.few_shot_task(task, 3, 0, {"inputs": 320, "targets": 4})
    with pytest.raises(few_shot.ShotsDoNotFit, match=r"NUM_SHOTS = 3: 3 solved examples of 'bundled_qa_yes_no' do not "
                       r"fit before query 0 in TASK_FEATURE_LENGTHS\['inputs'\] = 320 \(the query takes \d+ tokens"):
        seqio.get_mixture_or_task(name).get_dataset({"inputs": 320, "targets": 4}, split="validation", shuffle=False)


# ------------------------------------------------------------------ NUM_SHOTS in t5x_lite.eval, on a tiny GPT


@pytest.fixture(scope="module")
def tiny_gpt(tmp_path_factory) -> Path:
    """A tiny GPT after one pre-training step (its scores differ from row to row, which is all these tests need)."""
    model_dir = tmp_path_factory.mktemp("zero_shot") / "gpt"
    gin.clear_config()
    cli.parse_gin(["examples/gpt_tiny_pretrain.gin"], [
        f"MODEL_DIR = '{model_dir}'", "TRAIN_STEPS = 1", "BATCH_SIZE = 8", "TASK_FEATURE_LENGTHS = {'targets': 32}",
        "train.eval_period = 0", "train.progress_bar = False"])
    try:
        train_lib.train()
    finally:
        gin.clear_config()
    return model_dir


def eval_bindings(checkpoint: Path, output_dir: Path, *extra: str) -> list[str]:
    return [f"CHECKPOINT_PATH = '{checkpoint}'", f"MIXTURE_OR_TASK_NAME = '{RANK_TASK}'",
            f"TASK_FEATURE_LENGTHS = {LENGTHS}", f"EVAL_OUTPUT_DIR = '{output_dir}'", "make_evaluator.num_examples = 16",
            *extra]


def test_zero_shots_is_the_evaluation_of_the_task_itself(tiny_gpt, tmp_path):
    gin.clear_config()
    cli.parse_gin(["runs/eval.gin", GPT], eval_bindings(tiny_gpt, tmp_path / "eval", "NUM_SHOTS = 0"))
    try:
        metrics = eval_lib.evaluate_checkpoint()
        model = DecoderOnlyModel()  # as MODEL in models/gpt/tiny.gin
        mesh, rules = partitioning.make_mesh(), partitioning.logical_axis_rules()
        graphdef, params = checkpoints.load_checkpoint_params(model, str(tiny_gpt), mesh, rules)
        provider = seqio.get_mixture_or_task(RANK_TASK)
        task_eval = evaluation.task_evaluation(provider, model, graphdef, mesh, rules, LENGTHS)
        expected, _ = evaluation.evaluate(*task_eval, params, LENGTHS["targets"])
    finally:
        gin.clear_config()
    assert metrics == expected and list(metrics) == [f"eval/{RANK_TASK}/accuracy"]


@pytest.mark.slow
def test_eval_cli_takes_num_shots(tiny_gpt, tmp_path):
    args = [f"--gin.{b}" for b in eval_bindings(tiny_gpt, tmp_path / "eval")]
    result = run_cli("--gin_file=runs/eval.gin", f"--gin_file={GPT}", *args, "--gin.NUM_SHOTS=2", module="t5x_lite.eval")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"on {RANK_TASK} with 2-shot prompts (seed 0)." in result.stdout
    record = json.loads((tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= record[f"eval/{RANK_TASK}_2shot_seed0/accuracy"] <= 100

    too_many = run_cli("--gin_file=runs/eval.gin", f"--gin_file={GPT}", *[f"--gin.{b}" for b in eval_bindings(
        tiny_gpt, tmp_path / "too_many")], "--gin.NUM_SHOTS=8", module="t5x_lite.eval")
    assert too_many.returncode != 0 and not (tmp_path / "too_many").exists()
    assert too_many.stderr.strip().splitlines()[-1].startswith(
        f"error: NUM_SHOTS = 8: 8 solved examples of '{RANK_TASK}' do not fit before query 0 in "
        "TASK_FEATURE_LENGTHS['inputs'] = 448 (the query takes ")
    negative = run_cli("--gin_file=runs/eval.gin", f"--gin_file={GPT}", *args, "--gin.NUM_SHOTS=-1", module="t5x_lite.eval")
    assert negative.returncode != 0
    assert negative.stderr.strip().splitlines()[-1] == "error: NUM_SHOTS must be 0 or more, got -1."


# ------------------------------------------------------------------ tools/unseen_format.py


@pytest.mark.slow
def test_unseen_format_tool_prints_its_json_line(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import unseen_format

    summary = unseen_format.main(["--out_dir", str(tmp_path / "run"), "--held_out", "yes_no", "--seeds", "0",
                                  "--pretrain_steps", "0", "--finetune_steps", "1", "--batch_size", "8",
                                  "--inputs_length", "32", "--targets_length", "4", "--eval_examples", "8",
                                  "--no_progress_bar"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == summary == json.loads((tmp_path / "run" / "results.json").read_text())
    row = last["held_out_formats"]["yes_no"]
    assert row["metric"] == f"eval/{RANK_TASK}/accuracy"
    for kind in ("held_out", "all_four"):
        assert set(row[kind]) == {"mean", "std", "seeds"} and len(row[kind]["seeds"]) == 1
        assert 0 <= row[kind]["mean"] <= 100
    assert (tmp_path / "run" / "without_yes_no" / "seed0" / "checkpoints" / "1").is_dir()
