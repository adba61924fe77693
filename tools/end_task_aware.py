"""End-task-aware training against continued pre-training on a low-resource end task, at equal total compute
(issue #26; Dery et al. 2021, "Should we be pre-training?").

    python tools/end_task_aware.py --out_dir runs/end_task_aware
    python tools/end_task_aware.py --out_dir runs/eta --methods scratch tapt --seeds 0 --budget 960

The end task (`--task`): `author`, the bundled classification set (who wrote the excerpt, Shakespeare or
Milton) as a text-to-text task for the tiny T5 (the label's name is the target; validation accuracy on all 666
held-out excerpts, chance 50%), or `extractive_qa` (the bundled "Who says ...?" questions; SQuAD F1), each
restricted to `--train_examples` labelled training examples (a seeded subset, the same for every method and
seed). Every method starts from random parameters, trains the tiny T5 v1.1 at the same constant Adafactor rate
and is driven through gin as `python -m t5x_lite.train` drives it (`pretraining_helps.run_training`):

1. `scratch`: the end task alone;
2. `tapt`: span corruption on the end task's own training inputs (task-adaptive pre-training), then the end
   task from that checkpoint (`--tapt_fraction` of the budget pre-trains);
3. `mt_tartan`: the end task multitasked with two auxiliaries, span corruption over its training inputs (TAPT
   data) and over the bundled corpus (general data), static equal weights;
4. `meta_tartan`: the same with weights learned from the dev head's gradient (META-TARTAN);
5. `aang`: the objective space `AANG_SPACE` around the end task, factored weights learned the same way.

Equal total compute means an equal number of sequences processed forward and backward: `--budget` sequences
per method (default `--steps` x `--batch_size`, scratch's), each method running as many steps as that buys with
its sequences per step (a multitask step processes a batch per objective, META-TARTAN's and AANG's also the dev
head's).

Prints a table (mean, std and per-seed value of the end-task metric after the last step) and ends with one JSON
line: `metric`, then `{"mean", "std", "seeds"}` per method; `OUT_DIR/results.json` adds the steps, sequences
and seconds per method, and `OUT_DIR/aux_weights.png` shows the learned weights over time of the META-TARTAN
and AANG runs. Measured results and what explains them: docs/end_task_aware.md#results.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

METHODS = ("scratch", "tapt", "mt_tartan", "meta_tartan", "aang")
LEARNED = ("meta_tartan", "aang")  # the methods whose auxiliary weights are plotted
SINGLE_TASK_GIN = ["runs/finetune.gin", "models/t5_1_1/tiny.gin"]
AUTHOR_FILES = {split: REPO / "t5x_lite" / "data" / "bundled" / "cls" / f"author_{split}.tsv"
                for split in ("train", "validation")}
GENERAL_TASK = "bundled_span_corruption"  # the auxiliary over the bundled general corpus
# AANG's stage options searched (D x T x R x O minus the excluded combinations: 4 objectives, the BERT-op read both
# ways over the task's inputs and the bundled corpus); every combination costs a batch per step.
AANG_SPACE = {"data": ["task", "general"], "transforms": ["mask"], "representations": ["bi", "l2r"],
              "outputs": ["denoise"]}
# --task -> TASK_FEATURE_LENGTHS of every run (one set for all objectives: the multitask step stacks their batches).
LENGTHS = {"author": {"inputs": 96, "targets": 24}, "extractive_qa": {"inputs": 256, "targets": 56}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="runs/end_task_aware", help="folder for the runs, the plot and results.json")
    parser.add_argument("--overwrite", action="store_true", help="delete the runs of an earlier invocation in OUT_DIR first")
    parser.add_argument("--task", default="author", choices=sorted(LENGTHS), help="the low-resource end task")
    parser.add_argument("--train_examples", type=int, default=300, help="labelled training examples of the end task")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                        help=f"methods to compare (default: all of {', '.join(METHODS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="RANDOM_SEED of each method's runs")
    parser.add_argument("--steps", type=int, default=300, help="steps of `scratch`; with --batch_size the budget")
    parser.add_argument("--batch_size", type=int, default=16, help="BATCH_SIZE of every run (per objective)")
    parser.add_argument("--budget", type=int, default=None,
                        help="sequences processed forward and backward per method (default: steps x batch_size)")
    parser.add_argument("--tapt_fraction", type=float, default=0.5, help="share of `tapt`'s budget spent pre-training")
    parser.add_argument("--meta_lr", type=float, default=5e-2, help="META-TARTAN's and AANG's weight learning rate")
    parser.add_argument("--aang_k", type=int, default=2, help="AANG's combinations sampled (weighted) per step")
    parser.add_argument("--dev_fraction", type=float, default=0.2,
                        help="share of the end task's training examples held out for the dev head (META-TARTAN, AANG)")
    parser.add_argument("--learning_rate", type=float, default=3e-3, help="constant Adafactor rate of every run")
    parser.add_argument("--eval_examples", type=int, default=None, help="validation examples decoded (default: all)")
    parser.add_argument("--eval_steps", type=int, default=5, help="batches of each run's validation loss")
    parser.add_argument("--data_seed", type=int, default=0, help="seed of the training subset")
    parser.add_argument("--gin", action="append", default=[], metavar="BINDING",
                        help="extra gin binding for every run (repeatable)")
    parser.add_argument("--no_progress_bar", action="store_true")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.train_examples, args.aang_k) < 1 or (args.budget is not None and args.budget < 1):
        parser.error("--steps, --batch_size, --budget, --train_examples and --aang_k must be >= 1")
    if not 0 < args.tapt_fraction < 1:
        parser.error(f"--tapt_fraction must be strictly between 0 and 1, got {args.tapt_fraction}")
    if not 0 < args.dev_fraction < 1:
        parser.error(f"--dev_fraction must be strictly between 0 and 1, got {args.dev_fraction}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must differ, got {args.seeds}")
    args.methods = [m for m in METHODS if m in args.methods]  # the table's order
    args.budget = args.budget or args.steps * args.batch_size
    return args


# ------------------------------------------------------------------ the end task


@dataclass(frozen=True)
class EndTask:
    """A registered low-resource end task: its seqio name, the metric it is judged by, the span-corruption task
    over its training inputs (TAPT data), AANG's objective space around it ({combination: task}) and the number of
    training examples."""

    name: str
    metric: str
    tapt_task: str
    aang_tasks: dict[str, str]
    train_examples: int


def sample(rows: list, count: int, seed: int) -> list:
    """`count` of `rows` (all if fewer), drawn with `seed`, in their file order."""
    keep = sorted(random.Random(seed).sample(range(len(rows)), min(count, len(rows))))
    return [rows[i] for i in keep]


def register_author_task(count: int, seed: int, data_dir: Path) -> tuple[str, list[str]]:
    """The bundled author set as text-to-text over `count` training excerpts; returns its name and inputs."""
    from t5x_lite.data import registration

    def read(split: str) -> list[tuple[str, str]]:
        with open(AUTHOR_FILES[split], newline="") as f:
            return [(row["sentence"], row["label"]) for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]

    files = {}
    for split, rows in (("train", sample(read("train"), count, seed)), ("validation", read("validation"))):
        files[split] = data_dir / f"author_{split}.tsv"
        files[split].write_text("inputs\ttargets\n" + "".join(f"{text}\t{label}\n" for text, label in rows))
    name = f"end_task_author_{count}"
    registration.register_text_to_text_task(name, {k: str(v) for k, v in files.items()}, metrics=["accuracy"],
                                            overwrite=True)
    inputs = [line.split("\t")[0] for line in files["train"].read_text().splitlines()[1:]]
    return name, inputs


def register_qa_task(count: int, seed: int, data_dir: Path) -> tuple[str, list[str]]:
    """The bundled extractive QA set over `count` training questions; returns its name and contexts."""
    from pretraining_helps import register_small_task

    from t5x_lite.tasks import qa as qa_tasks

    total = len((qa_tasks.QA_DIR / "extractive_train.jsonl").read_text().splitlines())
    name, _, _ = register_small_task("extractive", min(1.0, count / total), seed, data_dir)
    train_file = next(data_dir.glob("extractive_train_*.jsonl"))
    return name, [json.loads(line)["context"] for line in train_file.read_text().splitlines()]


def register_end_task(task: str, count: int, seed: int, data_dir: Path) -> EndTask:
    """Registers the end task over a seeded subset of `count` training examples, a span-corruption task over
    their inputs (one text per line) and AANG's objective space around it (`AANG_SPACE`)."""
    from t5x_lite.data import objective_stages, registration

    data_dir.mkdir(parents=True, exist_ok=True)
    name, inputs = (register_author_task if task == "author" else register_qa_task)(count, seed, data_dir)
    tapt_file = data_dir / "tapt_train.txt"
    tapt_file.write_text("".join(" ".join(text.split()) + "\n" for text in inputs))
    tapt_task = f"{name}_tapt"
    registration.register_span_corruption_task(tapt_task, {"train": str(tapt_file)}, overwrite=True)
    metric = f"eval/{name}/{'accuracy' if task == 'author' else 'f1'}"
    space = objective_stages.combinations(*AANG_SPACE.values())
    aang_tasks = registration.register_objective_space(f"{name}_aang", name, space, overwrite=True)
    return EndTask(name, metric, tapt_task, aang_tasks, len(inputs))


# ------------------------------------------------------------------ runs


def steps_for(budget: int, sequences_per_step: int) -> int:
    """The steps `budget` sequences buy at `sequences_per_step` (at least one)."""
    return max(1, round(budget / sequences_per_step))


def final_metric(model_dir: Path, metric: str) -> float:
    """The run's value of `metric` at its last evaluation."""
    from plot_metrics import read_metrics

    curves = read_metrics(model_dir)
    if metric not in curves:
        raise RuntimeError(f"{model_dir}/metrics.jsonl has no {metric}: did the run evaluate?")
    return curves[metric][1][-1]


def run_single_task(model_dir: Path, task: str, steps: int, seed: int, common: list[str],
                    init: Path | None = None, evaluate: bool = True) -> None:
    """One run of the tiny T5 on one task (the end task or the TAPT data) from `init` or random parameters."""
    from pretraining_helps import run_training

    run_training(SINGLE_TASK_GIN, [
        f"MODEL_DIR = '{model_dir}'", f"MIXTURE_OR_TASK_NAME = '{task}'", f"TRAIN_STEPS = {steps}",
        f"RANDOM_SEED = {seed}", f"INITIAL_CHECKPOINT_PATH = {str(init) if init else None!r}",
        f"train.checkpoint_period = {steps}", f"train.eval_period = {steps if evaluate else 0}",
        f"train.log_period = {max(1, steps // 20)}", *common,
    ])


def run_scratch(run_dir: Path, end: EndTask, seed: int, budget: int, args: argparse.Namespace,
                common: list[str]) -> dict:
    steps = steps_for(budget, args.batch_size)
    run_single_task(run_dir, end.name, steps, seed, common)
    return {"steps": {"finetune": steps}, "sequences": steps * args.batch_size,
            "score": final_metric(run_dir, end.metric)}


def run_tapt(run_dir: Path, end: EndTask, seed: int, budget: int, args: argparse.Namespace, common: list[str]) -> dict:
    pretrain = steps_for(round(budget * args.tapt_fraction), args.batch_size)
    finetune = steps_for(budget - pretrain * args.batch_size, args.batch_size)
    run_single_task(run_dir / "pretrain", end.tapt_task, pretrain, seed, common, evaluate=False)
    run_single_task(run_dir / "finetune", end.name, finetune, seed, common, init=run_dir / "pretrain")
    return {"steps": {"pretrain": pretrain, "finetune": finetune}, "sequences": (pretrain + finetune) * args.batch_size,
            "score": final_metric(run_dir / "finetune", end.metric)}


def tartan_bindings(method: str, end: EndTask, seed: int, args: argparse.Namespace) -> tuple[list[str], int]:
    """The gin bindings selecting `method`'s end-task-aware training mode, and the batches one of its steps
    processes: the end task's, every auxiliary's (AANG's unsampled combinations too: the step computes them all)
    and the dev head's."""
    auxiliaries = end.aang_tasks if method == "aang" else {"tapt": end.tapt_task, "general": GENERAL_TASK}
    bindings = ["train.training_mode = @EndTaskAware()", f"EndTaskAware.auxiliaries = {auxiliaries!r}"]
    if method == "mt_tartan":
        return [*bindings, "EndTaskAware.weighting = @StaticWeighting()"], 1 + len(auxiliaries)
    bindings.append(f"EndTaskAware.dev_fraction = {args.dev_fraction}")
    if method == "meta_tartan":
        bindings += ["EndTaskAware.weighting = @MetaWeighting()", f"MetaWeighting.meta_lr = {args.meta_lr}"]
    else:
        bindings += ["EndTaskAware.weighting = @FactoredWeighting()", f"FactoredWeighting.k = {args.aang_k}",
                     f"FactoredWeighting.seed = {seed}", f"FactoredWeighting.meta_lr = {args.meta_lr}",
                     "EncoderDecoderModel.reading_orders = True"]
    return bindings, 2 + len(auxiliaries)


def run_tartan(method: str, run_dir: Path, end: EndTask, seed: int, budget: int, args: argparse.Namespace,
               common: list[str]) -> dict:
    """MT-TARTAN, META-TARTAN or AANG: the end task and its auxiliaries from random parameters, `budget`
    sequences."""
    bindings, batches = tartan_bindings(method, end, seed, args)
    steps = steps_for(budget, batches * args.batch_size)
    run_single_task(run_dir, end.name, steps, seed, [*common, *bindings])
    return {"steps": {"multitask": steps}, "sequences": steps * batches * args.batch_size,
            "score": final_metric(run_dir, end.metric)}


RUNNERS = {"scratch": run_scratch, "tapt": run_tapt, "mt_tartan": functools.partial(run_tartan, "mt_tartan"),
           **{m: functools.partial(run_tartan, m) for m in ("meta_tartan", "aang")}}


# ------------------------------------------------------------------ report


def plot_weights(model_dirs: dict[str, Path], out: Path) -> Path | None:
    """One panel per run of `model_dirs` (label -> MODEL_DIR), one line per `train/aux_weight/<name>` metric;
    None when no run logged a weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from plot_metrics import read_metrics

    prefix = "train/aux_weight/"
    curves = {label: {k[len(prefix):]: v for k, v in read_metrics(d).items() if k.startswith(prefix)}
              for label, d in model_dirs.items()}
    curves = {label: weights for label, weights in curves.items() if weights}
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, (label, weights) in zip(axes[0], curves.items()):
        for name, (steps, values) in sorted(weights.items()):
            ax.plot(steps, values, label=name)
        ax.set_title(f"{label}: auxiliary weights")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def print_table(metric: str, stats: dict[str, dict], runs: dict[str, list[dict]]) -> None:
    print(f"\n{'method':<12} {'steps':>16} {'sequences':>10} {metric + ' (mean +- std)':>44}  seeds")
    for method, summary in stats.items():
        first = runs[method][0]
        steps = "+".join(str(s) for s in first["steps"].values())
        print(f"{method:<12} {steps:>16} {first['sequences']:>10} {summary['mean']:>35.2f} +- {summary['std']:<5.2f}  "
              f"{summary['seeds']}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    out_dir = Path(args.out_dir).resolve()  # checkpoint paths are restored from absolute paths
    run_dirs = {(m, s): out_dir / f"{m}_seed{s}" for m in args.methods for s in args.seeds}
    from electra_vs_mlm import summary_stats
    from pretraining_helps import claim_out_dir, set_up_runtime

    claim_out_dir(out_dir, [*run_dirs.values(), out_dir / "data"], args.overwrite)
    set_up_runtime()
    end = register_end_task(args.task, args.train_examples, args.data_seed, out_dir / "data")
    lengths = LENGTHS[args.task]
    common = [
        f"TASK_FEATURE_LENGTHS = {{'inputs': {lengths['inputs']}, 'targets': {lengths['targets']}}}",
        f"BATCH_SIZE = {args.batch_size}", f"constant_schedule.learning_rate = {args.learning_rate}",
        f"train.eval_steps = {args.eval_steps}", f"make_evaluator.num_examples = {args.eval_examples}",
        "train.best_metric = None", *(["train.progress_bar = False"] if args.no_progress_bar else []), *args.gin,
    ]
    print(f"== End task {end.name}: {end.train_examples} training examples, scored by {end.metric}; "
          f"{args.budget} sequences per method", flush=True)
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    timings: dict[str, float] = {}
    for seed in args.seeds:
        for method in args.methods:
            print(f"== Seed {seed}: {method}", flush=True)
            t0 = time.time()
            runs[method].append(RUNNERS[method](run_dirs[method, seed], end, seed, args.budget, args, common))
            timings[f"{method}_seed{seed}"] = round(time.time() - t0, 1)

    stats = {m: summary_stats([r["score"] for r in runs[m]]) for m in args.methods}
    print_table(end.metric, stats, runs)
    png = plot_weights({f"{m} seed {s}": run_dirs[m, s] for m in args.methods if m in LEARNED for s in args.seeds},
                       out_dir / "aux_weights.png")
    if png:
        print(f"learned weights: {png}")
    details = {
        "runs": {m: [{k: v for k, v in r.items() if k != "score"} for r in runs[m]] for m in args.methods},
        "plot": str(png) if png else None,
        "settings": {"task": end.name, "train_examples": end.train_examples, "tapt_task": end.tapt_task,
                     "budget": args.budget, "batch_size": args.batch_size, "tapt_fraction": args.tapt_fraction,
                     "learning_rate": args.learning_rate, "meta_lr": args.meta_lr, "dev_fraction": args.dev_fraction,
                     "general_task": GENERAL_TASK, "aang_space": AANG_SPACE,
                     "aang_k": args.aang_k, "task_feature_lengths": lengths, "seeds": args.seeds,
                     "data_seed": args.data_seed, "eval_examples": args.eval_examples, "extra_gin": args.gin},
        "seconds": {**timings, "total": round(time.time() - start, 1)},
    }
    summary = {"metric": end.metric, **stats}
    (out_dir / "results.json").write_text(json.dumps({**summary, **details}, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
