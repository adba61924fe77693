"""Runs the README's examples exactly as written there: "Your own corpus", the fine-tuning recipe and
"Your own text-to-text task" (with few steps), and checks that CI runs the README's test command."""

from __future__ import annotations

import json
import re
import runpy
import shlex
import shutil

import numpy as np
import pytest
import seqio

from tests.test_cli import REPO, run_cli


def readme_block(after: str, language: str) -> str:
    """The first fenced code block of `language` after the heading text `after`."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(after):]
    return re.search(rf"```{language}\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.slow
def test_own_corpus_example(tmp_path):
    module_source = readme_block("### Your own corpus", "python")
    command = readme_block("### Your own corpus", "bash").replace("\\\n", " ")
    (tmp_path / "my_tasks.py").write_text(module_source)
    corpus = tmp_path / "my_corpus"
    corpus.mkdir()
    bundled = REPO / "t5x_lite" / "data" / "bundled"
    shutil.copy(bundled / "validation.txt", corpus / "train.txt")
    shutil.copy(bundled / "validation.txt", corpus / "valid.txt")
    shutil.copytree(REPO / "gin_configs", tmp_path / "gin_configs")
    args = command.split()[3:]  # drop `python -m t5x_lite.train`
    args = [a.replace('"', "") for a in args]
    result = run_cli(*args, "--gin.TRAIN_STEPS=4", "--gin.BATCH_SIZE=4", "--gin.train.eval_period=4",
                     "--gin.train.eval_steps=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs" / "my_corpus" / "checkpoints" / "4").is_dir()


# ------------------------------------------------------------------ the fine-tuning recipe and your own task

RECIPE = "### The fine-tuning recipe"
OWN_TASK = "### Your own text-to-text task"
# Few steps, small batches: the commands' wiring, not their scores (docs/finetuning.md has those).
QUICK = ["--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=4", "--gin.train.eval_steps=1"]


def bash_commands(block: str) -> list[list[str]]:
    """The `python -m MODULE ...` commands of a bash block, each as [MODULE, args...] (as the shell splits them)."""
    lines = [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert all(line[:2] == ["python", "-m"] for line in lines), lines
    return [line[2:] for line in lines]


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory):
    """A folder in which the README recipe's pre-training command ran (2 steps): it holds runs/t5_denoising."""
    folder = tmp_path_factory.mktemp("recipe")
    module, *args = bash_commands(readme_block(RECIPE, "bash"))[0]
    result = run_cli(*args, *QUICK, "--gin.train.eval_period=0", cwd=folder, module=module)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


@pytest.mark.slow
def test_finetuning_recipe_commands(recipe_dir):
    _, finetune, infer = bash_commands(readme_block(RECIPE, "bash"))
    result = run_cli(*finetune[1:], *QUICK, "--gin.train.eval_period=2", "--gin.make_evaluator.num_examples=8",
                     cwd=recipe_dir, module=finetune[0])
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (recipe_dir / "runs" / "qa" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/bundled_qa_extractive/f1" in r for r in records)
    result = run_cli(*infer[1:], cwd=recipe_dir, module=infer[0])
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = (recipe_dir / "runs" / "qa" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 150 and {"inputs", "targets", "prediction", "score"} <= set(json.loads(predictions[0]))


def write_pairs(folder, suffix: str, count: int) -> None:
    """`count` pairs "reverse: w1 .. w6" -> "w6 .. w1" as `folder/{train,valid}{suffix}` (TSV or JSONL)."""
    folder.mkdir(exist_ok=True)
    for split in ("train", "valid"):
        pairs = []
        for i in range(count):
            words = [f"w{(i * 7 + k) % 50}" for k in range(6)]
            pairs.append((f"reverse: {' '.join(words)}", " ".join(reversed(words))))
        if suffix == ".tsv":
            text = "inputs\ttargets\n" + "".join(f"{a}\t{b}\n" for a, b in pairs)
        else:
            text = "".join(json.dumps({"inputs": a, "targets": b}) + "\n" for a, b in pairs)
        (folder / f"{split}{suffix}").write_text(text)


@pytest.mark.slow
def test_own_text_to_text_task_example(recipe_dir):
    module_source = readme_block(OWN_TASK, "python")
    (module, *args), = bash_commands(readme_block(OWN_TASK, "bash"))
    (recipe_dir / "my_tasks.py").write_text(module_source)
    write_pairs(recipe_dir / "my_data", ".tsv", 40)
    result = run_cli(*args, *QUICK[:1], "--gin.BATCH_SIZE=2", "--gin.train.eval_steps=1", "--gin.train.eval_period=2",
                     cwd=recipe_dir, module=module)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (recipe_dir / "runs" / "my_task" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/my_task/accuracy" in r and "eval/my_task/f1" in r for r in records)


def test_own_task_example_reads_jsonl_like_tsv(tmp_path, monkeypatch):
    """The README's module with `format="jsonl"` and .jsonl files gives the examples it gives for the TSV files."""
    monkeypatch.chdir(tmp_path)
    write_pairs(tmp_path / "my_data", ".tsv", 5)
    write_pairs(tmp_path / "my_data", ".jsonl", 5)
    source = readme_block(OWN_TASK, "python")
    jsonl_source = source.replace('format="tsv"', 'format="jsonl"').replace(".tsv", ".jsonl")
    assert jsonl_source != source
    names = {"readme_tsv": source, "readme_jsonl": jsonl_source}
    try:
        for name, code in names.items():
            (tmp_path / f"{name}.py").write_text(code.replace('"my_task"', f'"{name}"'))
            runpy.run_path(str(tmp_path / f"{name}.py"))
        lengths = {"inputs": 32, "targets": 16}
        got = {name: [{k: np.asarray(v).tolist() for k, v in ex.items()} for ex in
                      seqio.get_mixture_or_task(name).get_dataset(lengths, split="validation", shuffle=False)
                      .as_numpy_iterator()] for name in names}
        assert len(got["readme_tsv"]) == 5 and got["readme_tsv"] == got["readme_jsonl"]
    finally:
        for name in names:
            seqio.TaskRegistry.remove(name)


def test_ci_runs_the_readme_test_command():
    command = readme_block("## Tests", "bash").strip()
    assert command == 'pip install -e ".[test]" && python -m pytest -q'
    assert (REPO / ".ci" / "run").read_text().strip().splitlines()[-1] == command
