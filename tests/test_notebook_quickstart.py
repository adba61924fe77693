"""examples/notebook_quickstart.py runs top to bottom, and its predictions come from the fine-tuned model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import t5x_lite
from tests.subprocess_env import subprocess_env
from tests.test_cli import REPO

SCRIPT = REPO / "examples" / "notebook_quickstart.py"
# The script's questions (`qa_pairs("validation", 4)`), as it writes them.
QUESTIONS = [f"{r['question']} \\n {r['context']}".lower() for r in map(
    json.loads, (REPO / "t5x_lite/data/bundled/qa/extractive_validation.jsonl").read_text().splitlines()[:4])]


@pytest.mark.slow
def test_notebook_runs_as_a_script_and_predicts_with_the_fine_tuned_model(tmp_path):
    # From an empty folder, so the script pre-trains the quickstart briefly first; few steps.
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--pretrain_steps=3", "--examples=16", "--steps=6"],
        cwd=tmp_path, env=subprocess_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ERROR" not in result.stderr and "Traceback" not in result.stderr
    printed = json.loads(result.stdout.splitlines()[-1])
    assert printed["after"] != printed["before"]  # fine-tuning changed what the model says
    assert (tmp_path / printed["model_dir"] / "checkpoints" / "6").is_dir()
    assert t5x_lite.load(str(tmp_path / printed["model_dir"])).predict(QUESTIONS) == printed["after"]
