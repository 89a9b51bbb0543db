"""Orbax checkpoints of a training run: the train state (params, optimizer state, step, RNG) and the data iterator.

A checkpoint is written to a temporary directory and renamed when complete (Orbax's atomicity), so a run killed
mid-save leaves the previous checkpoint as the latest complete one. Saves are asynchronous by default: the device
arrays are copied to host memory before `save` returns, and the files are written in the background.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from clipgen_jax.models import vqgan

logger = logging.getLogger(__name__)

STATE_ITEM = "state"
DATA_ITEM = "data_iterator"


class UnrestorableCheckpointsError(RuntimeError):
    """A workdir holds checkpoints, but none of them restores into the run's train state."""


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
        """The newest checkpoint that restores; an unreadable one is skipped with a warning naming it. None when
        there are no checkpoints; an error when there are some but none restores, because starting afresh would
        overwrite them (they are usually from another config or code version, not damaged)."""
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                return self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 (any failure to read a checkpoint means: try an older one)
                logger.warning("checkpoint %s/%d is unreadable (%s: %s); trying an older one",
                               self.directory, step, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        if steps:
            raise UnrestorableCheckpointsError(
                f"none of the {len(steps)} checkpoints in {self.directory} (steps {steps}) restores into this run's "
                "train state (see the warnings above): they were written by another config or code version, or are "
                "damaged. Use a new workdir, or move the checkpoints away to start this one afresh")
        return None

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def params_hash(params: Any) -> str:
    """SHA-256 over every parameter's path, dtype, shape and bytes: what identifies a model's weights in the
    metadata of data made with them (precomputed tokens and embeddings)."""
    digest = hashlib.sha256()
    leaves = sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda item: jax.tree_util.keystr(item[0]))
    for path, leaf in leaves:
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)


BUNDLE_METADATA = "metadata.json"
BUNDLE_PARAMS = "params"


def save_bundle(directory: str | pathlib.Path, params: Any, metadata: dict, *, overwrite: bool = False
                ) -> pathlib.Path:
    """An inference bundle: `metadata.json` (what the params are: kind, model config, provenance) and an Orbax
    `params/` checkpoint. Written to a temporary sibling and renamed, so a directory that exists is complete; with
    `overwrite`, an existing bundle is replaced only once the new one is complete."""
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; choose a new output directory or remove it")
    temporary = directory.with_name(f".{directory.name}.incomplete")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(temporary / BUNDLE_PARAMS, params)
    checkpointer.wait_until_finished()
    (temporary / BUNDLE_METADATA).write_text(json.dumps(metadata, indent=2))
    if directory.exists():
        replaced = directory.with_name(f".{directory.name}.replaced")
        directory.rename(replaced)
        temporary.rename(directory)
        shutil.rmtree(replaced)
    else:
        temporary.rename(directory)
    return directory


def is_bundle(directory: str | pathlib.Path) -> bool:
    return (pathlib.Path(directory) / BUNDLE_METADATA).is_file()


def load_bundle_metadata(directory: str | pathlib.Path) -> dict:
    path = pathlib.Path(directory) / BUNDLE_METADATA
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an inference bundle (no {BUNDLE_METADATA})")
    return json.loads(path.read_text())


def load_bundle_params(directory: str | pathlib.Path, abstract_params: Any) -> Any:
    """Params of a bundle, restored into `abstract_params` (ShapeDtypeStructs, optionally with shardings)."""
    return ocp.StandardCheckpointer().restore(pathlib.Path(directory).absolute() / BUNDLE_PARAMS, abstract_params)


# A finished training run exports its inference weights here (a bundle), for later stages and tools to load.
EXPORT_DIR = "export"


def bundle_path(path: str | pathlib.Path, kind: str) -> pathlib.Path:
    """The bundle a path names: a bundle itself, or a finished training workdir's `export/`; of the given kind."""
    path = pathlib.Path(path)
    if not is_bundle(path) and is_bundle(path / EXPORT_DIR):
        path = path / EXPORT_DIR
    if not is_bundle(path):
        raise FileNotFoundError(f"{path} holds no {kind} bundle: pass a finished training workdir (with "
                                f"{EXPORT_DIR}/) or an exported/converted bundle")
    found = load_bundle_metadata(path).get("kind")
    if found != kind:
        raise ValueError(f"{path} holds a {found!r} bundle, not a {kind!r} one")
    return path


def load_vqgan(path: str | pathlib.Path, dtype=None):
    """(model, params, metadata) of a VQGAN bundle: a finished VQGAN workdir or `tools/convert_taming.py` output."""
    path = bundle_path(path, "vqgan")
    metadata = load_bundle_metadata(path)
    model = vqgan.from_config(metadata["model"], dtype or jnp.float32)
    abstract = jax.eval_shape(lambda: vqgan.init_params(model, jax.random.PRNGKey(0)))
    return model, load_bundle_params(path, abstract), metadata
