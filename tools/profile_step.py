"""Where a train step's time goes: per-op wall time from a `jax.profiler` trace, joined with the compiled HLO.

    python tools/profile_step.py --config small --batch 8 --inputs_length 512 --targets_length 114
    python tools/profile_step.py --config tiny --batch 8 --inputs_length 128 --targets_length 32 --top 20

Traces `--steps` runs of the same jitted train step `tools/benchmark.py` times (after `--warmup` runs) and
attributes the traced wall time to XLA ops. XLA's CPU runtime runs independent ops at the same time, so an
op's own duration overstates its cost: here an interval where k ops run gives each 1/k of it, and the shares
add up to the time the step kept the device busy. Ops that run a matmul are grouped by the matmul's output
shape and contraction size, with their FLOPs (counted from the HLO) and achieved FLOP/s; every other op by
its fusion kind, output shape and the JAX operation it came from. A table, then one line of JSON.

The matmul FLOPs counted from the HLO equal `benchmark.model_flops` (tested), so a group's FLOP/s is exact;
compare it with the peak `tools/benchmark.py` measures to see which products run below the machine's speed.
One blind spot: a dot XLA leaves unfused on the CPU (kind `dot`, run by Eigen) returns to the runtime before
its thread-pool work ends, so its time lands on the ops after it; the "run by" column names the op kind, and a
rate above the machine's peak marks the blind spot.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import math
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmark

from t5x_lite import host_memory
from t5x_lite.cli import UserError

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<shape>\S+) (?P<op>[\w\-]+)\((?P<args>[^)]*)\)(?P<rest>.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(?P<name>[\w.\-]+) .*\{$")


@dataclasses.dataclass
class HloOp:
    """One instruction of the compiled program, as far as the report needs it."""

    name: str
    kind: str  # the fusion kind (e.g. "ynn_fusion", "copy_bitcast_fusion") or the opcode
    shape: str  # output shape without layout, e.g. "f32[4096,512]"
    source: str  # the JAX operation it came from (HLO metadata op_name), shortened
    flops: int = 0  # matmul FLOPs (2 x output elements x contraction size) of the dots it runs
    matmul: str = ""  # "f32[4096,512] K=1024" for an op running one dot shape


def _dims(shape: str) -> list[int]:
    match = re.match(r"\w+\[([\d,]*)\]", shape)
    return [int(d) for d in match.group(1).split(",") if d] if match else []


def _dot(instruction: re.Match, shapes: dict[str, str]) -> tuple[int, str] | None:
    """FLOPs of one dot (2 x output elements x contraction size) and "f32[m,n] K=k"; `shapes` names its operands.

    None for a matrix-vector product (one operand has no free dimension, e.g. the sums with a vector of
    ones in the cpu_tuned bias add's backward): a memory-bound reduction, not one of the model's matmuls.
    """
    operands = [_dims(shapes.get(arg.strip().lstrip("%"), "")) for arg in instruction.group("args").split(",")[:2]]
    lhs = operands[0]
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.group("rest"))
    k = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i) if contracting and lhs else 1
    out = instruction.group("shape").split("{")[0]
    if any(dims and math.prod(_dims(out)) * k == math.prod(dims) for dims in operands):
        return None
    return 2 * math.prod(_dims(out)) * k, f"{out} K={k}"


def parse_hlo(text: str) -> dict[str, HloOp]:
    """Every instruction of an optimized HLO module by name; fusions carry the FLOPs of the dots they call."""
    computations: dict[str, list[re.Match]] = collections.defaultdict(list)
    current = None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group("name")
        elif current and (instruction := _INSTRUCTION.match(line)):
            computations[current].append(instruction)

    def dots(body: list[re.Match], only: re.Match | None = None) -> list[tuple[int, str]]:
        shapes = {m.group("name"): m.group("shape") for m in body}
        found = (_dot(m, shapes) for m in body if m.group("op") == "dot" and only in (None, m))
        return [dot for dot in found if dot is not None]

    ops = {}
    for body in computations.values():
        for m in body:
            name, op, rest = m.group("name"), m.group("op"), m.group("rest")
            called = re.search(r"calls=%([\w.\-]+)", rest)
            if op == "fusion" and called:
                found = dots(computations[called.group(1)])
            else:
                found = dots(body, only=m) if op == "dot" else []
            source = re.search(r'op_name="([^"]*)"', rest)
            ops[name] = HloOp(
                name=name,
                kind=name.rsplit(".", 1)[0] if op == "fusion" else op,
                shape=m.group("shape").split("{")[0],
                source=_short_source(source.group(1)) if source else "",
                flops=sum(f for f, _ in found),
                matmul=found[0][1] if len({d for _, d in found}) == 1 else "",
            )
    return ops


def _short_source(op_name: str) -> str:
    """'jit(train_step)/transpose(jvp(bqhd,bkhd->bhqk))/dot_general' -> 'transpose(jvp(bqhd,bkhd->bhqk))/dot_general'."""
    return op_name.split("/", 1)[1] if op_name.startswith("jit(") and "/" in op_name else op_name


def wall_shares(events: Sequence[dict]) -> list[float]:
    """Each event's share of the wall time (microseconds): an interval where k events overlap gives each 1/k."""
    boundaries = sorted(
        [(e["ts"], 1, i) for i, e in enumerate(events)] + [(e["ts"] + e["dur"], -1, i) for i, e in enumerate(events)]
    )
    shares = [0.0] * len(events)
    active: set[int] = set()
    last = None
    for time_us, change, index in boundaries:
        if active and last is not None:
            for running in active:
                shares[running] += (time_us - last) / len(active)
        last = time_us
        if change > 0:
            active.add(index)
        else:
            active.discard(index)
    return shares


def trace_events(trace_dir: str, ops: dict[str, HloOp]) -> list[dict]:
    """The complete ("X") events of the perfetto trace in `trace_dir` that ran an op of the compiled step."""
    files = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    if not files:
        raise UserError(f"jax.profiler wrote no perfetto trace under {trace_dir}.")
    with gzip.open(files[0]) as f:
        events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("ph") == "X" and e.get("name") in ops and "dur" in e]


def summarize(ops: dict[str, HloOp], events: Sequence[dict], steps: int) -> dict[str, Any]:
    """Per-step wall time by matmul shape and by other op group, largest first."""
    shares = wall_shares(events)
    matmuls: dict[tuple, dict[str, float]] = collections.defaultdict(lambda: {"ms": 0.0, "flops": 0, "ops": 0})
    others: dict[tuple, dict[str, float]] = collections.defaultdict(lambda: {"ms": 0.0, "ops": 0})
    for event, share in zip(events, shares):
        op = ops[event["name"]]
        if op.flops:
            group = matmuls[(op.matmul or "several dots", op.kind)]
            group["flops"] += op.flops / steps
        else:
            group = others[(op.kind, op.shape, op.source)]
        group["ms"] += share / 1e3 / steps
        group["ops"] += 1 / steps
    matmul_rows = [
        {"matmul": matmul, "kind": kind, "ms": g["ms"], "ops": round(g["ops"]), "gflop": g["flops"] / 1e9,
         "gflop_per_s": g["flops"] / g["ms"] / 1e6 if g["ms"] else 0.0}
        for (matmul, kind), g in matmuls.items()
    ]
    other_rows = [
        {"kind": kind, "shape": shape, "source": source, "ms": g["ms"], "ops": round(g["ops"])}
        for (kind, shape, source), g in others.items()
    ]
    busy_ms = sum(shares) / 1e3 / steps
    start = min(e["ts"] for e in events)
    end = max(e["ts"] + e["dur"] for e in events)
    return {
        "busy_ms": busy_ms,
        "traced_ms": (end - start) / 1e3 / steps,
        "matmul_ms": sum(r["ms"] for r in matmul_rows),
        "matmul_gflop": sum(r["gflop"] for r in matmul_rows),
        "matmuls": sorted(matmul_rows, key=lambda r: -r["ms"]),
        "others": sorted(other_rows, key=lambda r: -r["ms"]),
    }


def profile(args: argparse.Namespace) -> dict[str, Any]:
    """Compiles the train step, traces `args.steps` runs of it and returns the summary (plus the settings)."""
    config = benchmark.model_config(args.config, args.dtype, args.dropout, args.attention)
    host_batch = benchmark.synthetic_batch(config.vocab_size, args.batch, args.inputs_length, args.targets_length)
    trainer = benchmark.T5xTrainer(config, host_batch, "adamw", 1e-4)
    ops = parse_hlo(trainer.step_fn.as_text())
    for _ in range(args.warmup):
        trainer.step()
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.step()
        wall_s = (time.perf_counter() - start) / args.steps
        jax.profiler.stop_trace()
        events = trace_events(trace_dir, ops)
    if not events:
        raise UserError("The trace holds no op of the train step; was it run on this process's devices?")
    flops = benchmark.model_flops(config, args.batch, args.inputs_length, args.targets_length)
    return {
        "config": args.config, "batch": args.batch, "inputs_length": args.inputs_length,
        "targets_length": args.targets_length, "dtype": args.dtype, "dropout": args.dropout,
        "backend": jax.default_backend(), "steps": args.steps, "step_s": wall_s,
        "model_flops": flops["train_step"], **summarize(ops, events, args.steps),
    }


def format_report(report: dict[str, Any], top: int) -> str:
    rate = report["matmul_gflop"] / report["matmul_ms"] * 1e3 if report["matmul_ms"] else 0.0
    header = (
        f"t5x_lite step profile: config {report['config']}, batch {report['batch']} x {report['inputs_length']} -> "
        f"{report['targets_length']}, {report['dtype']}, dropout {report['dropout']}, {report['backend']}"
    )
    totals = (
        f"step {report['step_s'] * 1e3:.1f} ms while traced; ops busy {report['busy_ms']:.1f} ms; matmul ops "
        f"{report['matmul_ms']:.1f} ms for {report['matmul_gflop']:.2f} GFLOP ({rate:.1f} GFLOP/s)"
    )
    lines = [
        header,
        totals,
        "",
        f"{'matmul (output, contraction)':36s} {'ms':>9s} {'ops':>5s} {'GFLOP':>8s} {'GFLOP/s':>8s}  run by",
    ]
    for row in report["matmuls"][:top]:
        lines.append(
            f"{row['matmul']:36s} {row['ms']:9.1f} {row['ops']:5d} {row['gflop']:8.2f} {row['gflop_per_s']:8.1f}  "
            f"{row['kind']}"
        )
    lines += ["", f"{'other ops (kind, output shape, from)':44s} {'ms':>9s} {'ops':>5s}"]
    for row in report["others"][:top]:
        lines.append(f"{row['kind'] + ' ' + row['shape']:44s} {row['ms']:9.1f} {row['ops']:5d}  {row['source'][-60:]}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="small", help=f"model shape: {', '.join(benchmark.SHAPES)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=114)
    parser.add_argument("--dtype", default=None, help="activation dtype (default float32 on CPU, bfloat16 elsewhere)")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--attention", default="auto", help="auto, einsum, xla, cudnn (as tools/benchmark.py)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before the trace")
    parser.add_argument("--steps", type=int, default=1, help="traced runs (the report is per run)")
    parser.add_argument("--top", type=int, default=25, help="rows of each table")
    args = parser.parse_args(argv)
    if args.config not in benchmark.SHAPES:
        raise UserError(f"--config {args.config!r} is not a known shape; use one of {', '.join(benchmark.SHAPES)}.")
    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0.")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    host_memory.keep_freed_host_memory()  # as the CLIs and tools/benchmark.py run
    args.dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    report = profile(args)
    print(format_report(report, args.top))
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
