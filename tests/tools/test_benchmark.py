"""tools/benchmark.py: its FLOP count is right and one tiny run yields a complete, sane report (no timing checks)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import benchmark

from t5x_lite.cli import UserError
from t5x_lite.networks.t5 import T5
from t5x_lite.nn import kernels


@pytest.mark.parametrize("feed_forward", ["gated-gelu", "relu"])
def test_model_flops_match_xla_cost_analysis(feed_forward):
    """The analytic forward count leaves out only elementwise work, which XLA's count includes."""
    config = dataclasses.replace(benchmark.model_config("tiny", "float32", 0.0), feed_forward=feed_forward)
    batch = benchmark.synthetic_batch(config.vocab_size, 2, 64, 16)
    graphdef, state = nnx.split(T5(config, rngs=nnx.Rngs(0)))
    forward = jax.jit(lambda s, x, y: nnx.merge(graphdef, s)(x, y))
    compiled = forward.lower(state, batch["encoder_input_tokens"], batch["decoder_input_tokens"]).compile()
    xla_flops = compiled.cost_analysis()["flops"]
    flops = benchmark.model_flops(config, 2, 64, 16)
    assert 0.95 * xla_flops <= flops["forward"] <= xla_flops
    assert flops["train_step"] == 3 * flops["forward"]


def test_synthetic_batch_is_a_shifted_full_batch():
    batch = benchmark.synthetic_batch(100, 3, 7, 5)
    assert batch["encoder_input_tokens"].shape == (3, 7) and batch["encoder_input_tokens"].min() >= 2
    assert (batch["decoder_input_tokens"][:, 0] == 0).all()
    assert (batch["decoder_input_tokens"][:, 1:] == batch["decoder_target_tokens"][:, :-1]).all()
    assert (batch["decoder_loss_weights"] == 1).all()


def _fake_clock(monkeypatch) -> tuple[types.SimpleNamespace, list[str]]:
    """benchmark's `time` replaced by a clock that only the fake runners advance; returns it and the call log."""
    clock = types.SimpleNamespace(now=0.0)
    clock.perf_counter = clock.process_time = lambda: clock.now
    monkeypatch.setattr(benchmark, "time", clock)
    return clock, []


def _fake_runner(clock: types.SimpleNamespace, calls: list[str], name: str, seconds: float):
    def run():
        calls.append(name)
        clock.now += seconds

    return run


def test_time_alternating_runs_sides_in_turns_of_turn_s(monkeypatch):
    """A 0.3 s side warms up for 1 s (4 runs) and then runs 4 at a turn; a 2 s side warms up and runs one at a
    time; turns alternate until each side has `repeats` timed runs."""
    clock, calls = _fake_clock(monkeypatch)
    runners = {"fast": _fake_runner(clock, calls, "f", 0.3), "slow": _fake_runner(clock, calls, "s", 2.0)}
    wall, cpu = benchmark.time_alternating(runners, warmup=1, repeats=2, turn_s=1.0)
    assert "".join(calls) == "ffff" + "s" + "ffffs" * 2
    assert wall["fast"] == pytest.approx([0.3] * 8) and wall["slow"] == pytest.approx([2.0] * 2)
    assert cpu == wall


def test_time_alternating_takes_at_least_turns_turns(monkeypatch):
    """Enough runs after one turn, but every side still gets `turns` turns, interleaved."""
    clock, calls = _fake_clock(monkeypatch)
    runners = {"fast": _fake_runner(clock, calls, "f", 0.5), "slow": _fake_runner(clock, calls, "s", 2.0)}
    wall, _ = benchmark.time_alternating(runners, warmup=1, repeats=1, turn_s=1.0, turns=3)
    assert "".join(calls) == "ff" + "s" + "ffs" * 3
    assert len(wall["fast"]) == 6 and len(wall["slow"]) == 3


def test_time_alternating_with_turn_s_zero_switches_every_run(monkeypatch):
    """Warm-up turns alternate like the timed ones (the two sides' steady state depends on each other)."""
    clock, calls = _fake_clock(monkeypatch)
    runners = {"a": _fake_runner(clock, calls, "a", 0.01), "b": _fake_runner(clock, calls, "b", 0.02)}
    wall, _ = benchmark.time_alternating(runners, warmup=2, repeats=3, turn_s=0.0)
    assert "".join(calls) == "ab" * 2 + "ab" * 3
    assert len(wall["a"]) == len(wall["b"]) == 3


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--config", "huge"], "--config 'huge'"),
        (["--compare-hf", "--optimizer", "adafactor"], "AdamW on both sides"),
        (["--decode_lengths", "8", "4"], "increasing"),
        (["--dtype", "float33"], "float33"),
        (["--steps", "0"], "--steps"),
        (["--turn_s", "-1"], "--turn_s"),
        (["--turns", "0"], "--turns"),
        (["--inputs_length", "512", "--targets_length", "100"], "targets_length >= 114"),
    ],
)
def test_bad_flags_get_one_clear_error(argv, match):
    with pytest.raises(UserError, match=match):
        benchmark.parse_args(argv)


def _run(capsys, argv: list[str]) -> dict:
    results = benchmark.main(argv)
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(results))  # the last line is the whole report
    assert out[0].startswith("t5x_lite benchmark: config tiny")  # the table comes first
    return results


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_tiny_run_reports_every_figure(capsys):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    threads = torch.get_num_threads()
    argv = [
        "--config", "tiny", "--batch", "2", "--inputs_length", "16", "--targets_length", "6", "--compare-hf",
        "--dropout", "0.0", "0.1", "--steps", "2", "--warmup", "1", "--peak_size", "256", "--peak_repeats", "2",
        "--decode_lengths", "2", "4", "--decode_repeats", "1", "--beam_size", "2", "--data_batches", "2",
        "--turn_s", "0.05",
    ]
    try:
        r = _run(capsys, argv)
    finally:
        torch.set_num_threads(threads)
    assert r["config"] == "tiny" and r["model"]["vocab_size"] == 2048 and r["dtype"] == "float32"
    assert not r["model"]["scan_layers"]  # auto: a Python loop over layers on CPU
    assert r["flops"] == benchmark.model_flops(benchmark.model_config("tiny", "float32", 0.0), 2, 16, 6)
    assert _positive(r["peak"]["flops_per_s"])

    assert [(row["impl"], row["dropout"]) for row in r["train"]] == [
        ("t5x_lite", 0.0), ("hf", 0.0), ("t5x_lite", 0.1), ("hf", 0.1)
    ]
    for row in r["train"]:
        assert len(row["step_s_all"]) >= 2 and all(_positive(t) for t in row["step_s_all"])
        assert row["tokens_per_s"] == pytest.approx(2 * (16 + 6) / row["step_s"])
        assert row["mfu"] == pytest.approx(r["flops"]["train_step"] / row["step_s"] / r["peak"]["flops_per_s"])
        assert 0 < row["loss"] < 3 * math.log(2048)  # both models start near uniform predictions
    assert r["train"][0]["compile_s"] > 0
    assert set(r["ratio_vs_hf_by_dropout"]) == {"0.0", "0.1"}
    assert r["ratio_vs_hf"] == r["ratio_vs_hf_by_dropout"]["0.0"] and _positive(r["ratio_vs_hf"])

    decode = {(row["impl"], row["method"], row["length"]): row for row in r["decode"]}
    assert set(decode) == {(i, m, n) for i in ("t5x_lite", "hf") for m in ("greedy", "beam2") for n in (2, 4)}
    assert all(_positive(row["tokens_per_s"]) for row in r["decode"])
    assert "marginal_ms_per_step" in decode[("t5x_lite", "greedy", 4)]
    assert r["decode_ratio_vs_hf"] == r["decode_ratio_vs_hf_by_method"]["greedy"]["4"]
    assert _positive(r["decode_ratio_vs_hf"])

    kernels = {row["kernel"]: row for row in r["kernels"]}
    assert set(kernels) == set(benchmark.kernel_shapes(benchmark.model_config("tiny", "float32", 0.0), 2, 16))
    for row in kernels.values():
        assert _positive(row["flops_per_s"]) and _positive(row["hf_flops_per_s"])
        assert row["ratio_vs_hf"] == pytest.approx(row["flops_per_s"] / row["hf_flops_per_s"])
    assert kernels["feed-forward in"]["flops"] == 2 * 2 * 16 * 128 * 256

    data = r["data"]
    assert _positive(data["rows_per_s"]) and 0.5 < data["fill"] <= 1.0
    assert data["ratio_vs_step"] == pytest.approx(data["rows_per_s"] / (2 / r["train"][0]["step_s"]))


@pytest.mark.slow
def test_bf16_train_step_runs_against_hf_autocast(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    argv = [
        "--config", "tiny", "--batch", "2", "--inputs_length", "16", "--targets_length", "4", "--compare-hf",
        "--dtype", "bfloat16", "--dropout", "0.1", "--steps", "1", "--warmup", "1", "--turn_s", "0",
        "--peak_size", "256", "--skip", "data", "decode", "--scan_layers", "on",
    ]
    r = _run(capsys, argv)
    assert r["model"]["dtype"] == "bfloat16" and r["model"]["scan_layers"]
    assert r["peak"]["dtype"] == r["dot_dtype"] == kernels.resolve("auto").operand_dtype("bfloat16").name
    assert [row["impl"] for row in r["train"]] == ["t5x_lite", "hf"]
    assert all(0 < row["loss"] < 3 * math.log(2048) for row in r["train"])
    assert _positive(r["ratio_vs_hf"]) and "decode" not in r and "data" not in r


def test_failed_cudnn_attention_falls_back_to_einsum_and_says_why():
    def build(config):
        if config.attention_impl == "cudnn":
            raise ValueError("Bias must have same seq length as QKV, got 1 and 16")
        return config.attention_impl

    config = benchmark.model_config("tiny", "bfloat16", 0.0, "cudnn")
    built, attention = benchmark.with_attention_fallback(build, config)
    assert built == "einsum" and attention.startswith("einsum (cudnn failed: ValueError: Bias must have")
    _, attention = benchmark.with_attention_fallback(build, benchmark.model_config("tiny", "bfloat16", 0.1, "xla"))
    assert attention == "einsum (fused kernels have no attention dropout)"
    with pytest.raises(RuntimeError, match="not cudnn"):  # other implementations' errors are not swallowed
        benchmark.with_attention_fallback(lambda c: (_ for _ in ()).throw(RuntimeError("not cudnn")),
                                          benchmark.model_config("tiny", "bfloat16", 0.0, "xla"))


def test_kernel_forms_compute_the_same_products_on_both_sides():
    """Each kernel of the side-by-side (ours: the kernels' einsum in model layouts; HF's torch product in its
    layouts) computes the same numbers, so the GFLOP/s compare like for like."""
    torch = pytest.importorskip("torch")
    config = benchmark.model_config("tiny", "float32", 0.0)
    # Our result -> HF's layout.
    to_hf = {
        "projection (q/k/v)": lambda o: o.reshape(*o.shape[:2], -1),
        "weight gradient": lambda o: o.T,
        "attention values": lambda o: o.transpose(0, 2, 1, 3),
    }
    rng = np.random.default_rng(0)
    for name, (spec, x_shape, y_shape) in benchmark.kernel_shapes(config, 2, 16).items():
        x, y = rng.standard_normal(x_shape, np.float32), rng.standard_normal(y_shape, np.float32)
        ours = np.asarray(kernels.resolve("auto").einsum(spec, jnp.asarray(x), jnp.asarray(y), dtype=jnp.float32))
        theirs = benchmark._torch_kernel(torch, name, x, y, "cpu", torch.float32)().numpy()
        np.testing.assert_allclose(to_hf.get(name, lambda o: o)(ours), theirs, rtol=1e-4, atol=1e-4, err_msg=name)
