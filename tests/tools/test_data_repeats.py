"""tools/data_repeats.py runs end to end with tiny settings and reports one entry per data size."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import data_repeats


@pytest.mark.slow
def test_data_repeats_tiny(tmp_path, capsys):
    argv = ["--out_dir", str(tmp_path / "demo"), "--log2_tokens", "10,8", "--steps", "2", "--batch_size", "8",
            "--eval_steps", "1", "--no_progress_bar"]
    summary = data_repeats.main(argv)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert json.loads((tmp_path / "demo" / "results.json").read_text()) == summary
    sizes = summary["sizes"]
    assert [s["name"] for s in sizes] == ["full", "2^8", "2^10"]
    assert [s["tokens"] for s in sizes[1:]] == [256, 1024] and sizes[0]["tokens"] > 2**19  # the bundled corpus
    read = summary["tokens_read"]
    assert read == 2 * 8 * summary["settings"]["tokens_per_example"]
    assert [s["repeats"] for s in sizes] == [round(read / s["tokens"], 2) for s in sizes]
    assert sizes[1]["task"] == "bundled_span_corruption_first_256_tokens"
    assert all(np.isfinite(s["validation_loss"]) for s in sizes)
    for name in ("full", "2_8", "2_10"):
        config = (tmp_path / "demo" / name / "config.gin").read_text()
        assert "TRAIN_STEPS = 2" in config and "RANDOM_SEED = 0" in config

    with pytest.raises(SystemExit, match="pass --overwrite"):
        data_repeats.main(argv)
