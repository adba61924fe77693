"""`python -m t5x_lite.eval --gin_file=runs/eval.gin ...`: a checkpoint's metrics on a task or mixture.

Metrics go to the console, TensorBoard and `EVAL_OUTPUT_DIR/metrics.jsonl` as `eval/<task>/<metric>`.
`NUM_SHOTS = k` (default 0: the task as it is) evaluates k-shot prompts instead: k solved examples of the task's
train split before each query (`data/preprocessors/few_shot.py`), logged under the task `<task>_<k>shot_seed<s>`.
"""

from __future__ import annotations

from t5x_lite import cli

if __name__ == "__main__":
    cli.exit_on_help(cli.EVAL_REQUIRED_MACROS)  # before the imports below load TensorFlow: --help answers at once
cli.keep_tensorflow_off_gpus()  # first: the imports below load TensorFlow (its C++ start-up logs held back)

from collections.abc import Mapping

import gin
import seqio

import t5x_lite.configurables  # noqa: F401  (declares the gin configurables the gin files name)
from t5x_lite import checkpoints, evaluation, partitioning
from t5x_lite.data.preprocessors import few_shot
from t5x_lite.models.base import BaseModel
from t5x_lite.training import metric_writers


@gin.configurable
def evaluate_checkpoint(
    *,
    model: BaseModel = gin.REQUIRED,
    checkpoint_path: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    output_dir: str = gin.REQUIRED,
    mixture_or_task_module: str | None = None,
    num_shots: int = 0,
    shots_seed: int = 0,
) -> dict[str, float]:
    """Restores the parameters at `checkpoint_path` and runs the task's metrics on its eval split, with
    `num_shots` solved train examples (drawn by `shots_seed`) before each query."""
    provider = cli.load_task(mixture_or_task_name, mixture_or_task_module, task_feature_lengths)
    if not evaluation.has_metrics(provider):
        raise cli.UserError(f"Task {mixture_or_task_name!r} defines no metric functions to evaluate.")
    provider = with_shots(provider, num_shots, shots_seed, task_feature_lengths)
    mesh = partitioning.make_mesh()
    rules = partitioning.logical_axis_rules()
    graphdef, params = checkpoints.load_checkpoint_params(model, checkpoint_path, mesh, rules)
    step, what = checkpoint_step(checkpoint_path)
    shots = f" with {num_shots}-shot prompts (seed {shots_seed})" if num_shots else ""
    print(f"Evaluating {what} on {mixture_or_task_name}{shots}.", flush=True)
    with cli.user_errors(few_shot.ShotsDoNotFit):  # the prompts are built here, before any decoding
        task_eval = evaluation.task_evaluation(provider, model, graphdef, mesh, rules, task_feature_lengths)
    metrics, _ = evaluation.evaluate(*task_eval, params, task_feature_lengths["targets"])
    writer = metric_writers.create_writer(cli.prepare_output_dir(output_dir))
    writer.write_scalars(step, metrics)
    writer.close()
    for name, value in sorted(metrics.items()):
        print(f"{name} = {value:.4f}")
    return metrics


def with_shots(
    provider: seqio.Task | seqio.Mixture, num_shots: int, seed: int, task_feature_lengths: Mapping[str, int]
) -> seqio.Task | seqio.Mixture:
    """What to evaluate: the task itself for 0 shots, else its k-shot version (`few_shot.few_shot_task`)."""
    if num_shots == 0:
        return provider
    if num_shots < 0:
        raise cli.UserError(f"NUM_SHOTS must be 0 or more, got {num_shots}.")
    with cli.user_errors(few_shot.ShotsDoNotFit):
        return seqio.get_mixture_or_task(few_shot.few_shot_task(provider, num_shots, seed, task_feature_lengths))


def checkpoint_step(checkpoint_path: str) -> tuple[int, str]:
    """The step the metrics are logged at (0 for a Hugging Face checkpoint or a folder not named by its step),
    and what the console calls the checkpoint, e.g. `checkpoint step 300 (runs/q/checkpoints/300)`."""
    if checkpoint_path.startswith("hf:"):
        return 0, f"the Hugging Face checkpoint {checkpoint_path[3:]} (logged as step 0)"
    folder = checkpoints.find_state_dir(checkpoint_path).parent
    if not folder.name.isdigit():
        return 0, f"the checkpoint in {folder} (logged as step 0)"
    return int(folder.name), f"checkpoint step {folder.name} ({folder})"


if __name__ == "__main__":
    cli.run_entry_point(evaluate_checkpoint, cli.EVAL_REQUIRED_MACROS)
