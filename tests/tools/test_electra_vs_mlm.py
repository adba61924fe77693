"""tools/electra_vs_mlm.py: the FLOPs both pre-trainings are counted with, and a tiny end-to-end run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from t5x_lite.models.electra import ElectraModel
from t5x_lite.models.encoder import EncoderOnlyMLMModel
from t5x_lite.networks.bert import BertConfig
from t5x_lite.networks.electra import ElectraConfig
from tests.subprocess_env import subprocess_env

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import electra_vs_mlm

SIZES = {"vocab_size": 100, "d_model": 16, "num_heads": 2, "head_dim": 8, "d_ff": 32, "num_layers": 2}


def test_flops_are_counted_the_same_way_for_both():
    # One layer per token: 4 projections 16x16 and the MLP 16x32 twice (2 FLOPs a multiply-add), attention
    # 2 x 2 x length x 16; two layers; no projection at equal widths.
    per_token = 2 * (2 * (4 * 16 * 16 + 2 * 16 * 32) + 2 * 2 * 10 * 16)
    assert electra_vs_mlm.encoder_flops_per_token(16, 16, 32, 2, 10, 16) == per_token
    assert electra_vs_mlm.encoder_flops_per_token(16, 16, 32, 2, 10, 8) == per_token + 2 * 8 * 16
    batch, length, chosen = 3, 10, 3 * round(0.15 * 8)
    mlm = electra_vs_mlm.pretraining_flops(EncoderOnlyMLMModel(BertConfig(**SIZES)), batch, length)
    assert mlm == 3 * (batch * length * per_token + chosen * (2 * 16 * 16 + 2 * 16 * 100))
    electra = electra_vs_mlm.pretraining_flops(ElectraModel(ElectraConfig(**SIZES)), batch, length)
    # The generator: width 4, one head of 4, d_ff 8, from the 16-wide shared embeddings.
    generator = 2 * (2 * (4 * 4 * 4 + 2 * 4 * 8) + 2 * 2 * 10 * 4) + 2 * 16 * 4
    discriminator_head = 2 * 16 * 16 + 2 * 16
    expected = batch * length * (per_token + generator + discriminator_head) + chosen * (2 * 4 * 16 + 2 * 16 * 100)
    assert electra == 3 * expected


@pytest.mark.slow
def test_electra_vs_mlm_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "electra_vs_mlm.py"), "--out_dir", str(tmp_path / "demo"), "--seeds", "0",
         "--mlm_steps", "2", "--batch_size", "4", "--length", "32", "--finetune_steps", "2", "--finetune_batch_size", "4",
         "--eval_examples", "8", "--eval_steps", "1", "--no_progress_bar"],
        check=False, capture_output=True, text=True, timeout=1200, env=subprocess_env(), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["metric"] == "eval/bundled_cls_single/accuracy"
    for kind in ("electra", "mlm"):
        assert set(summary[kind]) == {"mean", "std", "seeds"} and len(summary[kind]["seeds"]) == 1
        assert 0 <= summary[kind]["mean"] <= 100
    flops = summary["flops"]
    assert flops["mlm"]["steps"] == 2 and flops["electra"]["steps"] >= 1
    assert abs(flops["electra"]["total"] - flops["mlm"]["total"]) <= flops["electra"]["per_step"] / 2  # equal compute
    assert json.loads((tmp_path / "demo" / "results.json").read_text()) == summary
