"""tools/profile_step.py: the wall-time split is exact, the HLO's matmul FLOPs are the model's, and a tiny run reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import benchmark
import profile_step

from t5x_lite.cli import UserError


def test_overlapping_ops_share_the_interval_they_run_together():
    events = [{"ts": 0.0, "dur": 10.0}, {"ts": 4.0, "dur": 10.0}, {"ts": 20.0, "dur": 2.0}]
    shares = profile_step.wall_shares(events)
    assert shares == [4.0 + 3.0, 3.0 + 4.0, 2.0]  # [4, 10) is split in two; the gap [14, 20) is nobody's


def test_hlo_parsing_counts_fused_and_unfused_dots_but_not_matrix_vector_products():
    hlo = """HloModule m

%fused_computation.1 (p0: f32[8,6,512,64], p1: f32[8,6,64,512]) -> f32[8,6,512,512] {
  %p0 = f32[8,6,512,64]{3,2,1,0} parameter(0)
  %p1 = f32[8,6,64,512]{3,2,1,0} parameter(1)
  ROOT %dot.1 = f32[8,6,512,512]{3,2,1,0} dot(%p0, %p1), lhs_batch_dims={0,1}, lhs_contracting_dims={3}, rhs_batch_dims={0,1}, rhs_contracting_dims={2}
}

ENTRY %main (a: f32[8,6,512,64], b: f32[8,6,64,512], x: f32[16,32], w: f32[32,8], v: f32[32,1]) -> f32[8,6,512,512] {
  %a = f32[8,6,512,64]{3,2,1,0} parameter(0)
  %b = f32[8,6,64,512]{3,2,1,0} parameter(1)
  %x = f32[16,32]{1,0} parameter(2)
  %w = f32[32,8]{1,0} parameter(3)
  %v = f32[32,1]{1,0} parameter(4)
  %dot.2 = f32[16,8]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/dot_general"}
  %dot.4 = f32[16,1]{1,0} dot(%x, %v), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %ynn_fusion.3 = f32[8,6,512,512]{3,2,1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.1, metadata={op_name="jit(f)/jvp(bqhd,bkhd->bhqk)/dot_general"}
}
"""
    ops = profile_step.parse_hlo(hlo)
    fused = ops["ynn_fusion.3"]
    assert (fused.kind, fused.flops, fused.matmul) == ("ynn_fusion", 2 * 8 * 6 * 512 * 512 * 64, "f32[8,6,512,512] K=64")
    assert fused.source == "jvp(bqhd,bkhd->bhqk)/dot_general"
    assert (ops["dot.2"].kind, ops["dot.2"].flops) == ("dot", 2 * 16 * 8 * 32)
    assert ops["x"].flops == 0
    assert ops["dot.4"].flops == 0  # a sum with a vector of ones (the cpu_tuned bias add's backward), not a matmul


@pytest.mark.parametrize("argv,match", [(["--config", "huge"], "--config 'huge'"), (["--steps", "0"], "--steps")])
def test_bad_flags_get_one_clear_error(argv, match):
    with pytest.raises(UserError, match=match):
        profile_step.parse_args(argv)


def test_tiny_profile_accounts_for_the_model_flops(capsys):
    argv = ["--config", "tiny", "--batch", "2", "--inputs_length", "32", "--targets_length", "8", "--warmup", "1"]
    report = profile_step.main(argv)
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(report))
    assert out[0].startswith("t5x_lite step profile: config tiny")
    config = benchmark.model_config("tiny", "float32", 0.0)
    # Every matmul the compiled step runs was found and counted: exactly the analytic model count.
    assert report["matmul_gflop"] * 1e9 == pytest.approx(benchmark.model_flops(config, 2, 32, 8)["train_step"], rel=1e-6)
    assert 0 < report["matmul_ms"] <= report["busy_ms"] <= report["traced_ms"] * 1.001
    assert report["matmuls"] and all(row["gflop_per_s"] > 0 and row["kind"] for row in report["matmuls"])
    assert report["others"] and sum(row["ms"] for row in report["others"]) > 0
