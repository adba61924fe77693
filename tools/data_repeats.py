"""T5's data-size-with-repeats experiment on the bundled corpus: the same tiny model, the same number of
steps, on the whole training text and on its first 2^k tokens repeated, scored on text none of them saw.

    python tools/data_repeats.py --out_dir runs/data_repeats
    python tools/data_repeats.py --out_dir runs/data_repeats --log2_tokens 10,14,18 --steps 500 --seed 1

Every run is the quickstart (`gin_configs/quickstart.gin`: tiny T5 v1.1, span corruption, inputs 128 ->
targets 32, Adafactor), driven through gin as `python -m t5x_lite.train` drives it, with `--steps`,
`--batch_size` and `--seed` shared; only `MIXTURE_OR_TASK_NAME` differs: `bundled_span_corruption`
(`full`) or `token_limited_task` over it (`bundled_span_corruption_first_<2^k>_tokens`: the first 2^k
tokens of `bundled/train.txt`, repeated as often as the steps need, with fresh noise every epoch).
Repeats = raw tokens the run reads (steps x batch x tokens per example) / tokens it may read. Each run
is evaluated once, after its last step, on the whole `validation` split (`bundled/validation.txt`, a
text no training run reads): the validation loss per target token.

It prints a table, writes `OUT_DIR/results.json`, and ends with one JSON line: `sizes` (one entry per
run: `name`, `tokens`, `repeats`, `validation_loss`), `tokens_read`, the settings and the seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

GIN_FILE = "quickstart.gin"
TASK = "bundled_span_corruption"
INPUTS_LENGTH, TARGETS_LENGTH = 128, 32  # quickstart.gin's


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="runs/data_repeats", help="folder for the runs and results.json")
    parser.add_argument("--overwrite", action="store_true", help="delete the runs of an earlier invocation in OUT_DIR first")
    parser.add_argument("--log2_tokens", default="10,12,14,16,18",
                        help="comma-separated k: one run on the first 2^k training tokens each (besides the full run)")
    parser.add_argument("--steps", type=int, default=250, help="training steps of every run")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="RANDOM_SEED of every run")
    parser.add_argument("--eval_steps", type=int, default=100,
                        help="validation batches (default: more than the split has, so all of it)")
    parser.add_argument("--no_progress_bar", action="store_true")
    args = parser.parse_args(argv)
    try:
        args.log2_tokens = sorted({int(k) for k in args.log2_tokens.split(",") if k.strip()})
    except ValueError:
        parser.error(f"--log2_tokens must be comma-separated whole numbers, got {args.log2_tokens!r}")
    if any(k < 1 for k in args.log2_tokens) or args.steps < 1 or args.batch_size < 1:
        parser.error("--log2_tokens, --steps and --batch_size must be >= 1")
    return args


def final_validation_loss(model_dir: Path) -> float:
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["eval/loss"] for r in records if "eval/loss" in r][-1]


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    out_dir = Path(args.out_dir).resolve()
    names = ["full", *(f"2^{k}" for k in args.log2_tokens)]
    run_dirs = {name: out_dir / name.replace("^", "_") for name in names}
    from pretraining_helps import claim_out_dir, run_training, set_up_runtime

    claim_out_dir(out_dir, list(run_dirs.values()), args.overwrite)
    set_up_runtime()
    from t5x_lite.data import token_limit
    from t5x_lite.data.preprocessors import span_corruption

    tokens_per_example = span_corruption.random_spans_lengths(INPUTS_LENGTH)[0]
    tokens_read = args.steps * args.batch_size * tokens_per_example
    full_tokens = token_limit.count_tokens(TASK)
    tasks = {"full": (TASK, full_tokens)}
    for k in args.log2_tokens:
        limit = min(2**k, full_tokens)
        tasks[f"2^{k}"] = (token_limit.register_token_limited_task(TASK, 2**k), limit)

    common = [f"TRAIN_STEPS = {args.steps}", f"BATCH_SIZE = {args.batch_size}", f"RANDOM_SEED = {args.seed}",
              f"TASK_FEATURE_LENGTHS = {{'inputs': {INPUTS_LENGTH}, 'targets': {TARGETS_LENGTH}}}",
              f"train.eval_period = {args.steps}", f"train.eval_steps = {args.eval_steps}",
              f"train.checkpoint_period = {args.steps}", f"train.log_period = {max(1, args.steps // 10)}",
              *(["train.progress_bar = False"] if args.no_progress_bar else [])]
    sizes, timings = [], {}
    for name, (task, tokens) in tasks.items():
        print(f"== {name}: {task} ({tokens} tokens, {tokens_read / tokens:.1f} repeats)", flush=True)
        t0 = time.time()
        run_training([GIN_FILE], [f"MODEL_DIR = '{run_dirs[name]}'", f"MIXTURE_OR_TASK_NAME = '{task}'", *common])
        timings[name] = round(time.time() - t0, 1)
        sizes.append({"name": name, "task": task, "tokens": tokens, "repeats": round(tokens_read / tokens, 2),
                      "validation_loss": round(final_validation_loss(run_dirs[name]), 4)})

    print(f"\n{'run':<6} {'tokens':>9} {'repeats':>9} {'validation loss':>16}")
    for size in sizes:
        print(f"{size['name']:<6} {size['tokens']:>9} {size['repeats']:>9.1f} {size['validation_loss']:>16.3f}")
    summary = {
        "sizes": sizes,
        "tokens_read": tokens_read,
        "settings": {"gin_file": GIN_FILE, "task": TASK, "steps": args.steps, "batch_size": args.batch_size,
                     "tokens_per_example": tokens_per_example, "seed": args.seed, "eval_steps": args.eval_steps,
                     "task_feature_lengths": {"inputs": INPUTS_LENGTH, "targets": TARGETS_LENGTH}},
        "seconds": {**timings, "total": round(time.time() - start, 1)},
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
