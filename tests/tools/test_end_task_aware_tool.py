"""tools/end_task_aware.py: the equal-compute step counts, a tiny run's JSON line and weights plot, bad flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.subprocess_env import subprocess_env

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import end_task_aware

TINY = ["--seeds", "0", "--steps", "4", "--batch_size", "8", "--train_examples", "40", "--eval_examples", "4",
        "--eval_steps", "1", "--no_progress_bar"]


def test_every_method_gets_the_same_budget():
    args = end_task_aware.parse_args(["--steps", "300", "--batch_size", "16"])
    assert args.budget == 4800 and args.methods == list(end_task_aware.METHODS)
    space = {f"{d}_mask_{r}_denoise": f"aang_{d}_mask_{r}_denoise" for d in ("task", "general") for r in ("bi", "l2r")}
    end = end_task_aware.EndTask("end", "eval/end/accuracy", "end_tapt", space, 300)
    # MT-TARTAN: the end task and two auxiliaries per step; META-TARTAN adds the dev head's batch; AANG computes
    # every combination (4), sampled or not, besides the end task and the dev head.
    mt, mt_batches = end_task_aware.tartan_bindings("mt_tartan", end, 0, args)
    meta, meta_batches = end_task_aware.tartan_bindings("meta_tartan", end, 0, args)
    aang, aang_batches = end_task_aware.tartan_bindings("aang", end, 3, args)
    assert (mt_batches, meta_batches, aang_batches) == (3, 4, 6)
    assert "EndTaskAware.weighting = @StaticWeighting()" in mt and "EndTaskAware.weighting = @MetaWeighting()" in meta
    assert f"EndTaskAware.auxiliaries = {space!r}" in aang and "FactoredWeighting.seed = 3" in aang
    assert end_task_aware.steps_for(4800, 16 * mt_batches) == 100 and end_task_aware.steps_for(4800, 16 * 4) == 75
    assert end_task_aware.steps_for(10, 64) == 1


def test_the_weights_plot_has_a_panel_per_learned_run(tmp_path):
    run = tmp_path / "meta"
    run.mkdir()
    records = [{"step": step, "train/aux_weight/end_task": 0.3 + step / 100, "train/aux_weight/tapt": 0.7 - step / 100,
                "train/loss": 1.0} for step in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 2.0}) + "\n")
    png = end_task_aware.plot_weights({"meta": run, "scratch": tmp_path / "scratch"}, tmp_path / "w.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert end_task_aware.plot_weights({"scratch": tmp_path / "scratch"}, tmp_path / "none.png") is None


@pytest.mark.slow
def test_tiny_comparison_writes_the_json_line_and_the_weights_plot(tmp_path, capsys):
    argv = ["--out_dir", str(tmp_path / "demo"), "--methods", "scratch", "meta_tartan", *TINY]
    summary = end_task_aware.main(argv)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert list(summary) == ["metric", "scratch", "meta_tartan"]
    assert summary["metric"] == "eval/end_task_author_40/accuracy"
    for method in ("scratch", "meta_tartan"):
        assert set(summary[method]) == {"mean", "std", "seeds"} and len(summary[method]["seeds"]) == 1
        assert 0 <= summary[method]["mean"] <= 100
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["runs"]["scratch"] == [{"steps": {"finetune": 4}, "sequences": 32}]
    assert results["runs"]["meta_tartan"] == [{"steps": {"multitask": 1}, "sequences": 32}]  # 4 batches of 8
    assert (tmp_path / "demo" / "aux_weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(SystemExit, match="pass --overwrite"):
        end_task_aware.main(argv)


@pytest.mark.parametrize("flags, message", [
    (["--tapt_fraction", "1.5"], "error: --tapt_fraction must be strictly between 0 and 1, got 1.5"),
    (["--methods", "scratch", "tartan"], "error: argument --methods: invalid choice: 'tartan'"),
])
def test_a_bad_flag_is_one_clear_error(tmp_path, flags, message):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "end_task_aware.py"), "--out_dir",
                             str(tmp_path / "demo"), *flags], check=False, capture_output=True, text=True, timeout=300,
                            env=subprocess_env(), cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "demo").exists()
