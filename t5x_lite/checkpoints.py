"""Orbax checkpoints of the train state together with the data-iterator position.

Each step directory holds `state` (arrays, saved asynchronously by Orbax) and `dataset`
(the data position: the run's data layout and each data shard's tf.data iterator, written
synchronously by a small handler, so the checkpoint is atomic: Orbax commits the step only
when both are written). Both restore onto any mesh and process count.

In an adapter run (`t5x_lite.adapters`) a checkpoint holds only the adapter parameters (with their optimizer
state, the step, RNG and data position); restoring loads the base named in the run's config.gin
(INITIAL_CHECKPOINT_PATH) and overlays them (`checkpointed`, `load_checkpoint_params`).

Crash safety is Orbax's: a step is written into `<step>.orbax-checkpoint-tmp` and
renamed to `<step>` only once every process has finished, so a run killed mid-write leaves
a temporary folder that is never restored (the next run reports and removes it).
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import os
import re
from collections.abc import Collection

import gin
import jax
import orbax.checkpoint as ocp
import tensorflow as tf
from etils import epath
from flax import nnx, traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from t5x_lite import adapters, cli, partitioning, storage
from t5x_lite.data.position import DataIterator, DataLayoutMismatch
from t5x_lite.models.base import BaseModel
from t5x_lite.training import train_state
from t5x_lite.training.train_state import TrainState


class DatasetIteratorHandler(ocp.CheckpointHandler):
    """Saves and restores the train data position: its layout and the state of each data shard (`DataIterator`)."""

    def save(self, directory: epath.Path, args: DatasetIteratorArgs) -> None:
        try:
            args.iterator.save(directory)
        except tf.errors.OpError as e:  # a full disk or read-only folder, in TF's own error types
            raise OSError(f"writing the data-iterator state failed: {e.message}") from e

    def restore(self, directory: epath.Path, args: DatasetIteratorArgs) -> DataIterator:
        args.iterator.restore(directory)
        return args.iterator


@ocp.args.register_with_handler(DatasetIteratorHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class DatasetIteratorArgs(ocp.args.CheckpointArgs):
    iterator: DataIterator


def checkpoints_dir(model_dir: str) -> epath.Path:
    """`MODEL_DIR/checkpoints`, absolute (Orbax needs absolute local paths)."""
    return storage.absolute(model_dir) / "checkpoints"


def retention_policy(keep: int | None, keep_period: int | None) -> ocp.checkpoint_managers.PreservationPolicy:
    """Orbax's policy for keeping the newest `keep` steps (None: all) plus every step divisible by `keep_period`."""
    if keep is not None and keep < 1:
        raise ValueError(f"checkpoint_manager.keep must be at least 1 (or None to keep all), got {keep}.")
    if keep_period is not None and keep_period < 1:
        raise ValueError(f"checkpoint_manager.keep_period must be a positive step count (or None), got {keep_period}.")
    latest = ocp.checkpoint_managers.LatestN(n=keep)
    if keep_period is None:
        return latest
    return ocp.checkpoint_managers.AnyPreservationPolicy([latest, ocp.checkpoint_managers.EveryNSteps(keep_period)])


@gin.configurable
def checkpoint_manager(
    model_dir: str, keep: int | None = 3, keep_period: int | None = None, async_save: bool = True
) -> ocp.CheckpointManager:
    """An Orbax manager over `MODEL_DIR/checkpoints`: keeps the newest `keep` steps and every
    `keep_period`-th step (e.g. keep=3, keep_period=10000: the last three plus 10k, 20k, ...).

    Temporary folders of interrupted writes are removed before the manager starts
    (`partial_checkpoints` lists them first); complete checkpoints are only ever removed by
    the retention policy.
    """
    options = ocp.CheckpointManagerOptions(
        preservation_policy=retention_policy(keep, keep_period), create=True, enable_async_checkpointing=async_save,
    )
    remove_partial_checkpoints(model_dir)
    return ocp.CheckpointManager(checkpoints_dir(model_dir), options=options, item_names=("state", "dataset"))


def partial_checkpoints(model_dir: str) -> list[epath.Path]:
    """Temporary step folders that Orbax never committed (the writer was killed), oldest step first."""
    folder = checkpoints_dir(model_dir)
    if not folder.is_dir():
        return []
    paths = [p.get() for p in ocp.path.step.all_temporary_paths(folder)]
    return sorted(paths, key=lambda p: (ocp.path.step.step_from_checkpoint_name(p.name), p.name))


def remove_partial_checkpoints(model_dir: str) -> None:
    """Process 0 removes the temporary step folders of interrupted writes; every process waits until it has.

    Done here, synchronously, rather than by Orbax's `cleanup_tmp_directories`: that runs in a thread only a save
    waits for, so a run failing before its first save (e.g. a wrong INITIAL_CHECKPOINT_PATH) left it running into
    interpreter shutdown, where it printed a "cannot schedule new futures after interpreter shutdown" trace.
    """
    if jax.process_index() == 0:
        for path in partial_checkpoints(model_dir):
            path.rmtree()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("t5x_lite: partial checkpoints removed")


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """One step folder under `MODEL_DIR/checkpoints`."""

    step: int
    path: epath.Path
    complete: bool  # committed by Orbax (False: a temporary folder left by an interrupted write)
    time: datetime.datetime  # commit time, or last modification of a partial folder
    size_bytes: int | None  # None on an object store (gs://), whose listing here gives no sizes


def folder_size(path: epath.Path) -> int | None:
    """Bytes of all files under `path`; None on an object store (gs://: TensorStore lists no sizes)."""
    if storage.is_remote(path):
        return None
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def committed_steps(model_dir: str) -> list[int]:
    """The steps Orbax has committed in MODEL_DIR/checkpoints, oldest first."""
    folder = checkpoints_dir(model_dir)
    return sorted(ocp.path.step.checkpoint_steps(folder)) if folder.is_dir() else []


def list_checkpoints(model_dir: str) -> list[CheckpointInfo]:
    """Every complete and partial checkpoint of a run, by step."""
    folder = checkpoints_dir(model_dir)
    infos = [CheckpointInfo(meta.step, meta.path, True, meta.commit_timestamp, folder_size(meta.path))
             for meta in ocp.path.step.standard_name_format().find_all(folder)]
    for path in partial_checkpoints(model_dir):
        modified = datetime.datetime.fromtimestamp(path.stat().mtime, tz=datetime.timezone.utc)
        step = ocp.path.step.step_from_checkpoint_name(path.name)
        infos.append(CheckpointInfo(step, path, False, modified, folder_size(path)))
    return sorted(infos, key=lambda info: (info.step, info.complete))


def checkpointed(state: TrainState, adapter_paths: Collection[str] = ()) -> TrainState:
    """The part of the state a checkpoint holds: all of it, or in an adapter run (the adapter parameters'
    `adapter_paths`) only the adapter parameters beside the optimizer state, step and RNG."""
    if not adapter_paths:
        return state
    return state.replace(params=adapters.split_params(state.params, adapter_paths)[0])


def save(
    manager: ocp.CheckpointManager, state: TrainState, iterator: DataIterator, adapter_paths: Collection[str] = ()
) -> None:
    """Starts saving the state (`checkpointed`: adapters only in an adapter run) at its step (arrays finish in
    the background).

    A failed write (full disk, read-only folder) raises an `OSError` that names the step, the
    folder and the newest complete checkpoint.
    """
    step = int(jax.device_get(state.step))
    state = checkpointed(state, adapter_paths)
    try:
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), dataset=DatasetIteratorArgs(iterator)),
        )
    except (OSError, ValueError) as e:  # tensorstore reports I/O failures as ValueError
        raise write_error(manager, step, e) from e


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
    """Waits until the saves in flight have committed; a failed background write raises an `OSError` as `save`'s."""
    try:
        manager.wait_until_finished()
    except (OSError, ValueError) as e:  # a full disk or read-only MODEL_DIR, found by the background write
        raise write_error(manager, None, e) from e


def write_error(manager: ocp.CheckpointManager, step: int | None, error: Exception) -> OSError:
    """An `OSError` for a failed checkpoint write, saying what to fix and where a re-run resumes."""
    newest = ocp.path.step.checkpoint_steps(manager.directory)
    resume = f"the newest complete checkpoint is step {max(newest)}" if newest else "there is no complete checkpoint yet"
    what = f"checkpoint step {step}" if step is not None else "a checkpoint"
    return OSError(
        f"Could not write {what} to {manager.directory} ({_io_reason(error)}). Free disk space or make "
        f"MODEL_DIR writable, then re-run the same command: {resume}."
    )


def _io_reason(error: Exception) -> str:
    """"No space left on device" and the like, from an OSError or a tensorstore error's os_error_code."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    code = re.search(r"os_error_code='?(\d+)", str(error))
    return os.strerror(int(code.group(1))) if code else _short(error)


class CheckpointRestoreError(ValueError):
    """A checkpoint in MODEL_DIR cannot be restored; the message names it and what to do."""


def _short(error: Exception) -> str:
    """The first line of an error, cut to a readable length (tensorstore errors embed whole specs)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= 300 else text[:300] + " ..."


def _restore_step(
    manager: ocp.CheckpointManager, step: int, abstract_state: TrainState, iterator: DataIterator
) -> TrainState:
    state_dir = manager.directory / str(step) / "state"
    saved = ocp.StandardCheckpointHandler().metadata(state_dir)
    check_param_shapes(saved["params"], abstract_state.params, state_dir)
    if len(jax.tree.leaves(saved)) != len(jax.tree.leaves(abstract_state)):
        raise CheckpointMismatch(
            f"Checkpoint {state_dir} holds a train state of {len(jax.tree.leaves(saved))} arrays but this run's has "
            f"{len(jax.tree.leaves(abstract_state))}: the optimizer or its options (e.g. train.skip_nonfinite_updates) "
            "changed since it was written. Resume with the original settings, or start a new MODEL_DIR with "
            "INITIAL_CHECKPOINT_PATH pointing at this one (it takes the parameters only)."
        )
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), dataset=DatasetIteratorArgs(iterator))
    return manager.restore(step, args=args).state


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: TrainState, iterator: DataIterator
) -> TrainState | None:
    """Restores the newest complete checkpoint onto the shardings in `abstract_state`; None if none.

    A checkpoint of another model shape or optimizer is a `CheckpointMismatch` naming the first
    mismatching parameter (or the differing number of arrays); one whose data position cannot
    continue here (another BATCH_SIZE) a `DataLayoutMismatch`. Another process count is fine:
    the data position continues exactly (`t5x_lite.data.position`).
    A committed checkpoint that cannot be read (truncated or corrupted files) is an error naming
    its folder and the newest older one that does restore: nothing is deleted or skipped
    silently, the user moves the bad folder aside to resume from the good one.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    try:
        return _restore_step(manager, steps[0], abstract_state, iterator)
    except (CheckpointMismatch, DataLayoutMismatch):
        raise
    except Exception as e:  # Orbax, tensorstore and tf.data report damaged files with many error types.
        bad = manager.directory / str(steps[0])
        good = next((s for s in steps[1:] if _restores(manager, s, abstract_state, iterator)), None)
        fix = (
            f"The newest checkpoint that restores is {manager.directory / str(good)}: move {bad} out of "
            f"{manager.directory} to resume from step {good}."
            if good is not None
            else f"No older checkpoint restores either; move {manager.directory} aside to start afresh."
        )
        raise CheckpointRestoreError(f"Checkpoint {bad} is damaged and cannot be restored ({_short(e)}). {fix}") from e


def _restores(
    manager: ocp.CheckpointManager, step: int, abstract_state: TrainState, iterator: DataIterator
) -> bool:
    try:
        _restore_step(manager, step, abstract_state, iterator)
    except Exception:  # noqa: BLE001  (any failure means this step is not a usable fallback)
        return False
    return True


def find_state_dir(path: str) -> epath.Path:
    """The `state` folder of a checkpoint given as a MODEL_DIR, its `checkpoints` folder or a step folder.

    A MODEL_DIR or `checkpoints` folder means its newest complete step.
    """
    root = storage.absolute(path)  # Orbax needs absolute local paths
    if (root / "state").is_dir():
        return root / "state"
    for folder in (root / "checkpoints", root):
        if folder.is_dir():
            steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "state").is_dir())
            if steps:
                return folder / str(steps[-1]) / "state"
    raise FileNotFoundError(
        f"No checkpoint found at {path!r}: expected a MODEL_DIR of a t5x_lite run, its `checkpoints` folder, "
        "or a step folder such as MODEL_DIR/checkpoints/1000."
    )


class CheckpointMismatch(ValueError):
    """The checkpoint was written by another model or optimizer (the message names the difference)."""


def check_param_shapes(saved: dict, abstract_params: dict, state_dir: epath.Path) -> None:
    """Compares the parameter shapes in a checkpoint's metadata (`saved`) with the model's."""
    saved_shapes = {name: leaf.shape for name, leaf in partitioning.named_leaves(saved).items()}
    for name, leaf in partitioning.named_leaves(abstract_params).items():
        if name not in saved_shapes:
            raise CheckpointMismatch(f"Checkpoint {state_dir} has no parameter {name}; it is from another model.")
        if tuple(saved_shapes[name]) != tuple(leaf.shape):
            raise CheckpointMismatch(
                f"Parameter {name} has shape {tuple(saved_shapes[name])} in checkpoint {state_dir} but "
                f"{tuple(leaf.shape)} in this model; use the model config the checkpoint was trained with."
            )


def restore_params(path: str, abstract_params: dict, model: BaseModel | None = None, fresh: dict | None = None) -> dict:
    """Restores only the parameters of a checkpoint onto the shardings in `abstract_params`.

    The optimizer state and step of the checkpoint are not read (T5X's INITIAL_CHECKPOINT_PATH).
    A parameter missing from the checkpoint or of another shape is named in the error, except that
    with `fresh` (initialised params) one under a prefix in `model.fresh_param_prefixes` keeps its
    fresh value (a new head, e.g. a classifier, on a pre-trained encoder), and one named in `model.param_deltas`
    starts as its checkpoint value plus the delta the checkpoint holds (`param_deltas`).
    `hf:/path` reads a Hugging Face model directory instead (its config must match `model`'s; `fresh`
    works the same way).
    """
    if path.startswith("hf:"):
        from t5x_lite import hf  # imported on use: only `hf:` paths need safetensors and tokenizers

        return hf.restore_params(path[len("hf:"):], abstract_params, model, fresh)
    state_dir = find_state_dir(path)
    saved = ocp.StandardCheckpointHandler().metadata(state_dir)["params"]
    new_leaves = {}
    prefixes = tuple(getattr(model, "fresh_param_prefixes", ()))
    if fresh is not None and prefixes:
        saved_names = set(partitioning.named_leaves(saved))
        flat = traverse_util.flatten_dict(abstract_params)
        new_leaves = {k: v for k, v in traverse_util.flatten_dict(fresh).items()
                      if partitioning.param_name(k) not in saved_names and str(k[0]).startswith(prefixes)}
        abstract_params = traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in new_leaves})
    deltas = param_deltas(model, saved, abstract_params)
    abstract_params = with_delta_leaves(abstract_params, deltas)
    check_param_shapes(saved, abstract_params, state_dir)
    target = {"params": abstract_params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    )
    params = add_deltas(restored["params"], deltas)
    if not new_leaves:
        return params
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(params), **new_leaves})


def param_deltas(model: BaseModel | None, saved: dict, abstract_params: dict) -> dict[tuple, tuple]:
    """{param key: checkpoint key of a delta to add onto it} from `model.param_deltas` (names): those whose
    delta the checkpoint holds and the model does not (DeBERTa-v3's E_delta onto E_G when fine-tuning)."""
    declared = getattr(model, "param_deltas", {})
    if not declared:
        return {}
    saved_names = set(partitioning.named_leaves(saved))
    keys = {partitioning.param_name(k): k for k in traverse_util.flatten_dict(abstract_params)}
    return {keys[target]: tuple(delta.split("/")) for target, delta in declared.items()
            if target in keys and delta in saved_names and delta not in keys}


def with_delta_leaves(abstract_params: dict, deltas: dict[tuple, tuple]) -> dict:
    """`abstract_params` plus each delta, restored as its target is (shape, dtype, sharding)."""
    if not deltas:
        return abstract_params
    flat = traverse_util.flatten_dict(abstract_params)
    return traverse_util.unflatten_dict({**flat, **{delta: flat[target] for target, delta in deltas.items()}})


def add_deltas(params: dict, deltas: dict[tuple, tuple]) -> dict:
    """Restored params with each delta added onto its target and dropped."""
    if not deltas:
        return params
    flat = traverse_util.flatten_dict(params)
    for target, delta in deltas.items():
        flat[target] = flat[target] + flat.pop(delta)
    return traverse_util.unflatten_dict(flat)


def best_checkpoint_manager(model_dir: str, metric: str, mode: str = "max") -> ocp.CheckpointManager:
    """A manager over `MODEL_DIR/best` that keeps only the checkpoint with the best `metric`."""
    if mode not in ("max", "min"):
        raise ValueError(f"best_mode must be 'max' or 'min', got {mode!r}.")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, best_fn=lambda metrics: metrics[metric], best_mode=mode,
        keep_checkpoints_without_metrics=False, create=True,
    )
    return ocp.CheckpointManager(storage.absolute(model_dir) / "best", options=options, item_names=("state",))


def save_if_best(
    manager: ocp.CheckpointManager, state: TrainState, metrics: dict[str, float], metric: str,
    adapter_paths: Collection[str] = (),
) -> None:
    """Offers the state (`checkpointed`) with its eval metrics; Orbax keeps it only while it is the best."""
    if metric not in metrics:
        raise ValueError(f"best_metric {metric!r} is not among the eval metrics {sorted(metrics)}.")
    step = int(jax.device_get(state.step))
    state = checkpointed(state, adapter_paths)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), metrics=dict(metrics))


def load_checkpoint_params(
    model: BaseModel, path: str, mesh: Mesh, rules: partitioning.Rules
) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, params) of `model` with the parameters of the checkpoint at `path` (CHECKPOINT_PATH), sharded
    by the rules; a missing checkpoint or one of another model is a `UserError`."""
    with cli.user_errors(ValueError):  # e.g. LoRA targets that match nothing
        graphdef, abstract = train_state.network_graphdef(model)
    shardings = partitioning.param_shardings(abstract, mesh, rules)
    abstract_params = train_state.abstract_train_state(nnx.to_pure_dict(abstract), shardings)
    adapter_paths = adapters.adapter_paths(abstract)
    with cli.user_errors(FileNotFoundError, ValueError, setting="CHECKPOINT_PATH"):
        if not adapter_paths:
            return graphdef, restore_params(path, abstract_params, model)
        adapter_params, base = adapters.split_params(abstract_params, adapter_paths)
        base_path = adapter_base_path(find_state_dir(path))
    with cli.user_errors(FileNotFoundError, ValueError, setting="INITIAL_CHECKPOINT_PATH of the adapter run"):
        base = restore_params(base_path, base, model)
    with cli.user_errors(FileNotFoundError, ValueError, setting="CHECKPOINT_PATH"):
        return graphdef, adapters.merge_params(base, restore_params(path, adapter_params, model))


def adapter_base_path(state_dir: epath.Path) -> str:
    """The base checkpoint of the adapter run whose checkpoint `state_dir` is (MODEL_DIR/checkpoints/N/state or
    MODEL_DIR/best/N/state): `train.initial_checkpoint_path` in MODEL_DIR/config.gin (a value or a macro)."""
    config = state_dir.parent.parent.parent / "config.gin"
    text = re.sub(r"\\\n\s*", "", config.read_text()) if config.exists() else ""  # gin's line continuations
    value = _gin_value(text, r"train\.initial_checkpoint_path")
    if value is not None and value.startswith("%"):
        value = _gin_value(text, re.escape(value[1:]))
    base = ast.literal_eval(value) if value is not None else None
    if not base:
        raise ValueError(
            f"{state_dir} holds adapter parameters only, and {config} names no INITIAL_CHECKPOINT_PATH (the base "
            "model they adapt); point CHECKPOINT_PATH at the checkpoint of an adapter run with its config.gin."
        )
    return base


def _gin_value(text: str, name: str) -> str | None:
    """The right-hand side of the binding `name = ...` in gin text (None if unbound)."""
    match = re.search(rf"^{name} = (.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else None


def restore_base_params(
    path: str, abstract_params: dict, model: BaseModel, fresh: dict, adapter_paths: Collection[str]
) -> dict:
    """`restore_params` for the start of an adapter run: the base from `path`, the adapters (which the base
    checkpoint predates) keep their `fresh` values."""
    base = adapters.split_params(abstract_params, adapter_paths)[1]
    fresh_adapters, fresh_base = adapters.split_params(fresh, adapter_paths)
    return adapters.merge_params(restore_params(path, base, model, fresh=fresh_base), fresh_adapters)
