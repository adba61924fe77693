"""Orbax checkpoints of the train state together with the data-iterator position.

Each step directory holds `state` (arrays, saved asynchronously by Orbax) and `dataset`
(this process's tf.data iterator, written synchronously by a small handler, so the
checkpoint is atomic: Orbax commits the step only when both are written).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gin
import jax
import orbax.checkpoint as ocp
from clu.data.dataset_iterator import TfDatasetIterator
from etils import epath

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
