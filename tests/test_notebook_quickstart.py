"""examples/notebook_quickstart.py runs top to bottom, and its predictions come from the fine-tuned model; the
README's "Python API" block runs as written."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import t5x_lite
from tests.subprocess_env import subprocess_env
from tests.test_cli import REPO
from tests.test_readme_example import readme_block

SCRIPT = REPO / "examples" / "notebook_quickstart.py"


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory) -> tuple[Path, dict]:
    """The script run from an empty folder (so it pre-trains the quickstart briefly first), with few steps."""
    cwd = tmp_path_factory.mktemp("notebook")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--pretrain_steps=3", "--examples=16", "--steps=6"],
        cwd=cwd, env=subprocess_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ERROR" not in result.stderr and "Traceback" not in result.stderr
    return cwd, json.loads(result.stdout.splitlines()[-1])


@pytest.mark.slow
def test_notebook_predictions_come_from_the_fine_tuned_model(notebook_run):
    cwd, printed = notebook_run
    assert printed["after"] != printed["before"]  # fine-tuning changed what the model says
    assert (cwd / printed["model_dir"] / "checkpoints" / "6").is_dir()
    questions = [f"{q} \\n {c}".lower() for q, c in NOTEBOOK_QUESTIONS]
    fine_tuned = t5x_lite.load(str(cwd / printed["model_dir"]))
    assert fine_tuned.predict(questions) == printed["after"]


# The script's first questions (examples/notebook_quickstart.py: qa_pairs("validation", 4)).
NOTEBOOK_QUESTIONS = [
    (json.loads(line)["question"], json.loads(line)["context"])
    for line in (REPO / "t5x_lite/data/bundled/qa/extractive_validation.jsonl").read_text().splitlines()[:4]
]


@pytest.mark.slow
def test_readme_python_api_block_runs_as_written(notebook_run, monkeypatch):
    cwd, _ = notebook_run  # holds runs/quickstart
    (cwd / "readme_api.py").write_text(readme_block("## Python API", "python"))
    monkeypatch.chdir(cwd)
    runpy.run_path(str(cwd / "readme_api.py"))
    assert (cwd / "runs" / "my_model" / "state").is_dir() and (cwd / "runs" / "my_model" / "config.gin").is_file()
