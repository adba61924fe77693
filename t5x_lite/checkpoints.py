"""Orbax checkpoints of the train state together with the data-iterator position.

Each step directory holds `state` (arrays, saved asynchronously by Orbax) and `dataset`
(this process's tf.data iterator, written synchronously by a small handler, so the
checkpoint is atomic: Orbax commits the step only when both are written).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import gin
import jax
import orbax.checkpoint as ocp
from clu.data.dataset_iterator import TfDatasetIterator
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from t5x_lite import partitioning
from t5x_lite.models.base import BaseModel
from t5x_lite.training import train_state
from t5x_lite.training.train_state import TrainState


class DatasetIteratorHandler(ocp.CheckpointHandler):
    """Saves and restores a tf.data iterator, one file per process."""

    def _path(self, directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}"

    def save(self, directory: epath.Path, args: "DatasetIteratorArgs") -> None:
        args.iterator.save(self._path(directory))

    def restore(self, directory: epath.Path, args: "DatasetIteratorArgs") -> TfDatasetIterator:
        path = self._path(directory)
        if not epath.Path(f"{path}.index").exists():
            raise FileNotFoundError(
                f"No data-iterator state for {jax.process_count()} process(es) in {directory}; "
                "it was written with a different process count."
            )
        args.iterator.restore(path)
        return args.iterator


@ocp.args.register_with_handler(DatasetIteratorHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class DatasetIteratorArgs(ocp.args.CheckpointArgs):
    iterator: TfDatasetIterator


@gin.configurable
def checkpoint_manager(
    model_dir: str, keep: int = 3, async_save: bool = True
) -> ocp.CheckpointManager:
    """An Orbax manager over `MODEL_DIR/checkpoints` keeping the newest `keep` steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(
        Path(model_dir).absolute() / "checkpoints", options=options, item_names=("state", "dataset")
    )


def save(manager: ocp.CheckpointManager, state: TrainState, iterator: TfDatasetIterator) -> None:
    """Starts saving the state at its step (arrays finish in the background)."""
    step = int(jax.device_get(state.step))
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), dataset=DatasetIteratorArgs(iterator)),
    )


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: TrainState, iterator: TfDatasetIterator
) -> TrainState | None:
    """Restores the newest checkpoint onto the shardings in `abstract_state`; None if none."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), dataset=DatasetIteratorArgs(iterator)
        ),
    )
    return restored.state


def find_state_dir(path: str) -> epath.Path:
    """The `state` folder of a checkpoint given as a MODEL_DIR, its `checkpoints` folder or a step folder.

    A MODEL_DIR or `checkpoints` folder means its newest complete step.
    """
    root = epath.Path(path if "://" in path else os.path.abspath(path))  # Orbax needs absolute local paths
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


def _param_name(path: tuple) -> str:
    """`encoder/layers/0/mlp/wi_0/kernel`: the same for int and str keys (checkpoints store str)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def restore_params(path: str, abstract_params: dict) -> dict:
    """Restores only the parameters of a checkpoint onto the shardings in `abstract_params`.

    The optimizer state and step of the checkpoint are not read (T5X's INITIAL_CHECKPOINT_PATH).
    A parameter missing from the checkpoint or of another shape is named in the error.
    """
    state_dir = find_state_dir(path)
    checkpointer = ocp.PyTreeCheckpointer()
    saved = checkpointer.metadata(state_dir).item_metadata["params"]
    saved_shapes = {_param_name(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    for key, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        name = _param_name(key)
        if name not in saved_shapes:
            raise ValueError(f"Checkpoint {state_dir} has no parameter {name}; it is from another model.")
        if tuple(saved_shapes[name]) != tuple(leaf.shape):
            raise ValueError(
                f"Parameter {name} has shape {tuple(saved_shapes[name])} in checkpoint {state_dir} but "
                f"{tuple(leaf.shape)} in this model; use the model config the checkpoint was trained with."
            )
    target = {"params": abstract_params}
    restored = checkpointer.restore(
        state_dir,
        args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        ),
    )
    return restored["params"]


def best_checkpoint_manager(model_dir: str, metric: str, mode: str = "max") -> ocp.CheckpointManager:
    """A manager over `MODEL_DIR/best` that keeps only the checkpoint with the best `metric`."""
    if mode not in ("max", "min"):
        raise ValueError(f"best_mode must be 'max' or 'min', got {mode!r}.")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, best_fn=lambda metrics: metrics[metric], best_mode=mode,
        keep_checkpoints_without_metrics=False, create=True,
    )
    return ocp.CheckpointManager(Path(model_dir).absolute() / "best", options=options, item_names=("state",))


def save_if_best(manager: ocp.CheckpointManager, state: TrainState, metrics: dict[str, float], metric: str) -> None:
    """Offers the state with its eval metrics; Orbax keeps it only while it is the best."""
    if metric not in metrics:
        raise ValueError(f"best_metric {metric!r} is not among the eval metrics {sorted(metrics)}.")
    step = int(jax.device_get(state.step))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), metrics=dict(metrics))


def load_model_params(
    model: BaseModel, path: str, mesh: Mesh, rules: partitioning.Rules
) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, params) of `model` with the parameters of the checkpoint at `path`, sharded by the rules."""
    graphdef, abstract = train_state.network_graphdef(model)
    shardings = partitioning.param_shardings(abstract, mesh, rules)
    abstract_params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(abstract), shardings
    )
    return graphdef, restore_params(path, abstract_params)
