"""`python -m t5x_lite.eval --gin_file=runs/eval.gin ...`: a checkpoint's metrics on a task or mixture.

Metrics go to the console, TensorBoard and `EVAL_OUTPUT_DIR/metrics.jsonl` as `eval/<task>/<metric>`.
"""

from __future__ import annotations

from t5x_lite import cli

if __name__ == "__main__":
    cli.exit_on_help(cli.EVAL_REQUIRED_MACROS)  # before the imports below load TensorFlow: --help answers at once

from collections.abc import Mapping

import gin

import t5x_lite.configurables  # noqa: F401  (declares the gin configurables the gin files name)
from t5x_lite import checkpoints, evaluation, partitioning
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
) -> dict[str, float]:
    """Restores the parameters at `checkpoint_path` and runs the task's metrics on its eval split."""
    provider = cli.load_task(mixture_or_task_name, mixture_or_task_module, task_feature_lengths)
    if not evaluation.has_metrics(provider):
        raise cli.UserError(f"Task {mixture_or_task_name!r} defines no metric functions to evaluate.")
    mesh = partitioning.make_mesh()
    rules = partitioning.logical_axis_rules()
    graphdef, params = checkpoints.load_checkpoint_params(model, checkpoint_path, mesh, rules)
    task_eval = evaluation.task_evaluation(provider, model, graphdef, mesh, rules, task_feature_lengths)
    metrics, _ = evaluation.evaluate(*task_eval, params, task_feature_lengths["targets"])
    hf_checkpoint = checkpoint_path.startswith("hf:")
    checkpoint_step = "0" if hf_checkpoint else checkpoints.find_state_dir(checkpoint_path).parent.name
    writer = metric_writers.create_writer(cli.prepare_output_dir(output_dir))
    writer.write_scalars(int(checkpoint_step) if checkpoint_step.isdigit() else 0, metrics)
    writer.close()
    for name, value in sorted(metrics.items()):
        print(f"{name} = {value:.4f}")
    return metrics


if __name__ == "__main__":
    cli.run_entry_point(evaluate_checkpoint, cli.EVAL_REQUIRED_MACROS)
