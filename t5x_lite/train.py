"""`python -m t5x_lite.train --gin_file=... --gin.KEY=VALUE`: pre-train or fine-tune a model.

The loop reads top to bottom: build the mesh, the state and the data; resume from the
newest checkpoint in MODEL_DIR if there is one; then step, log, evaluate and checkpoint.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import gin
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import seqio
import tensorflow as tf
from absl import logging
from clu.data.dataset_iterator import TfDatasetIterator
from tqdm import tqdm

import t5x_lite.configurables  # noqa: F401  (declares the gin configurables the gin files name)
from t5x_lite import checkpoints, config, evaluation, partitioning
from t5x_lite.data import pipeline
from t5x_lite.models.base import BaseModel
from t5x_lite.training import metric_writers, optimizers, preemption, steps, train_state


def report(message: str) -> None:
    """A progress line: in the log, and on the console above the progress bar (process 0)."""
    logging.info(message)
    if jax.process_index() == 0 and logging.get_verbosity() < logging.INFO:
        tqdm.write(message)


def load_eval_batches(
    model: BaseModel, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
    batch_size: int, split: str, eval_steps: int, seed: int,
) -> list[dict[str, np.ndarray]]:
    """A fixed list of validation batches (same every evaluation)."""
    ds = pipeline.get_dataset(
        mixture_or_task_name, task_feature_lengths, batch_size, model.feature_converter_cls,
        split=split, shuffle=False, num_epochs=1, seed=seed,
    )
    batches = list(ds.take(eval_steps).as_numpy_iterator())
    if not batches:
        raise config.UserError(
            f"Split {split!r} of {mixture_or_task_name!r} gave no full batch of {batch_size} examples; "
            "use a smaller BATCH_SIZE, more data, or set train.eval_period=0 to skip evaluation."
        )
    return batches


def validation_loss(eval_step, params, batches, batch_sharding) -> dict[str, float]:
    """Token-weighted loss and accuracy over the evaluation batches."""
    totals = {"loss_sum": 0.0, "z_loss_sum": 0.0, "weight_sum": 0.0, "correct_sum": 0.0}
    for batch in batches:
        sums = jax.device_get(eval_step(params, partitioning.host_batch_to_global(batch, batch_sharding)))
        for k in totals:
            totals[k] += float(sums[k])
    tokens = max(totals["weight_sum"], 1.0)
    return {"eval/loss": totals["loss_sum"] / tokens, "eval/accuracy": totals["correct_sum"] / tokens}


@gin.configurable
def train(
    *,
    model_dir: str = gin.REQUIRED,
    model: BaseModel = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    mixture_or_task_module: str | None = None,
    random_seed: int = 0,
    optimizer: Callable[[optax.Schedule], optax.GradientTransformation] = optimizers.adafactor,
    learning_rate: optax.Schedule = gin.REQUIRED,
    log_period: int = 10,
    eval_period: int = 100,
    eval_steps: int = 20,
    eval_split: str = "validation",
    checkpoint_period: int = 100,
    num_microbatches: int = 1,
    initial_checkpoint_path: str | None = None,
    best_metric: str | None = None,
    best_mode: str = "max",
    progress_bar: bool = True,
    skip_nonfinite_updates: bool = False,
    max_consecutive_skips: int = 10,
) -> dict[str, float]:
    """Trains until `train_steps` (the total, so a larger value continues a run).

    A fresh run starts from the parameters of `initial_checkpoint_path` when given (optimizer
    state and step start anew); a run with checkpoints in MODEL_DIR resumes from the newest.
    Every `eval_period` steps it logs the validation loss and, for tasks with metric functions,
    their metrics from decoding (`eval/<task>/<metric>`); `best_metric` names one of those to
    keep the best checkpoint of in MODEL_DIR/best. Returns the last logged metrics.

    A non-finite loss or gradient norm stops the run with an error before that state is
    checkpointed; with `skip_nonfinite_updates` such a step leaves parameters and optimizer
    state unchanged instead (counted in `train/skipped_steps`), and only `max_consecutive_skips`
    skips in a row stop the run.
    """
    try:
        config.prepare_output_dir(model_dir)
    except config.UserError as e:
        raise config.UserError(f"MODEL_DIR {e}") from e
    provider = config.lookup_task(mixture_or_task_module, mixture_or_task_name, task_feature_lengths)
    check_vocab_fits(provider, model)

    try:
        mesh = partitioning.make_mesh()
    except ValueError as e:  # e.g. a MESH_SHAPE larger than the device count
        raise config.UserError(str(e)) from e
    rules = partitioning.logical_axis_rules()
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    tx = optimizer(learning_rate)
    if skip_nonfinite_updates:
        tx = steps.skip_nonfinite_updates(tx)
    state, shardings, graphdef = train_state.create_train_state(model, tx, random_seed, mesh, rules)

    try:
        train_ds = pipeline.get_dataset(
            mixture_or_task_name, task_feature_lengths, batch_size, model.feature_converter_cls,
            split="train", shuffle=True, num_epochs=None, seed=random_seed,
        )
    except (ValueError, FileNotFoundError) as e:
        raise config.UserError(str(e)) from e
    iterator = TfDatasetIterator(train_ds, checkpoint=True)
    for partial in checkpoints.partial_checkpoints(model_dir):
        report(f"Ignoring partial checkpoint {partial} (its write was interrupted; Orbax removes it).")
    try:
        manager = checkpoints.checkpoint_manager(model_dir)
        restored = checkpoints.restore_latest(manager, train_state.abstract_train_state(state, shardings), iterator)
    except ValueError as e:
        raise config.UserError(f"MODEL_DIR: {e}") from e
    if restored is not None:
        state = restored
        report(f"Resumed from {manager.directory} at step {int(state.step)}.")
    elif initial_checkpoint_path:
        try:
            params = checkpoints.restore_params(initial_checkpoint_path, train_state.abstract_train_state(state.params, shardings.params), model, fresh=state.params)
        except (FileNotFoundError, ValueError) as e:
            raise config.UserError(f"INITIAL_CHECKPOINT_PATH: {e}") from e
        state = state.replace(params=params)
        report(f"Initialised parameters from {initial_checkpoint_path}.")
    start_step = int(jax.device_get(state.step))
    if jax.process_index() == 0:
        (Path(model_dir) / "config.gin").write_text(gin.config_str())

    if batch_size % num_microbatches:
        raise config.UserError(f"BATCH_SIZE {batch_size} is not divisible by NUM_MICROBATCHES {num_microbatches}.")
    train_step = steps.make_train_step(model, graphdef, tx, learning_rate, shardings, batch_sharding, num_microbatches)
    eval_step = steps.make_eval_step(model, graphdef, shardings, batch_sharding)
    eval_batches = (
        load_eval_batches(model, mixture_or_task_name, task_feature_lengths, batch_size, eval_split,
                          eval_steps, random_seed)
        if eval_period else []
    )
    task_eval = None
    if eval_period and evaluation.has_metrics(provider):
        evaluator = evaluation.make_evaluator(mixture_or_task_name, task_feature_lengths, model.feature_converter_cls,
                                              split=eval_split)
        runner = evaluation.ModelRunner(model, graphdef, mesh, rules, eos_id=evaluation.targets_eos_id(provider))
        task_eval = (evaluator, runner)
    best_manager = checkpoints.best_checkpoint_manager(model_dir, best_metric, best_mode) if best_metric else None
    writer = metric_writers.create_writer(model_dir)
    tokens_per_step = batch_size * sum(task_feature_lengths.values())
    vocab_limit = max(feature.vocabulary.vocab_size for feature in provider.output_features.values())
    reported_checkpoint = start_step

    summary: dict[str, float] = {}
    pending: list[dict[str, jax.Array]] = []
    timed_steps, period_start = 0, time.time()
    bar = tqdm(total=train_steps, initial=start_step, disable=not progress_bar or jax.process_index() != 0,
               desc="train", unit="step")
    with preemption.StopRequest() as stop, committing(manager):
        for step in range(start_step + 1, train_steps + 1):
            host_batch = next_batch(iterator, step, mixture_or_task_name, vocab_limit)
            batch = partitioning.host_batch_to_global(host_batch, batch_sharding)
            state, metrics = train_step(state, batch)
            pending.append(metrics)
            bar.update(1)
            if step == start_step + 1:  # Throughput excludes the step that compiled.
                jax.block_until_ready(state.step)
                report(f"First step (with compilation) took {time.time() - period_start:.1f}s.")
                timed_steps, period_start = 0, time.time()
            else:
                timed_steps += 1
            is_last, stopping = step == train_steps, stop.should_stop()
            is_eval = bool(eval_period) and step % eval_period == 0
            if step % log_period == 0 or step % checkpoint_period == 0 or is_last or stopping or is_eval:
                summary = summarise_period(pending, timed_steps, period_start, tokens_per_step)
                check_finite(summary, step, max_consecutive_skips if skip_nonfinite_updates else None)
                writer.write_scalars(step, summary)
                bar.set_postfix(loss=f"{summary['train/loss']:.3f}")
                report(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in summary.items()))
                pending, timed_steps, period_start = [], 0, time.time()
            if eval_period and (step % eval_period == 0 or is_last):
                eval_metrics = validation_loss(eval_step, state.params, eval_batches, batch_sharding)
                if task_eval is not None:
                    eval_metrics.update(evaluation.evaluate(*task_eval, state.params, task_feature_lengths["targets"], step)[0])
                writer.write_scalars(step, eval_metrics)
                summary.update(eval_metrics)
                report(f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
                if best_manager is not None:
                    checkpoints.save_if_best(best_manager, state, eval_metrics, best_metric)
            if step % checkpoint_period == 0 or is_last or stopping:
                try:
                    checkpoints.save(manager, state, iterator)
                except OSError as e:  # a full disk or read-only MODEL_DIR
                    raise config.UserError(str(e)) from e
                reported_checkpoint = report_committed(model_dir, reported_checkpoint)
            if stopping and not is_last:
                report(f"Stopping at step {step} on signal {stop.received}; re-run the same command to resume.")
                break
    bar.close()
    report_committed(model_dir, reported_checkpoint)
    if best_manager is not None:
        best_manager.wait_until_finished()
        best_manager.close()
    writer.close()
    if jax.process_index() == 0:
        (Path(model_dir) / "operative_config.gin").write_text(gin.operative_config_str())
    return summary


@contextlib.contextmanager
def committing(manager: ocp.CheckpointManager) -> Iterator[None]:
    """Leaves training, normally or on an error, only once in-flight checkpoint saves have committed."""
    try:
        yield
    finally:
        try:
            manager.wait_until_finished()
        except (OSError, ValueError) as e:  # a background write failed (full disk, read-only MODEL_DIR)
            raise config.UserError(str(checkpoints.write_error(manager, None, e))) from e
        manager.close()


def next_batch(
    iterator: Iterator[dict[str, np.ndarray]], step: int, mixture_or_task_name: str, vocab_limit: int
) -> dict[str, np.ndarray]:
    """The next host batch; an exhausted or failing pipeline and out-of-vocabulary ids are `UserError`s."""
    try:
        batch = next(iterator)
    except StopIteration:
        raise config.UserError(
            f"The train split of {mixture_or_task_name!r} gave no examples at step {step}: it is empty, or the "
            "task's preprocessors filtered every example out. Check the task's data files."
        ) from None
    except tf.errors.OpError as e:  # unreadable files, or an example too long with fit_to_length's "error"
        message = tf_error_message(e)
        hint = (
            " Raise TASK_FEATURE_LENGTHS, or set --gin.fit_to_length.long_sequences=\"'truncate'\"."
            if pipeline.LONG_SEQUENCE_ERROR in message else " Check the task's data files."
        )
        raise config.UserError(f"Reading the data of {mixture_or_task_name!r} failed at step {step}: {message}.{hint}") from None
    check_token_ids(batch, vocab_limit, step)
    return batch


def tf_error_message(error: tf.errors.OpError) -> str:
    """A TF error's own words, without the op and function names TF wraps them in."""
    message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", error.message)
    message = re.sub(r"Error in user-defined function passed to \S+ transformation with iterator: \S+: ", "", message)
    assertion = re.search(r"assertion failed: \[(.*?)\] \[Condition .*?\[x \(.*?\) = \] \[(\d+)\]", message)
    if assertion:  # a tf.debugging assert: its message and the offending value
        return f"{assertion.group(1)}; it has {assertion.group(2)}".replace("\\'", "'")
    return message.split(" [Op:")[0].splitlines()[0].strip().rstrip(".")


def check_token_ids(batch: Mapping[str, np.ndarray], vocab_limit: int, step: int) -> None:
    """Every token id must index the vocabulary; an id outside it would embed garbage."""
    for key, ids in batch.items():
        if key.endswith("_tokens") and ids.size and (ids.min() < 0 or ids.max() >= vocab_limit):
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise config.UserError(
                f"Batch of step {step} has token id {bad} in {key!r}, outside the vocabulary's [0, {vocab_limit}); "
                "a preprocessor or pre-tokenized data produced ids the vocabulary does not have."
            )


def report_committed(model_dir: str, after_step: int) -> int:
    """Reports each checkpoint committed since `after_step` with its size; returns the newest step reported."""
    for step in checkpoints.committed_steps(model_dir):
        if step > after_step:
            path = checkpoints.checkpoints_dir(model_dir) / str(step)
            report(f"Checkpoint {step} committed: {checkpoints.folder_size(path) / 2**20:.1f} MiB in {path}")
            after_step = step
    return after_step


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
    mean = {
        k: float(np.mean([m[k] for m in applied])) if applied else float("nan")
        for k in ("loss", "accuracy", "z_loss", "grad_norm")
    }
    summary = {
        "train/loss": mean["loss"],
        "train/accuracy": mean["accuracy"],
        "train/z_loss": mean["z_loss"],
        "train/grad_norm": mean["grad_norm"],
        "train/param_norm": float(fetched[-1]["param_norm"]),
        "train/learning_rate": float(fetched[-1]["learning_rate"]),
    }
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


def check_vocab_fits(provider: seqio.Task | seqio.Mixture, model: BaseModel) -> None:
    """The model's output layer must cover every id of the task's vocabularies."""
    for name, feature in provider.output_features.items():
        if feature.vocabulary.vocab_size > model.vocab_size:
            raise config.UserError(
                f"Feature {name!r} uses a vocabulary of {feature.vocabulary.vocab_size} ids but the model has "
                f"vocab_size {model.vocab_size}; raise T5Config.vocab_size (e.g. to a multiple of 128)."
            )


if __name__ == "__main__":
    config.run_entry_point(train, config.REQUIRED_MACROS)
