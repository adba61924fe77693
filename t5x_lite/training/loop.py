"""`train()`: the training run that `python -m t5x_lite.train` configures with gin.

It reads top to bottom: check the settings, build the mesh, the state and the data, resume from the
newest checkpoint in MODEL_DIR if there is one, then step, handing each step to the periodic
actions (`training/actions.py`: log, evaluate, keep-best, checkpoint, progress).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import gin
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import seqio
import tensorflow as tf
from flax import nnx
from jax.sharding import Mesh, NamedSharding

import t5x_lite.configurables  # noqa: F401  (declares the gin configurables the gin files name)
from t5x_lite import checkpoints, cli, evaluation, partitioning, run_lease, storage
from t5x_lite.data import pipeline
from t5x_lite.data.position import DataIterator
from t5x_lite.models.base import BaseModel
from t5x_lite.nn import kernels
from t5x_lite.training import actions, metric_writers, modes, optimizers, preemption, steps, train_state
from t5x_lite.training.actions import report
from t5x_lite.training.train_state import TrainState


@gin.configurable
@run_lease.holds_model_dir  # one run at a time in MODEL_DIR; a failed start leaves no empty folder
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
    training_mode: modes.TrainingMode | None = None,
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
    skips in a row stop the run. `MODEL_DIR/operative_config.gin` holds the bindings the run
    used, from its first step on. `training_mode` swaps in another mode's state, data and step (e.g.
    `@EndTaskAware()`, end-task-aware training); None trains the model on the task.
    """
    # The settings, the mesh, the fresh state and the data.
    cli.prepare_output_dir(model_dir, setting="MODEL_DIR")
    provider = cli.load_task(mixture_or_task_name, mixture_or_task_module, task_feature_lengths)
    check_vocab_fits(provider, model)
    chosen = kernels.resolve(model.config.kernels)  # once, before any network is built or traced
    with cli.user_errors(ValueError):  # e.g. a MESH_SHAPE larger than the device count
        mesh = partitioning.make_mesh()
    rules = partitioning.logical_axis_rules()
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    tx = optimizer(learning_rate)
    if skip_nonfinite_updates:
        tx = steps.skip_nonfinite_updates(tx)
    mode = training_mode or modes.StandardTraining()
    state, shardings, graphdef = mode.create_train_state(model, tx, random_seed, mesh, rules)
    with cli.user_errors(ValueError, FileNotFoundError):
        iterator = mode.train_iterator(
            mixture_or_task_name, task_feature_lengths, batch_size, model.feature_converter_cls, random_seed,
        )

    with contextlib.ExitStack() as opened:  # whatever the run opens is closed on every way out
        # Resume from MODEL_DIR, or start (from INITIAL_CHECKPOINT_PATH's parameters when given).
        checkpoint = actions.Checkpoint(open_checkpoints(model_dir), iterator, checkpoint_period, model_dir)
        opened.callback(checkpoint.close)
        state, origin = resume_or_start(checkpoint.manager, state, shardings, iterator, model, initial_checkpoint_path)
        start_step = int(jax.device_get(state.step))
        report(run_summary(model, state, mixture_or_task_name, task_feature_lengths, batch_size, train_steps, mesh,
                           model_dir, origin))
        if iterator.resume_note:  # a checkpoint of another process count or data layout: how the data continues
            report(iterator.resume_note)
        report(f"KERNELS={model.config.kernels!r} on the {jax.default_backend()} backend: {chosen.describe()}.")
        if start_step >= train_steps:
            report(f"The run is complete at step {start_step} (TRAIN_STEPS={train_steps}); raise "
                   f"--gin.TRAIN_STEPS to continue it.")
            return {}
        if jax.process_index() == 0:
            (storage.path(model_dir) / "config.gin").write_text(
                gin.config_str() + f"\n# KERNELS={model.config.kernels!r} ran as {chosen.describe()!r} on the "
                f"{jax.default_backend()} backend.\n"
            )
        if batch_size % num_microbatches:
            raise cli.UserError(f"BATCH_SIZE {batch_size} is not divisible by NUM_MICROBATCHES {num_microbatches}.")
        train_step = mode.make_train_step(model, graphdef, tx, learning_rate, shardings, batch_sharding, num_microbatches)
        report_replicated(train_step, state, graphdef, iterator, batch_size, batch_sharding, rules)

        # The periodic actions: log first, then evaluate, keep the best, checkpoint.
        writer = metric_writers.create_writer(model_dir)
        opened.callback(writer.close)
        periodic: list[actions.Action] = []
        if eval_period:
            evaluate = actions.Evaluate(
                eval_period, writer, steps.make_eval_step(model, graphdef, shardings, batch_sharding),
                load_eval_batches(model, mixture_or_task_name, task_feature_lengths, batch_size, eval_split,
                                  eval_steps, random_seed),
                batch_sharding,
                evaluation.task_evaluation(provider, model, graphdef, mesh, rules, task_feature_lengths, eval_split),
                task_feature_lengths["targets"], model.sum_metrics,
            )
            periodic.append(evaluate)
            if best_metric:
                keep_best = actions.KeepBest(checkpoints.best_checkpoint_manager(model_dir, best_metric, best_mode),
                                             best_metric, evaluate)
                opened.callback(keep_best.close)
                periodic.append(keep_best)
        periodic.append(checkpoint)
        tokens_per_step = batch_size * sum(task_feature_lengths.values())
        log = actions.Log(writer, log_period, tokens_per_step, max_consecutive_skips if skip_nonfinite_updates else None,
                          flushed_before=list(periodic))
        progress = actions.Progress(train_steps, start_step, progress_bar)
        opened.callback(progress.close)

        vocab_limit = max(feature.vocabulary.vocab_size for feature in provider.output_features.values())

        def feed(step: int) -> dict[str, jax.Array]:
            return partitioning.host_batch_to_global(next_batch(iterator, step, mixture_or_task_name, vocab_limit),
                                                     batch_sharding)

        # The loop.
        summary: dict[str, float] = {}
        with preemption.StopRequest() as stop:
            for step in range(start_step + 1, train_steps + 1):
                state, metrics = train_step(state, feed(step))
                log.record(metrics, state)
                if step == start_step + 1:
                    write_operative_config(model_dir)
                tick = actions.Tick(step, last=step == train_steps, stopping=stop.should_stop())
                logged = {}
                for action in [log, *periodic]:
                    if action.due(tick):
                        logged.update(action(tick, state))
                checkpoint.poll()
                progress.advance(logged)
                summary = logged or summary
                if tick.stopping and not tick.last:
                    report(f"Stopping at step {step} on signal {stop.received}; re-run the same command to resume.")
                    break
    write_operative_config(model_dir)
    return summary


def open_checkpoints(model_dir: str) -> ocp.CheckpointManager:
    """The manager of MODEL_DIR/checkpoints, after reporting the partial checkpoints it is about to remove."""
    for partial in checkpoints.partial_checkpoints(model_dir):
        report(f"Ignoring partial checkpoint {partial} (its write was interrupted; it is removed).")
    with cli.user_errors(ValueError, setting="MODEL_DIR"):  # e.g. checkpoint_manager.keep = 0
        return checkpoints.checkpoint_manager(model_dir)


def resume_or_start(
    manager: ocp.CheckpointManager, state: TrainState, shardings: TrainState, iterator: DataIterator,
    model: BaseModel, initial_checkpoint_path: str | None,
) -> tuple[TrainState, str]:
    """The newest checkpoint in MODEL_DIR with the data position it had; else the fresh state, with the
    parameters of `initial_checkpoint_path` when given. Also the sentence that says which, for the summary."""
    with cli.user_errors(ValueError, setting="MODEL_DIR"):
        restored = checkpoints.restore_latest(manager, train_state.abstract_train_state(state, shardings), iterator)
    if restored is not None:
        return restored, f"Resumed from {manager.directory} at step {int(restored.step)}."
    if not initial_checkpoint_path:
        return state, "Fresh start."
    abstract_params = train_state.abstract_train_state(state.params, shardings.params)
    with cli.user_errors(FileNotFoundError, ValueError, setting="INITIAL_CHECKPOINT_PATH"):
        params = checkpoints.restore_params(initial_checkpoint_path, abstract_params, model, fresh=state.params)
    return state.replace(params=params), f"Initialised parameters from {initial_checkpoint_path}."


# The config fields that say how large a network is, in the order the summary names them.
SIZE_FIELDS = ("d_model", "num_heads", "head_dim", "d_ff", "num_layers", "num_encoder_layers", "num_decoder_layers",
               "vocab_size")


def describe_model(model: BaseModel, params: Any) -> str:
    """E.g. `T5 (EncoderDecoderModel, T5Config d_model=128 num_heads=4 ...) 2.9M params`: the family, the trainer
    adapter, the sizes under their gin names, and the parameter count."""
    config = model.config
    family = type(config).__name__.removesuffix("Config").upper()
    sizes = " ".join(f"{name}={getattr(config, name)}" for name in SIZE_FIELDS if hasattr(config, name))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    return f"{family} ({type(model).__name__}, {type(config).__name__} {sizes}) {human_count(count)} params"


def human_count(count: int) -> str:
    """2_912_384 -> '2.9M'; 950 -> '950'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return str(count)


def run_summary(
    model: BaseModel, state: TrainState, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
    batch_size: int, train_steps: int, mesh: Mesh, model_dir: str, origin: str,
) -> str:
    """The one line a run starts with: what trains on what, how long, where, and from where it starts."""
    lengths = " ".join(f"{name}={length}" for name, length in task_feature_lengths.items())
    mesh_shape = " ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
    return (
        f"Training {describe_model(model, state.params)} on {mixture_or_task_name} ({lengths}), batch {batch_size}, "
        f"TRAIN_STEPS {train_steps}, mesh {mesh_shape}, MODEL_DIR {model_dir}. {origin}"
    )


def report_replicated(
    train_step: steps.StepFn, state: TrainState, graphdef: nnx.GraphDef, iterator: DataIterator,
    batch_size: int,
    batch_sharding: NamedSharding, rules: partitioning.Rules,
) -> None:
    """Reports (process 0, once per run, before the first step) every parameter and activation dimension that a
    mesh axis does not divide, so it is replicated, with what that costs per device."""
    if jax.process_index() != 0:
        return
    batch = {
        key: jax.ShapeDtypeStruct((batch_size, *spec.shape[1:]), spec.dtype, sharding=batch_sharding)
        for key, spec in iterator.element_spec.items()
    }
    for line in partitioning.replication_report(steps.replicated_dimensions(train_step, state, graphdef, batch, rules)):
        report(line)


def write_operative_config(model_dir: str) -> None:
    """MODEL_DIR/operative_config.gin: the bindings of every configurable the run has called so far (process 0)."""
    if jax.process_index() == 0:
        (storage.path(model_dir) / "operative_config.gin").write_text(gin.operative_config_str())


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
        raise small_split_error(model, mixture_or_task_name, task_feature_lengths, batch_size, split, eval_steps, seed)
    return batches


def small_split_error(
    model: BaseModel, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
    batch_size: int, split: str, eval_steps: int, seed: int,
) -> cli.UserError:
    """Why a split gave no full batch, with its counts: packing merges short examples, so a split of 40
    examples can fill fewer than 32 rows; and what to change."""
    examples, rows = (
        count_rows(model, mixture_or_task_name, task_feature_lengths, split, seed, pack) for pack in (False, True)
    )
    where = f"Split {split!r} of {mixture_or_task_name!r}"
    skip = "set --gin.train.eval_period=0 to skip evaluation"
    if not rows:
        return cli.UserError(f"{where} has no examples after preprocessing; add examples to it, or {skip}.")
    return cli.UserError(
        f"{where} gave no full batch of {batch_size} examples: packing put its {examples} examples into {rows} "
        f"rows of {dict(task_feature_lengths)}. Use a BATCH_SIZE of at most {rows * jax.process_count()} "
        f"(evaluation reads up to train.eval_steps={eval_steps} batches of it), add examples to the split, or {skip}."
    )


def count_rows(
    model: BaseModel, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], split: str, seed: int,
    pack: bool,
) -> int:
    """How many rows this process's share of a split converts to, packed or one example per row (a small split)."""
    ds = pipeline.get_dataset(
        mixture_or_task_name, task_feature_lengths, jax.process_count(), model.feature_converter_cls,
        split=split, shuffle=False, num_epochs=1, seed=seed, pack=pack,
    )
    return sum(1 for _ in ds.as_numpy_iterator())


def next_batch(
    iterator: Iterator[dict[str, np.ndarray]], step: int, mixture_or_task_name: str, vocab_limit: int
) -> dict[str, np.ndarray]:
    """The next host batch; an exhausted or failing pipeline and out-of-vocabulary ids are `UserError`s."""
    try:
        batch = next(iterator)
    except StopIteration:
        raise cli.UserError(
            f"The train split of {mixture_or_task_name!r} gave no examples at step {step}: it is empty, or the "
            "task's preprocessors filtered every example out. Check the task's data files."
        ) from None
    except tf.errors.OpError as e:  # unreadable files, or an example too long with fit_to_length's "error"
        message = tf_error_message(e)
        hint = (
            " Raise TASK_FEATURE_LENGTHS, or set --gin.fit_to_length.long_sequences=\"'truncate'\"."
            if pipeline.LONG_SEQUENCE_ERROR in message else " Check the task's data files."
        )
        raise cli.UserError(f"Reading the data of {mixture_or_task_name!r} failed at step {step}: {message}.{hint}") from None
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
            raise cli.UserError(
                f"Batch of step {step} has token id {bad} in {key!r}, outside the vocabulary's [0, {vocab_limit}); "
                "a preprocessor or pre-tokenized data produced ids the vocabulary does not have."
            )


def check_vocab_fits(provider: seqio.Task | seqio.Mixture, model: BaseModel) -> None:
    """The model's output layer must cover every id of the task's vocabularies."""
    for name, feature in provider.output_features.items():
        if feature.vocabulary.vocab_size > model.vocab_size:
            raise cli.UserError(
                f"Feature {name!r} uses a vocabulary of {feature.vocabulary.vocab_size} ids but the model has "
                f"vocab_size {model.vocab_size}; raise T5Config.vocab_size (e.g. to a multiple of 128)."
            )
