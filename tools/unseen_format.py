"""Held-out-format generalisation (UnifiedQA's claim): train a tiny T5 on three of the four bundled QA formats,
evaluate it zero-shot on the fourth, beside a model trained on all four.

    python tools/unseen_format.py --out_dir runs/unseen_format
    python tools/unseen_format.py --out_dir runs/unseen_format --held_out yes_no,multiple_choice --seeds 0,1,2

Steps, each a run driven through gin as `python -m t5x_lite.train` / `t5x_lite.eval` drive it:

1. pre-train the tiny T5 v1.1 with BART-style denoising (`examples/t5_denoising_pretrain.gin`, seed 0, shared by
   every fine-tuning run), unless `--pretrained_checkpoint` names a checkpoint or `--pretrain_steps 0` asks for
   fine-tuning from random parameters;
2. per seed, fine-tune it on `bundled_qa_mixture` (all four formats) -> `all_four/seed<N>`;
3. per held-out format and seed, fine-tune it with the same recipe on `bundled_qa_without_<format>` (the other
   three, `t5x_lite/tasks/qa.py`) -> `without_<format>/seed<N>`;
4. evaluate each held-out format's validation split on its `without_` model (zero-shot: it never saw the format)
   and on the `all_four` model: extractive and abstractive by greedy decoding (SQuAD F1), multiple choice and
   yes/no by rank classification (`bundled_qa_multiple_choice_rank`, `bundled_qa_yes_no_rank`: the likelier
   option is the answer, so a model that never learnt to write the format's answers is still scored; chance is
   25% and 50%).

Prints a table and ends with one JSON line: `held_out_formats` (per format: `metric`, `held_out` and `all_four`,
each `mean`, `std` (sample standard deviation over the seeds) and `seeds`), the settings and the seconds each
stage took; `OUT_DIR/results.json` holds the same. The defaults (600 pre-training steps, 3 seeds, 4 formats,
15 fine-tunes of 100 steps, 24 evaluations) should take about 15 minutes on 2 idle CPU cores, estimated from
the README recipe's idle timings (docs/finetuning.md: measured only on a loaded machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from etils import epath

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

FORMATS = ("extractive", "abstractive", "multiple_choice", "yes_no")
# format -> (the task its validation split is scored on, the metric).
EVAL_TASKS = {
    "extractive": ("bundled_qa_extractive", "f1"),
    "abstractive": ("bundled_qa_abstractive", "f1"),
    "multiple_choice": ("bundled_qa_multiple_choice_rank", "accuracy"),
    "yes_no": ("bundled_qa_yes_no_rank", "accuracy"),
}
MODEL_GIN = "models/t5_1_1/tiny.gin"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="runs/unseen_format", help="folder for the runs and results.json")
    parser.add_argument("--overwrite", action="store_true", help="delete the runs of an earlier invocation in OUT_DIR first")
    parser.add_argument("--held_out", default=",".join(FORMATS),
                        help=f"comma-separated formats to hold out, one at a time (default: all of {', '.join(FORMATS)})")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated RANDOM_SEEDs of the fine-tuning runs")
    parser.add_argument("--pretrained_checkpoint", default=None,
                        help="reuse this tiny-T5 checkpoint (a MODEL_DIR) instead of pre-training")
    parser.add_argument("--pretrain_steps", type=int, default=600,
                        help="BART-style denoising steps of the pre-training run (0: fine-tune from random parameters)")
    parser.add_argument("--pretrain_batch_size", type=int, default=32)
    parser.add_argument("--finetune_steps", type=int, default=100, help="steps of every fine-tuning run")
    parser.add_argument("--batch_size", type=int, default=16, help="BATCH_SIZE of the fine-tuning runs")
    parser.add_argument("--inputs_length", type=int, default=320, help="fine-tuning and evaluation inputs length")
    parser.add_argument("--targets_length", type=int, default=64, help="fine-tuning and evaluation targets length")
    parser.add_argument("--eval_examples", type=int, default=None,
                        help="validation rows scored per format (default: all; a rank task has one row per option)")
    parser.add_argument("--gin", action="append", default=[], metavar="BINDING",
                        help="extra gin binding for the fine-tuning runs (repeatable)")
    parser.add_argument("--no_progress_bar", action="store_true")
    args = parser.parse_args(argv)
    args.held_out = [f.strip() for f in args.held_out.split(",") if f.strip()]
    unknown = [f for f in args.held_out if f not in FORMATS]
    if unknown or not args.held_out:
        parser.error(f"--held_out takes formats from {', '.join(FORMATS)}, got {args.held_out}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    return args


def pretrain(args: argparse.Namespace, out_dir: epath.Path, progress: list[str]) -> str | None:
    """The checkpoint every fine-tuning run starts from: given, built by a denoising run, or None (random)."""
    from pretraining_helps import PRETRAIN_GIN, run_training

    if args.pretrained_checkpoint:
        return str(epath.Path(args.pretrained_checkpoint).resolve())
    if args.pretrain_steps == 0:
        return None
    checkpoint = str(out_dir / "pretrain")
    print(f"== Pre-training the tiny T5 v1.1 (BART-style denoising, {args.pretrain_steps} steps)", flush=True)
    run_training([PRETRAIN_GIN["bart_denoising"]], [
        f"MODEL_DIR = '{checkpoint}'", f"TRAIN_STEPS = {args.pretrain_steps}", f"BATCH_SIZE = {args.pretrain_batch_size}",
        "RANDOM_SEED = 0", "train.eval_period = 0", *progress,
    ])
    return checkpoint


def finetune(args: argparse.Namespace, model_dir: epath.Path, mixture: str, init: str | None, seed: int,
             progress: list[str]) -> None:
    """One fine-tuning run of `examples/finetune_bundled_qa.gin` on `mixture`, without periodic evaluation."""
    from pretraining_helps import FINETUNE_GIN, run_training

    print(f"== Fine-tuning on {mixture}, seed {seed} ({'from ' + init if init else 'random init'})", flush=True)
    run_training(FINETUNE_GIN, [
        f"MODEL_DIR = '{model_dir}'", f"MIXTURE_OR_TASK_NAME = '{mixture}'", f"INITIAL_CHECKPOINT_PATH = {init!r}",
        f"TASK_FEATURE_LENGTHS = {{'inputs': {args.inputs_length}, 'targets': {args.targets_length}}}",
        f"TRAIN_STEPS = {args.finetune_steps}", f"BATCH_SIZE = {args.batch_size}", f"RANDOM_SEED = {seed}",
        "train.eval_period = 0", f"train.checkpoint_period = {args.finetune_steps}", "train.best_metric = None",
        *progress, *args.gin,
    ])


def evaluate(args: argparse.Namespace, model_dir: epath.Path, format: str) -> float:
    """The held-out format's score of the run's last checkpoint (`t5x_lite.eval`'s `evaluate_checkpoint`)."""
    import gin

    from t5x_lite import cli
    from t5x_lite import eval as eval_lib

    task, metric = EVAL_TASKS[format]
    gin.clear_config()
    try:
        cli.parse_gin(["runs/eval.gin", MODEL_GIN], [
            f"CHECKPOINT_PATH = '{model_dir}'", f"MIXTURE_OR_TASK_NAME = '{task}'",
            f"TASK_FEATURE_LENGTHS = {{'inputs': {args.inputs_length}, 'targets': {args.targets_length}}}",
            f"EVAL_OUTPUT_DIR = '{model_dir / ('eval_' + format)}'", f"make_evaluator.num_examples = {args.eval_examples}",
        ])
        return eval_lib.evaluate_checkpoint()[f"eval/{task}/{metric}"]
    finally:
        gin.clear_config()


def print_table(results: dict) -> None:
    print(f"\n{'held-out format':<16} {'metric':<38} {'trained on the other three':>27} {'trained on all four':>21}")
    for format, row in results.items():
        held, every = row["held_out"], row["all_four"]
        print(f"{format:<16} {row['metric']:<38} {held['mean']:>18.2f} +- {held['std']:<5.2f} "
              f"{every['mean']:>12.2f} +- {every['std']:<5.2f}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    out_dir = epath.Path(args.out_dir).resolve()  # checkpoint paths are restored from absolute paths
    from electra_vs_mlm import summary_stats
    from pretraining_helps import claim_out_dir, set_up_runtime

    owned = [out_dir / "all_four", *[out_dir / f"without_{f}" for f in FORMATS],
             *([] if args.pretrained_checkpoint else [out_dir / "pretrain"])]
    claim_out_dir(out_dir, owned, args.overwrite)
    set_up_runtime()
    from t5x_lite.tasks import qa as qa_tasks

    progress = ["train.progress_bar = False"] if args.no_progress_bar else []
    timings = {}
    t0 = time.time()
    init = pretrain(args, out_dir, progress)
    timings["pretrain"] = time.time() - t0
    scores = {f: {"held_out": [], "all_four": []} for f in args.held_out}
    t0 = time.time()
    for seed in args.seeds:
        model_dir = out_dir / "all_four" / f"seed{seed}"
        finetune(args, model_dir, qa_tasks.BUNDLED_MIXTURE, init, seed, progress)
        for format in args.held_out:
            scores[format]["all_four"].append(evaluate(args, model_dir, format))
    timings["all_four"] = time.time() - t0
    for format in args.held_out:
        t0 = time.time()
        for seed in args.seeds:
            model_dir = out_dir / f"without_{format}" / f"seed{seed}"
            finetune(args, model_dir, qa_tasks.leave_one_out_mixture(format), init, seed, progress)
            scores[format]["held_out"].append(evaluate(args, model_dir, format))
        timings[f"without_{format}"] = time.time() - t0

    results = {
        format: {"metric": f"eval/{EVAL_TASKS[format][0]}/{EVAL_TASKS[format][1]}",
                 **{kind: summary_stats(values) for kind, values in scores[format].items()}}
        for format in args.held_out
    }
    print_table(results)
    summary = {
        "held_out_formats": results,
        "settings": {
            "seeds": args.seeds, "init": "pre-trained" if init else "random",
            "pretrained_checkpoint": args.pretrained_checkpoint,
            "pretrain_steps": None if args.pretrained_checkpoint or not init else args.pretrain_steps,
            "finetune_steps": args.finetune_steps, "batch_size": args.batch_size,
            "task_feature_lengths": {"inputs": args.inputs_length, "targets": args.targets_length},
            "eval_examples": args.eval_examples, "extra_gin": args.gin,
        },
        "seconds": {k: round(v, 1) for k, v in {**timings, "total": time.time() - start}.items()},
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
