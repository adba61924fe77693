"""The periodic work of the training loop, one class per action, each owning its bookkeeping.

After every step the loop asks each action whether it is `due` at that `Tick` and, if so, runs it;
an action returns the scalars it logged. Log comes first and also runs whenever another action
does, so the metrics an evaluation or a checkpoint follows are written, and checked finite, first.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers
from jax.sharding import NamedSharding
from tqdm import tqdm

from t5x_lite import checkpoints, cli, evaluation, partitioning
from t5x_lite.data.position import DataIterator
from t5x_lite.training.train_state import TrainState


def report(message: str) -> None:
    """A progress line: in the log, and on the console above the progress bar (process 0)."""
    logging.info(message)
    if jax.process_index() == 0 and logging.get_verbosity() < logging.INFO:
        tqdm.write(message)


@dataclasses.dataclass(frozen=True)
class Tick:
    """The step just run, and whether it ends the run: the last step, or a stop request (SIGTERM)."""

    step: int
    last: bool
    stopping: bool


class Action(Protocol):
    def due(self, tick: Tick) -> bool: ...

    def __call__(self, tick: Tick, state: TrainState) -> dict[str, float]: ...


class Log:
    """Averages the steps' metrics since the last log, stops on a non-finite loss, and writes the averages
    (console, TensorBoard, metrics.jsonl) every `period` steps and before any action in `flushed_before`."""

    def __init__(
        self, writer: metric_writers.MetricWriter, period: int, tokens_per_step: int,
        max_consecutive_skips: int | None, flushed_before: Sequence[Action] = (),
    ):
        self.writer, self.period, self.tokens_per_step = writer, period, tokens_per_step
        self.max_consecutive_skips = max_consecutive_skips
        self.flushed_before = flushed_before
        self.pending: list[dict[str, jax.Array]] = []
        self.timed_steps: int | None = None  # None until the first step (which compiles) has finished
        self.period_start = time.time()

    def record(self, metrics: dict[str, jax.Array], state: TrainState) -> None:
        """Keeps a step's metrics (still on the device). Throughput leaves out the first step, which compiles."""
        self.pending.append(metrics)
        if self.timed_steps is None:
            jax.block_until_ready(state.step)
            report(f"First step (with compilation) took {time.time() - self.period_start:.1f}s.")
            self.timed_steps, self.period_start = 0, time.time()
        else:
            self.timed_steps += 1

    def due(self, tick: Tick) -> bool:
        return tick.step % self.period == 0 or any(action.due(tick) for action in self.flushed_before)

    def __call__(self, tick: Tick, state: TrainState) -> dict[str, float]:
        summary = summarise_period(self.pending, self.timed_steps or 0, self.period_start, self.tokens_per_step)
        check_finite(summary, tick.step, self.max_consecutive_skips)
        self.writer.write_scalars(tick.step, summary)
        report(f"step {tick.step}: " + " ".join(f"{k}={v:.4g}" for k, v in summary.items()))
        self.pending, self.timed_steps, self.period_start = [], 0, time.time()
        return summary


def summarise_period(
    pending: Sequence[dict[str, jax.Array]], timed_steps: int, period_start: float, tokens_per_step: int
) -> dict[str, float]:
    """Averages the per-step metrics since the last log and adds throughput (when timed).

    Skipped steps (non-finite, with `skip_nonfinite_updates`) are left out of the averages.
    Fetching the metrics waits for the queued steps, so the clock is read after it.
    """
    fetched = jax.device_get(pending)
    seconds = time.time() - period_start
    applied = [m for m in fetched if not m.get("skipped", 0.0)]
    summary = {
        f"train/{k}": float(np.mean([m[k] for m in applied])) if applied else float("nan")
        for k in ("loss", "accuracy", "z_loss", "grad_norm")
    }
    summary.update({
        f"train/{k}": float(np.mean([m["model"][k] for m in applied])) if applied else float("nan")
        for k in fetched[-1].get("model", {})
    })
    summary.update({f"train/{k}": float(fetched[-1][k]) for k in ("param_norm", "learning_rate")})
    if "skipped_steps" in fetched[-1]:
        summary["train/skipped_steps"] = float(fetched[-1]["skipped_steps"])
        summary["train/consecutive_skips"] = float(max(m["consecutive_skips"] for m in fetched))
    if timed_steps:
        steps_per_second = timed_steps / max(seconds, 1e-9)
        summary["train/steps_per_second"] = steps_per_second
        summary["train/tokens_per_second"] = steps_per_second * tokens_per_step
    return summary


def check_finite(summary: Mapping[str, float], step: int, max_consecutive_skips: int | None = None) -> None:
    """Stops on a non-finite loss before anything of that state is checkpointed.

    With `max_consecutive_skips` (the run skips non-finite updates, so applied steps are finite)
    it stops only when that many updates in a row were skipped.
    """
    if max_consecutive_skips is not None:
        if summary["train/consecutive_skips"] >= max_consecutive_skips:
            raise FloatingPointError(
                f"{int(summary['train/consecutive_skips'])} non-finite updates in a row were skipped up to step {step} "
                f"(train.max_consecutive_skips={max_consecutive_skips}); the run has diverged. Lower the learning "
                "rate or check the data, then re-run to resume from the last checkpoint."
            )
        return
    if not np.isfinite(summary["train/loss"]) or not np.isfinite(summary["train/grad_norm"]):
        raise FloatingPointError(
            f"Non-finite loss or gradient norm at step {step} ({dict(summary)}); no checkpoint of this state "
            "was written. Lower the learning rate or check the data, then re-run to resume from the last checkpoint "
            "(or set train.skip_nonfinite_updates=True to skip such steps)."
        )


class Evaluate:
    """Every `period` steps and at the last: the validation loss over fixed batches and, for tasks with
    metric functions, their metrics from decoding (`eval/<task>/<metric>`)."""

    def __init__(
        self, period: int, writer: metric_writers.MetricWriter, eval_step: Callable, batches: list[dict[str, np.ndarray]],
        batch_sharding: NamedSharding, task_eval: evaluation.TaskEval | None, max_decode_length: int,
        sum_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None,
    ):
        self.period, self.writer, self.eval_step, self.batches = period, writer, eval_step, batches
        self.batch_sharding, self.task_eval, self.max_decode_length = batch_sharding, task_eval, max_decode_length
        self.sum_metrics = sum_metrics
        self.latest: dict[str, float] = {}

    def due(self, tick: Tick) -> bool:
        return tick.step % self.period == 0 or tick.last

    def __call__(self, tick: Tick, state: TrainState) -> dict[str, float]:
        metrics = validation_loss(self.eval_step, state.params, self.batches, self.batch_sharding, self.sum_metrics)
        if self.task_eval is not None:
            metrics.update(evaluation.evaluate(*self.task_eval, state.params, self.max_decode_length, tick.step)[0])
        self.writer.write_scalars(tick.step, metrics)
        report(f"step {tick.step}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        self.latest = metrics
        return metrics


def validation_loss(
    eval_step: Callable, params: dict, batches: Iterable[dict[str, np.ndarray]], batch_sharding: NamedSharding,
    sum_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None,
) -> dict[str, float]:
    """Token-weighted loss and accuracy over the evaluation batches, plus `sum_metrics` of the summed
    terms (a model's own metrics, `BaseModel.sum_metrics`), each as `eval/<name>`."""
    totals = {"loss_sum": 0.0, "z_loss_sum": 0.0, "weight_sum": 0.0, "correct_sum": 0.0}
    for batch in batches:
        sums = jax.device_get(eval_step(params, partitioning.host_batch_to_global(batch, batch_sharding)))
        for k in sums:
            totals[k] = totals.get(k, 0.0) + float(sums[k])
    tokens = max(totals["weight_sum"], 1.0)
    extra = {f"eval/{k}": float(v) for k, v in (sum_metrics(totals) if sum_metrics else {}).items()}
    return {"eval/loss": totals["loss_sum"] / tokens, "eval/accuracy": totals["correct_sum"] / tokens, **extra}


class KeepBest:
    """After each evaluation, offers the state to a manager over MODEL_DIR/best that keeps the best `metric`."""

    def __init__(
        self, manager: ocp.CheckpointManager, metric: str, evaluate: Evaluate, adapter_paths: Collection[str] = ()
    ):
        self.manager, self.metric, self.evaluate = manager, metric, evaluate
        self.adapter_paths = adapter_paths  # an adapter run's checkpoints hold only these params

    def due(self, tick: Tick) -> bool:
        return self.evaluate.due(tick)

    def __call__(self, tick: Tick, state: TrainState) -> dict[str, float]:
        checkpoints.save_if_best(self.manager, state, self.evaluate.latest, self.metric, self.adapter_paths)
        return {}

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()


class Checkpoint:
    """Every `period` steps, at the last and on a stop request: saves the state with the data position
    (asynchronously) and reports each checkpoint once it is committed, with its size: `poll` after every
    step notices a finished save, so the report comes at the first step boundary after the commit."""

    def __init__(
        self, manager: ocp.CheckpointManager, iterator: DataIterator, period: int, model_dir: str,
        adapter_paths: Collection[str] = (),
    ):
        self.manager, self.iterator, self.period, self.model_dir = manager, iterator, period, model_dir
        self.adapter_paths = adapter_paths  # an adapter run's checkpoints hold only these params
        self.reported_step = max(checkpoints.committed_steps(model_dir), default=0)
        self.unreported = False  # a save was started and its commit not reported yet

    def due(self, tick: Tick) -> bool:
        return tick.step % self.period == 0 or tick.last or tick.stopping

    def __call__(self, tick: Tick, state: TrainState) -> dict[str, float]:
        with cli.user_errors(OSError):  # a full disk or read-only MODEL_DIR
            checkpoints.save(self.manager, state, self.iterator, self.adapter_paths)
        self.unreported = True
        self.poll()
        return {}

    def poll(self) -> None:
        """Reports the saves committed since the last report; costs a flag check while none is pending."""
        if self.unreported and not self.manager.is_saving_in_progress():
            self.unreported = False
            self.report_committed()

    def report_committed(self) -> None:
        for step in checkpoints.committed_steps(self.model_dir):
            if step > self.reported_step:
                path = checkpoints.checkpoints_dir(self.model_dir) / str(step)
                size = checkpoints.folder_size(path)  # None in a bucket
                mib = "" if size is None else f"{size / 2**20:.1f} MiB "
                report(f"Checkpoint {step} committed: {mib}in {path}")
                self.reported_step = step

    def close(self) -> None:
        """Waits until in-flight saves have committed (a failed background write is a `UserError`), then closes."""
        try:
            with cli.user_errors(OSError):
                checkpoints.wait_until_finished(self.manager)
            self.report_committed()
        finally:
            self.manager.close()


class Progress:
    """The progress bar (process 0, in a terminal): a tick per step, the loss of each log. Where the console
    is not a terminal (redirected to a file, CI) there is no bar: the logged step lines tell the progress."""

    def __init__(self, total: int, initial: int, enabled: bool):
        # disable=None: tqdm leaves the bar out where stderr is not a terminal (no carriage returns in a log file).
        shown = enabled and jax.process_index() == 0
        self.bar = tqdm(total=total, initial=initial, disable=None if shown else True, desc="train", unit="step")

    def advance(self, logged: Mapping[str, float]) -> None:
        self.bar.update(1)
        if "train/loss" in logged:
            self.bar.set_postfix(loss=f"{logged['train/loss']:.3f}")

    def close(self) -> None:
        self.bar.close()

