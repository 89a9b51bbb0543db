"""Orbax checkpoints of a training run: the train state (params, optimizer state, step, RNG) and the data iterator.

A checkpoint is written to a temporary directory and renamed when complete (Orbax's atomicity), so a run killed
mid-save leaves the previous checkpoint as the latest complete one. Saves are asynchronous by default: the device
arrays are copied to host memory before `save` returns, and the files are written in the background.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

STATE_ITEM = "state"
DATA_ITEM = "data_iterator"


class Checkpointer:
    """A thin, typed face on `ocp.CheckpointManager` for (train state, data iterator state) pairs."""

    def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 3, save_interval_steps: int = 1000,
                 async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                               enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE_ITEM, DATA_ITEM))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Saves when `step` is on the save interval (or `force`); returns whether a save was started."""
        return self._manager.save(
            step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                             DATA_ITEM: ocp.args.JsonSave(data_state)}), force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores into `abstract_state` (ShapeDtypeStructs carrying the target shardings)."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                                             DATA_ITEM: ocp.args.JsonRestore()}))
        return restored[STATE_ITEM], restored[DATA_ITEM]

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """The newest checkpoint that restores; an unreadable one is skipped with a warning naming it."""
        for step in reversed(self.all_steps()):
            try:
                return self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 (any failure to read a checkpoint means: try an older one)
                logging.warning("checkpoint %s/%d is unreadable (%s: %s); trying an older one",
                                self.directory, step, type(e).__name__, e)
        return None

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
