"""Compares full fine-tuning, selective fine-tuning, LoRA and prompt tuning of one pre-trained tiny T5 on the
bundled extractive QA task: trainable parameters, optimizer-state bytes, checkpoint bytes, step time and F1.

    python tools/peft_compare.py --pretrained_checkpoint runs/t5_denoising --out_dir runs/peft_compare

Every run is the README's fine-tuning recipe (`gin_configs/examples/finetune_qa_extractive.gin`: 200 steps,
batch 16, inputs 256 -> targets 8) from the same checkpoint, parsed and trained as `python -m t5x_lite.train`
does (`tools/pretraining_helps.py`'s `run_training` steps), once per method and seed:

  full        the recipe as it is (every parameter trains, Adafactor at 1e-3)
  selective   the recipe with `finetune_top_layers.gin`'s optimizer (`@selective` over Adafactor) training
              `SELECTIVE_TRAINABLE` (the top one of the tiny model's two layers per stack and the layer norms:
              the staged file's later stages, at steps 300 and 600, would never start in 200 steps)
  lora        `gin_configs/examples/lora_finetune_qa.gin` (rank 8 on every attention's query and value,
              Adafactor at 1e-2 without parameter scaling)
  prompt      `gin_configs/examples/prompt_tuning_qa.gin` (a soft prompt of 20 vectors)

Without `--pretrained_checkpoint` it first pre-trains the checkpoint with the README's denoising recipe
(`examples/t5_denoising_pretrain.gin`, 900 steps). Per run: trainable parameters (those a gradient of ones
moves through the run's optimizer), optimizer-state bytes (at initialisation), the bytes of the last
checkpoint's `state` folder (parameters it holds, optimizer state, step, RNG; the data iterator's state sits
beside it), the median seconds per train step over the logged periods (compilation and evaluation left out;
the 1-minute load average is recorded before and after each run, since other jobs may share the machine), and
SQuAD F1 on the 150 validation questions after the last step. It prints a table (mean and range over the
seeds) and ends with one JSON line; `OUT_DIR/results.json` holds the same. `--reuse` keeps the finished runs
of an earlier invocation in OUT_DIR (each has its `peft_run.json`) and trains only the missing ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from pretraining_helps import claim_out_dir, set_up_runtime

RECIPE = "examples/finetune_qa_extractive.gin"
SELECTIVE_TRAINABLE = ["top_k_layers=1", "layer_norms"]
METHODS = {
    "full": ([RECIPE], []),
    "selective": ([RECIPE], ["train.optimizer = @selective", "selective.optimizer = @adafactor",
                             f"selective.trainable = {SELECTIVE_TRAINABLE}"]),
    "lora": (["examples/lora_finetune_qa.gin"], []),
    "prompt": (["examples/prompt_tuning_qa.gin"], []),
}
TASK = "bundled_qa_extractive"
F1 = f"eval/{TASK}/f1"
PRETRAIN_GIN = "examples/t5_denoising_pretrain.gin"
PRETRAIN_STEPS = 900


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="runs/peft_compare", help="folder for the runs and results.json")
    parser.add_argument("--pretrained_checkpoint", default=None,
                        help="the tiny-T5 checkpoint every method starts from (default: pre-train one with the "
                             f"README's denoising recipe, {PRETRAIN_STEPS} steps, into OUT_DIR/pretrain)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="RANDOM_SEED of the fine-tuning runs")
    parser.add_argument("--finetune_steps", type=int, default=200)
    parser.add_argument("--reuse", action="store_true", help="keep finished runs in OUT_DIR, train the missing ones")
    parser.add_argument("--overwrite", action="store_true", help="delete the runs of an earlier invocation first")
    return parser.parse_args(argv)


def footprint() -> dict:
    """Trainable parameters, all parameters and optimizer-state bytes of the run the parsed gin config describes
    (its model with the configured adapters, its optimizer frozen to the adapters as `train()` does)."""
    import gin
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from t5x_lite.training import freezing, loop, train_state

    def bound(name: str):
        """The value `train.<name>` is bound to, as `train()` receives it."""
        value = gin.query_parameter(f"train.{name}")
        if not isinstance(value, gin.config.ConfigurableReference):
            return value
        return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn

    model, tx = bound("model"), bound("optimizer")(bound("learning_rate"))
    adapter_paths = loop.adapter_run_paths(model)
    if adapter_paths:
        tx = freezing.train_only(tx, adapter_paths)
    params = nnx.to_pure_dict(nnx.state(train_state.build_network(model, nnx.Rngs(0)), nnx.Param))
    opt_state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
    leaves = zip(jax.tree.leaves(params), jax.tree.leaves(updates))
    return {
        "trainable_params": sum(p.size for p, u in leaves if bool(jnp.any(u != 0))),
        "params": sum(p.size for p in jax.tree.leaves(params)),
        "optimizer_state_bytes": sum(x.nbytes for x in jax.tree.leaves(opt_state)),
    }


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def read_run(model_dir: Path, steps: int) -> dict:
    """F1 after the last step and the median seconds per step of the logged periods, from metrics.jsonl."""
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    f1 = [r[F1] for r in records if F1 in r and r["step"] == steps]
    rates = [r["train/steps_per_second"] for r in records if "train/steps_per_second" in r]
    return {"f1": f1[-1], "step_seconds": statistics.median(1.0 / r for r in rates)}


def run_method(method: str, seed: int, checkpoint: str, steps: int, model_dir: Path) -> dict:
    """One fine-tuning run, as the CLI does it (parse, check, train), with its footprint and measurements."""
    import gin

    from t5x_lite import cli
    from t5x_lite import train as train_lib

    files, own = METHODS[method]
    bindings = [*own, f"MODEL_DIR = '{model_dir}'", f"INITIAL_CHECKPOINT_PATH = '{checkpoint}'",
                f"RANDOM_SEED = {seed}", f"TRAIN_STEPS = {steps}", f"train.eval_period = {steps}",
                f"train.checkpoint_period = {steps}", "train.log_period = 25", "train.best_metric = None",
                "train.progress_bar = False"]
    gin.clear_config()
    try:
        cli.parse_gin(files, bindings)
        cli.check_config(files, bindings)
        sizes = footprint()
        load_before, start = os.getloadavg()[0], time.time()
        train_lib.train()
        seconds = time.time() - start
    finally:
        gin.clear_config()
    result = {
        "method": method, "seed": seed, **sizes,
        "checkpoint_state_bytes": folder_bytes(model_dir / "checkpoints" / str(steps) / "state"),
        **read_run(model_dir, steps), "run_seconds": round(seconds, 1),
        "load_before": round(load_before, 1), "load_after": round(os.getloadavg()[0], 1),
    }
    (model_dir / "peft_run.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def summarise(runs: list[dict], methods: list[str]) -> dict:
    """Per method: the sizes (the same for every seed) and the mean, min and max of F1 and step time."""
    table = {}
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        first = mine[0]
        table[method] = {
            "trainable_params": first["trainable_params"], "params": first["params"],
            "optimizer_state_bytes": first["optimizer_state_bytes"],
            "checkpoint_state_bytes": first["checkpoint_state_bytes"],
            **{key: {"mean": round(statistics.mean(r[key] for r in mine), 4),
                     "min": round(min(r[key] for r in mine), 4), "max": round(max(r[key] for r in mine), 4)}
               for key in ("f1", "step_seconds")},
            "seeds": [r["seed"] for r in mine],
            "load": [min(r["load_before"] for r in mine), max(r["load_after"] for r in mine)],
        }
    return table


def print_table(table: dict) -> None:
    print(f"\n{'method':<10} {'trainable':>16} {'optimizer state':>16} {'checkpoint':>11} "
          f"{'s/step mean (range)':>22} {'F1 mean (range)':>20}")
    for method, row in table.items():
        share = 100 * row["trainable_params"] / row["params"]
        steps, f1 = row["step_seconds"], row["f1"]
        print(f"{method:<10} {row['trainable_params']:>9,} {share:5.1f}% {row['optimizer_state_bytes']:>16,} "
              f"{row['checkpoint_state_bytes']:>11,} {steps['mean']:>7.3f} ({steps['min']:.3f}-{steps['max']:.3f}) "
              f"{f1['mean']:>7.1f} ({f1['min']:.1f}-{f1['max']:.1f})")


def pretrain(out_dir: Path) -> str:
    """The README's denoising pre-training (seed 0) into OUT_DIR/pretrain; returns its path."""
    from pretraining_helps import run_training

    checkpoint = str(out_dir / "pretrain")
    print(f"== Pre-training the tiny T5 ({PRETRAIN_GIN}, {PRETRAIN_STEPS} steps)", flush=True)
    run_training([PRETRAIN_GIN], [f"MODEL_DIR = '{checkpoint}'", f"TRAIN_STEPS = {PRETRAIN_STEPS}",
                                  "train.progress_bar = False"])
    return checkpoint


def main(argv=None) -> dict:
    args = parse_args(argv)
    out_dir = Path(args.out_dir).resolve()  # checkpoint paths are restored from absolute paths
    run_dirs = {(m, s): out_dir / f"{m}_s{s}" for m in args.methods for s in args.seeds}
    done = {key for key, path in run_dirs.items() if args.reuse and (path / "peft_run.json").exists()}
    owned = [path for key, path in run_dirs.items() if key not in done]
    if not args.pretrained_checkpoint and not (args.reuse and (out_dir / "pretrain").exists()):
        owned.append(out_dir / "pretrain")
    claim_out_dir(out_dir, owned, args.overwrite)
    set_up_runtime()
    if args.pretrained_checkpoint:
        checkpoint = str(Path(args.pretrained_checkpoint).resolve())
    elif (out_dir / "pretrain") in owned:
        checkpoint = pretrain(out_dir)
    else:
        checkpoint = str(out_dir / "pretrain")
    runs = []
    for (method, seed), model_dir in run_dirs.items():
        if (method, seed) in done:
            runs.append(json.loads((model_dir / "peft_run.json").read_text()))
            continue
        print(f"== {method}, seed {seed}, from {checkpoint}", flush=True)
        runs.append(run_method(method, seed, checkpoint, args.finetune_steps, model_dir))
    table = summarise(runs, args.methods)
    print_table(table)
    summary = {"metric": F1, "table": table, "runs": runs, "settings": {
        "pretrained_checkpoint": checkpoint, "finetune_steps": args.finetune_steps, "seeds": args.seeds,
        "methods": {m: METHODS[m] for m in args.methods}, "cpu_count": os.cpu_count()}}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
