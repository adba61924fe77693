"""Runs the README's "Your own corpus" example exactly as written there."""

from __future__ import annotations

import re
import shutil

import pytest

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
