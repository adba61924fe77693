"""Shows that pre-training helps fine-tuning: a pre-trained tiny T5 against its randomly
initialised twin, with all and with a small fraction of the training examples.

    python tools/pretraining_helps.py --out_dir runs/pretraining_helps
    python tools/pretraining_helps.py --out_dir runs/pretraining_helps --pretrained_checkpoint runs/quickstart

Steps, each a run driven through gin exactly as `python -m t5x_lite.train` drives it
(`t5x_lite.cli.parse_gin`, then `t5x_lite.train.train()`):

1. pre-train the tiny T5 v1.1 on the bundled corpus, unless `--pretrained_checkpoint` names a
   checkpoint: by default with BART-style denoising (`gin_configs/examples/t5_denoising_pretrain.gin`,
   600 steps; the decoder reconstructs the whole input, which teaches the copying extractive QA
   needs), with span corruption as the quickstart does (`--pretrain_objective span_corruption`), or with
   UL2's mixture of denoisers (`--pretrain_objective ul2`, `gin_configs/examples/ul2_tiny_pretrain.gin`, 600 steps);
2. fine-tune it on a bundled QA task (`gin_configs/examples/finetune_bundled_qa.gin` +
   `models/t5_1_1/tiny.gin`; default: the extractive "Who says ...?" task) -> run `pretrained`;
3. fine-tune a randomly initialised twin with the same recipe (steps, batch, learning rate,
   seed, data order: `INITIAL_CHECKPOINT_PATH = None` is the only difference) -> run `scratch`;
4. repeat 2 and 3 on a random `--small_fraction` of the training examples (a QA task registered
   over a seeded subset of the JSONL, same validation set) -> `pretrained_small`, `scratch_small`.

It prints a table, writes `OUT_DIR/learning_curves.png` (the four runs, `tools/plot_metrics.py`)
and `OUT_DIR/results.json`, and ends with one JSON line: `metric` (default: the task's score, SQuAD
F1 for the extractive task, higher is better; `--metric eval_loss` picks the validation
cross-entropy per answer token), its value after the last step for `pretrained`, `scratch`, `pretrained_small`,
`scratch_small`, its `best` per run, the first evaluation step at which each pre-trained run
matched its twin's final value (faster convergence), the task metric and token accuracy per run,
the settings and the seconds each stage took.

The defaults fit a 2-core CPU in about 15 minutes. Validation asks about The Tempest, a play no
training question comes from, so the answer is a name the model must copy from the context: the
randomly initialised twin never learns that within the budget (F1 0), the denoising-pre-trained
model does. Pre-trained with span corruption instead, F1 stays 0 too (the validation loss still
shows that pre-training helps).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

FORMATS = ("extractive", "abstractive", "multiple_choice", "yes_no")
# The score each format is judged by (the mixture: their mean).
PRIMARY_METRIC = {"extractive": "f1", "abstractive": "f1", "multiple_choice": "accuracy", "yes_no": "accuracy"}
RUNS = ("pretrained", "scratch", "pretrained_small", "scratch_small")
FINETUNE_GIN = ["examples/finetune_bundled_qa.gin", "models/t5_1_1/tiny.gin"]
# --pretrain_objective -> the gin file of the pre-training run (both: the tiny T5 v1.1 on the bundled corpus).
PRETRAIN_GIN = {"bart_denoising": "examples/t5_denoising_pretrain.gin", "span_corruption": "quickstart.gin",
                "ul2": "examples/ul2_tiny_pretrain.gin"}
# Settings of the fine-tuning recipe reported in the results (as the gin files and flags set them).
REPORTED = ("constant_schedule.learning_rate", "DROPOUT_RATE/macro.value", "train.optimizer")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="runs/pretraining_helps", help="folder for the runs, the plot and results.json")
    parser.add_argument("--overwrite", action="store_true", help="delete the runs of an earlier invocation in OUT_DIR first")
    parser.add_argument("--pretrained_checkpoint", default=None,
                        help="reuse this tiny-T5 checkpoint (a MODEL_DIR such as runs/quickstart) instead of pre-training")
    parser.add_argument("--pretrain_objective", default="bart_denoising", choices=sorted(PRETRAIN_GIN),
                        help="objective of the pre-training run (span_corruption: the quickstart's)")
    parser.add_argument("--pretrain_steps", type=int, default=None,
                        help="pre-training steps (default: the objective's gin file, 600 denoising and UL2 / 300 span corruption)")
    parser.add_argument("--pretrain_batch_size", type=int, default=32)
    parser.add_argument("--task", default="extractive", choices=[*FORMATS, "mixture"],
                        help="bundled QA task to fine-tune on (mixture: bundled_qa_mixture, scored by the mean of "
                             "the tasks' primary metrics)")
    parser.add_argument("--finetune_steps", type=int, default=200, help="steps of every fine-tuning run")
    parser.add_argument("--metric", default="score", choices=["score", "eval_loss"],
                        help="headline of the JSON line: the task's validation score (F1/accuracy) or the validation loss")
    parser.add_argument("--small_fraction", type=float, default=0.1, help="fraction of training examples of the small runs")
    parser.add_argument("--batch_size", type=int, default=16, help="BATCH_SIZE of the fine-tuning runs")
    parser.add_argument("--learning_rate", type=float, default=None, help="constant Adafactor rate (default: the gin file's)")
    parser.add_argument("--dropout_rate", type=float, default=None, help="default: the gin file's")
    parser.add_argument("--inputs_length", type=int, default=None, help="default: 256 for extractive, else 320")
    parser.add_argument("--targets_length", type=int, default=None, help="default: 8 for extractive, 4 yes/no, else 64")
    parser.add_argument("--eval_period", type=int, default=50)
    parser.add_argument("--eval_examples", type=int, default=None, help="validation questions decoded per task (default: all)")
    parser.add_argument("--eval_steps", type=int, default=5, help="batches of the validation loss")
    parser.add_argument("--seed", type=int, default=0, help="RANDOM_SEED of every run and the subset's seed")
    parser.add_argument("--gin", action="append", default=[], metavar="BINDING",
                        help="extra gin binding for the fine-tuning runs (repeatable), e.g. --gin \"train.log_period = 10\"")
    parser.add_argument("--no_progress_bar", action="store_true")
    return parser.parse_args(argv)


# ------------------------------------------------------------------ tasks


def task_names(task: str) -> list[str]:
    return [f"bundled_qa_{f}" for f in FORMATS] if task == "mixture" else [f"bundled_qa_{task}"]


def register_small_task(task: str, fraction: float, seed: int, data_dir: Path) -> tuple[str, list[str], int]:
    """A task (or mixture) like the bundled one over a random `fraction` of each training file.

    Returns its name, the names of its tasks and its number of training examples.
    """
    from t5x_lite.data import registration
    from t5x_lite.tasks import qa as qa_tasks

    percent = f"{100 * fraction:g}".replace(".", "_")
    data_dir.mkdir(parents=True, exist_ok=True)
    names, examples = [], 0
    for fmt in FORMATS if task == "mixture" else [task]:
        lines = (qa_tasks.QA_DIR / f"{fmt}_train.jsonl").read_text().splitlines()
        keep = max(1, round(fraction * len(lines)))
        subset = sorted(random.Random(seed).sample(range(len(lines)), keep))
        train_file = data_dir / f"{fmt}_train_{percent}pct.jsonl"
        train_file.write_text("".join(lines[i] + "\n" for i in subset))
        name = f"bundled_qa_{fmt}_{percent}pct"
        validation = str(qa_tasks.QA_DIR / f"{fmt}_validation.jsonl")
        registration.register_qa_task(name, {"train": str(train_file), "validation": validation}, format=fmt, overwrite=True)
        names.append(name)
        examples += keep
    if task != "mixture":
        return names[0], names, examples
    name = f"{qa_tasks.BUNDLED_MIXTURE}_{percent}pct"
    # The proportions of bundled_qa_mixture: its cap on a task's rate shrinks with the data.
    registration.register_qa_mixture(name, names, maximum=max(1, round(registration.QA_MIXING_MAXIMUM * fraction)),
                                 overwrite=True)
    return name, names, examples


def count_train_examples(task: str) -> int:
    from t5x_lite.tasks import qa as qa_tasks

    formats = FORMATS if task == "mixture" else (task,)
    return sum(len((qa_tasks.QA_DIR / f"{f}_train.jsonl").read_text().splitlines()) for f in formats)


def score(record: dict, names: list[str], task: str) -> float | None:
    """The run's task score in one metrics.jsonl record: the primary metric (mean over a mixture's tasks)."""
    formats = FORMATS if task == "mixture" else (task,)
    keys = [f"eval/{name}/{PRIMARY_METRIC[fmt]}" for name, fmt in zip(names, formats)]
    if not all(k in record for k in keys):
        return None
    return sum(record[k] for k in keys) / len(keys)


def read_curves(model_dir: Path, names: list[str], task: str) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of the evaluations of a run, from its metrics.jsonl: `score`, `eval/loss`, `eval/accuracy`."""
    found = {"score": [], "eval/loss": [], "eval/accuracy": []}
    for line in (model_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        value = score(record, names, task)
        if value is not None:
            found["score"].append((record["step"], value))
        for key in ("eval/loss", "eval/accuracy"):
            if key in record:
                found[key].append((record["step"], record[key]))
    return found


# ------------------------------------------------------------------ runs


def claim_out_dir(out_dir: Path, owned: list[Path], overwrite: bool) -> None:
    """Empties the folders this tool writes in `out_dir`; refuses (exit) when one exists and not `overwrite`."""
    existing = [str(p) for p in owned if p.exists()]
    if existing and not overwrite:
        sys.exit(f"error: {', '.join(existing)} exist (training would resume them); pass --overwrite or another --out_dir.")
    for path in owned:
        shutil.rmtree(path, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def set_up_runtime() -> None:
    """The process set-up `python -m t5x_lite.train` does before its runs: TensorFlow without its C++ start-up logs
    and off GPUs, seqio's unactionable warnings off, the gin configurables declared, host memory kept, library logs
    through absl with INFO chatter off."""
    from absl import logging

    from t5x_lite import cli, host_memory

    cli.keep_tensorflow_off_gpus()
    cli.filter_unactionable_warnings()
    import t5x_lite.configurables  # noqa: F401  (declares the gin configurables the gin files name)

    host_memory.keep_freed_host_memory()
    logging.use_absl_handler()
    logging.set_verbosity(logging.WARNING)


def run_training(gin_files: list[str], bindings: list[str], report: tuple[str, ...] = ()) -> dict:
    """One run, as the CLI does it: parse the gin files and bindings, check the macros, train.

    Returns the values of the gin parameters named in `report` (e.g. "DROPOUT_RATE/macro.value").
    """
    import gin

    from t5x_lite import cli
    from t5x_lite import train as train_lib

    gin.clear_config()
    try:
        cli.parse_gin(gin_files, bindings)
        cli.check_config(gin_files, bindings)
        values = {name: gin.query_parameter(name) for name in report}
        train_lib.train()
        return values
    finally:
        gin.clear_config()


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    out_dir = Path(args.out_dir).resolve()  # checkpoint paths are restored from absolute paths
    run_dirs = {name: out_dir / name for name in RUNS}
    # What this tool writes in OUT_DIR (a given --pretrained_checkpoint is never touched).
    owned = [*run_dirs.values(), out_dir / "data", *([] if args.pretrained_checkpoint else [out_dir / "pretrain"])]
    claim_out_dir(out_dir, owned, args.overwrite)

    from plot_metrics import plot

    set_up_runtime()
    timings = {}
    progress = [] if not args.no_progress_bar else ["train.progress_bar = False"]
    if args.pretrained_checkpoint:
        checkpoint = str(Path(args.pretrained_checkpoint).resolve())
        pretrain_steps = None
        print(f"== Reusing the pre-trained checkpoint {checkpoint}", flush=True)
    else:
        checkpoint = str(out_dir / "pretrain")
        steps = [] if args.pretrain_steps is None else [f"TRAIN_STEPS = {args.pretrain_steps}"]
        print(f"== Pre-training the tiny T5 v1.1 ({args.pretrain_objective.replace('_', ' ')}, bundled corpus, "
              f"{PRETRAIN_GIN[args.pretrain_objective]})", flush=True)
        t0 = time.time()
        pretrain_steps = run_training([PRETRAIN_GIN[args.pretrain_objective]], [
            f"MODEL_DIR = '{checkpoint}'", *steps, f"BATCH_SIZE = {args.pretrain_batch_size}",
            f"RANDOM_SEED = {args.seed}", f"train.eval_steps = {args.eval_steps}", *progress,
        ], ("TRAIN_STEPS/macro.value",))["TRAIN_STEPS/macro.value"]
        timings["pretrain"] = time.time() - t0

    full_task = "bundled_qa_mixture" if args.task == "mixture" else f"bundled_qa_{args.task}"
    small_task, small_names, small_examples = register_small_task(args.task, args.small_fraction, args.seed,
                                                                  out_dir / "data")
    names = {"full": task_names(args.task), "small": small_names}
    train_examples = {"full": count_train_examples(args.task), "small": small_examples}
    inputs_length = args.inputs_length or (256 if args.task == "extractive" else 320)
    targets_length = args.targets_length or {"extractive": 8, "yes_no": 4}.get(args.task, 64)
    common = [
        f"TASK_FEATURE_LENGTHS = {{'inputs': {inputs_length}, 'targets': {targets_length}}}",
        f"TRAIN_STEPS = {args.finetune_steps}",
        f"BATCH_SIZE = {args.batch_size}",
        f"RANDOM_SEED = {args.seed}",
        f"train.eval_period = {args.eval_period}",
        f"train.eval_steps = {args.eval_steps}",
        f"train.checkpoint_period = {args.finetune_steps}",
        f"make_evaluator.num_examples = {args.eval_examples}",
        "train.best_metric = None",
        *([f"constant_schedule.learning_rate = {args.learning_rate}"] if args.learning_rate is not None else []),
        *([f"DROPOUT_RATE = {args.dropout_rate}"] if args.dropout_rate is not None else []),
        *progress,
        *args.gin,
    ]
    plans = {
        "pretrained": (full_task, checkpoint),
        "scratch": (full_task, None),
        "pretrained_small": (small_task, checkpoint),
        "scratch_small": (small_task, None),
    }
    for run, (task_name, init) in plans.items():
        print(f"== Fine-tuning `{run}` on {task_name} ({'from ' + init if init else 'random init'})", flush=True)
        t0 = time.time()
        effective = run_training(FINETUNE_GIN, [f"MODEL_DIR = '{run_dirs[run]}'", f"MIXTURE_OR_TASK_NAME = '{task_name}'",
                                                f"INITIAL_CHECKPOINT_PATH = {init!r}", *common], REPORTED)
        timings[run] = time.time() - t0

    task_metric = (f"eval/{full_task}/{PRIMARY_METRIC[args.task]}" if args.task != "mixture"
                   else "mean of " + ", ".join(f"eval/{n}/{PRIMARY_METRIC[f]}" for n, f in zip(names["full"], FORMATS)))
    curves_by_run = {run: read_curves(run_dirs[run], names["small" if run.endswith("_small") else "full"], args.task)
                     for run in RUNS}
    headline = "eval/loss" if args.metric == "eval_loss" else "score"
    lower_is_better = headline == "eval/loss"

    def final(run, key):
        return curves_by_run[run][key][-1][1]

    def best(run, key):
        values = [v for _, v in curves_by_run[run][key]]
        return min(values) if key == "eval/loss" else max(values)

    def first_step_matching(run, twin, key):
        """Faster convergence: the first evaluation at which `run` matched `twin`'s final value."""
        target = final(twin, key)
        better = (lambda v: v <= target) if key == "eval/loss" else (lambda v: v >= target)
        return next((step for step, value in curves_by_run[run][key] if better(value)), None)

    score_key = PRIMARY_METRIC[FORMATS[0] if args.task == "mixture" else args.task]
    plot_metrics = ["train/loss", "eval/loss", f"eval/{names['full'][0]}/{score_key}",
                    f"eval/{names['small'][0]}/{score_key}"]
    png = plot([str(run_dirs[run]) for run in RUNS], str(out_dir / "learning_curves.png"), plot_metrics)

    short = task_metric if args.task != "mixture" else "QA score (mean)"
    print(f"\n{'run':<17} {'init':<11} {'examples':>8} {'eval/loss last':>14} {'best':>6} "
          f"{short + ' last':>{len(short) + 5}} {'best':>6} {'eval/accuracy':>13}")
    for run in RUNS:
        size = "small" if run.endswith("_small") else "full"
        print(f"{run:<17} {'pre-trained' if run.startswith('pretrained') else 'random':<11} {train_examples[size]:>8} "
              f"{final(run, 'eval/loss'):>14.3f} {best(run, 'eval/loss'):>6.3f} "
              f"{final(run, 'score'):>{len(short) + 5}.2f} {best(run, 'score'):>6.2f} {final(run, 'eval/accuracy'):>13.3f}")
    print(f"learning curves: {png}")

    rounding = 4 if lower_is_better else 2
    summary = {
        "metric": "eval/loss" if lower_is_better else task_metric,
        "lower_is_better": lower_is_better,
        **{run: round(final(run, headline), rounding) for run in RUNS},  # after the last step
        "best": {run: round(best(run, headline), rounding) for run in RUNS},  # over the evaluations
        "pretrained_steps_to_match_scratch": first_step_matching("pretrained", "scratch", headline),
        "pretrained_small_steps_to_match_scratch_small": first_step_matching("pretrained_small", "scratch_small", headline),
        "task_metric": task_metric,
        "task_metric_last": {run: round(final(run, "score"), 2) for run in RUNS},
        "task_metric_best": {run: round(best(run, "score"), 2) for run in RUNS},
        "eval_loss_last": {run: round(final(run, "eval/loss"), 4) for run in RUNS},
        "eval_token_accuracy_last": {run: round(final(run, "eval/accuracy"), 4) for run in RUNS},
        "settings": {
            "task": full_task, "small_task": small_task, "train_examples": train_examples["full"],
            "small_train_examples": train_examples["small"], "small_fraction": args.small_fraction,
            "pretrained_checkpoint": args.pretrained_checkpoint,
            "pretrain_objective": None if args.pretrained_checkpoint else args.pretrain_objective,
            "pretrain_steps": pretrain_steps,
            "pretrain_batch_size": None if args.pretrained_checkpoint else args.pretrain_batch_size,
            "finetune_steps": args.finetune_steps, "batch_size": args.batch_size,
            "task_feature_lengths": {"inputs": inputs_length, "targets": targets_length},
            "optimizer": "adafactor" if "adafactor" in str(effective["train.optimizer"]) else str(effective["train.optimizer"]),
            "learning_rate": effective["constant_schedule.learning_rate"],
            "dropout_rate": effective["DROPOUT_RATE/macro.value"], "seed": args.seed,
            "eval_period": args.eval_period, "eval_examples": args.eval_examples, "extra_gin": args.gin,
            "gin_files": FINETUNE_GIN,
        },
        "plot": str(png),
        "seconds": {k: round(v, 1) for k, v in {**timings, "total": time.time() - start}.items()},
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
