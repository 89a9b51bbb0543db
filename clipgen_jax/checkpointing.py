"""Orbax checkpoints of a training run: the train state (params, optimizer state, step, RNG) and the data iterator.

A checkpoint is written to a temporary directory and renamed when complete (Orbax's atomicity), so a run killed
mid-save leaves the previous checkpoint as the latest complete one. Saves are asynchronous by default: the device
arrays are copied to host memory before `save` returns, and the files are written in the background.

Every checkpoint carries a manifest of its files' SHA-256 (`MANIFEST`), written after its last file and before the
rename that commits it, and checked before every restore: Orbax itself reads a flipped byte in array data back as a
wrong value without complaint (zstd chunks carry no checksum). Resuming skips a damaged or unreadable checkpoint with
a warning naming it, falls back to the newest one that restores, and moves the skipped ones aside
(`<step>.unreadable`), because the resumed run will save those steps again. Inference bundles carry a manifest of
their params too, checked whenever they load.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from clipgen_jax.models import vqgan

logger = logging.getLogger(__name__)

STATE_ITEM = "state"
DATA_ITEM = "data_iterator"
# {"format": 1, "files": {path relative to the step directory: {"bytes": size, "sha256": hex digest}}}.
MANIFEST = "sha256_manifest.json"
# Orbax (0.12) writes step N into `N.orbax-checkpoint-tmp` and renames it to `N` to commit it. The manifest is written
# in there, so it is committed together with the files it describes.
_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Orbax rewrites this one (timestamps only; a restore does not need it) while committing, after the manifest.
_UNLISTED = frozenset({MANIFEST, "_CHECKPOINT_METADATA"})
# Checkpoints skipped on resume are renamed `<step>.unreadable` (Orbax lists only directories named by an integer).
UNREADABLE_SUFFIX = ".unreadable"


class UnrestorableCheckpointsError(RuntimeError):
    """A workdir holds checkpoints, but none of them restores into the run's train state."""


class CorruptCheckpointError(OSError):
    """A checkpoint's (or bundle's) files differ from its manifest: it was damaged on disk after it was written. An
    OSError, as a failed read is, so that the tools report it as one line like other unusable files."""


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str | pathlib.Path) -> None:
    """Writes `directory/MANIFEST`: the size and SHA-256 of every other file under `directory` (but Orbax's step
    metadata)."""
    directory = pathlib.Path(directory)
    files = {path.relative_to(directory).as_posix(): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
             for path in sorted(directory.rglob("*"))
             if path.is_file() and path.relative_to(directory).as_posix() not in _UNLISTED}
    temporary = directory / f".{MANIFEST}.incomplete"
    temporary.write_text(json.dumps({"format": 1, "files": files}, indent=1, sort_keys=True))
    os.replace(temporary, directory / MANIFEST)


def verify_manifest(directory: str | pathlib.Path) -> bool:
    """Checks every file `directory`'s manifest lists: True when all match, False when there is no manifest (a
    checkpoint from before manifests); raises `CorruptCheckpointError` naming the first file that differs."""
    directory = pathlib.Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        return False
    try:
        files = json.loads(path.read_text())["files"]
        expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(f"{path} is damaged ({type(e).__name__}: {e})") from None
    for name, (size, digest) in expected.items():
        file = directory / name
        if not file.is_file():
            raise CorruptCheckpointError(f"{file} is missing")
        if file.stat().st_size != size:
            raise CorruptCheckpointError(f"{file} has {file.stat().st_size} bytes; it was written with {size}")
        if _sha256(file) != digest:
            raise CorruptCheckpointError(f"{file} does not match the SHA-256 it was written with")
    return True


def verify_or_warn(directory: str | pathlib.Path, what: str) -> None:
    """`verify_manifest`, with a warning that `what` (e.g. "checkpoint") is read unverified when it has no manifest."""
    if not verify_manifest(directory):
        logger.warning("%s %s has no %s (written by an older version): reading it unverified", what, directory,
                       MANIFEST)


class Checkpointer:
    """A thin, typed face on `ocp.CheckpointManager` for (train state, data iterator state) pairs."""

    def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 3, save_interval_steps: int = 1000,
                 async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self._async_save = async_save
        self._saving_step: int | None = None
        # Always Orbax's async checkpointer, because only it calls back between a save's last file and its commit
        # (where the manifest goes); a synchronous save is an asynchronous one waited for.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest), create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE_ITEM, DATA_ITEM))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Saves when `step` is on the save interval (or `force`); returns whether a save was started."""
        self._manager.wait_until_finished()  # the previous save's callback reads _saving_step
        self._saving_step = step
        started = self._manager.save(
            step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                             DATA_ITEM: ocp.args.JsonSave(data_state)}), force=force)
        if started and not self._async_save:
            self._manager.wait_until_finished()
        return started

    def _write_manifest(self) -> None:
        """Orbax's post-finalization callback: runs on the primary process once every process's files are written,
        before the commit."""
        staged = self.directory / f"{self._saving_step}{_ORBAX_TMP_SUFFIX}"
        write_manifest(staged if staged.is_dir() else self.directory / str(self._saving_step))

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores into `abstract_state` (ShapeDtypeStructs carrying the target shardings); raises
        `CorruptCheckpointError` when the files differ from the checkpoint's manifest."""
        verify_or_warn(self.directory / str(step), "checkpoint")
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                                             DATA_ITEM: ocp.args.JsonRestore()}))
        return restored[STATE_ITEM], restored[DATA_ITEM]

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """The newest checkpoint that restores; a damaged or unreadable one is skipped with a warning naming it, and
        moved aside once an older one restores. None when there are no checkpoints; an error when there are some but
        none restores, because starting afresh would overwrite them (they are usually from another config or code
        version, not damaged)."""
        steps = self.all_steps()
        skipped = []
        for step in reversed(steps):
            try:
                restored = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 (any failure to read a checkpoint means: try an older one)
                logger.warning("checkpoint %s/%d is unreadable (%s: %s); trying an older one",
                               self.directory, step, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                skipped.append(step)
                continue
            self._move_aside(skipped)
            return restored
        if steps:
            raise UnrestorableCheckpointsError(
                f"none of the {len(steps)} checkpoints in {self.directory} (steps {steps}) restores into this run's "
                "train state (see the warnings above): they were written by another config or code version, or are "
                "damaged. Use a new workdir, or move the checkpoints away to start this one afresh")
        return None

    def _move_aside(self, steps: list[int]) -> None:
        """Renames checkpoints newer than the one resumed from, which the run will save again (Orbax refuses to
        overwrite a step); kept rather than deleted, for inspection."""
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                target = self.directory / f"{step}{UNREADABLE_SUFFIX}"
                for n in itertools.count(1):
                    if not target.exists():
                        break
                    target = self.directory / f"{step}{UNREADABLE_SUFFIX}.{n}"
                (self.directory / str(step)).rename(target)
                logger.warning("moved the unreadable checkpoint %s/%d to %s", self.directory, step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpointing: unreadable checkpoints moved aside")
        self._manager.reload()

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
    `params/` checkpoint with a manifest of its files (`load_bundle_params` checks it). Written to a temporary
    sibling and renamed, so a directory that exists is complete; with `overwrite`, an existing bundle is replaced
    only once the new one is complete."""
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; choose a new output directory or remove it")
    temporary = directory.with_name(f".{directory.name}.incomplete")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    try:
        # Written by the calling process alone (process 0 of a multi-process run): Orbax's default options would
        # wait at a barrier for every process.
        this_process = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                          active_processes={jax.process_index()})
        checkpointer = ocp.StandardCheckpointer(multiprocessing_options=this_process)
        checkpointer.save(temporary / BUNDLE_PARAMS, params)
        checkpointer.wait_until_finished()
        # The params only: metadata.json is plain JSON that a user may edit (e.g. the paths of a moved bundle).
        write_manifest(temporary / BUNDLE_PARAMS)
        (temporary / BUNDLE_METADATA).write_text(json.dumps(metadata, indent=2))
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)  # e.g. a full disk: free what the half-written bundle holds
        raise
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
    """Params of a bundle, restored into `abstract_params` (ShapeDtypeStructs, optionally with shardings); raises
    `CorruptCheckpointError` when the files differ from the bundle's manifest."""
    verify_or_warn(pathlib.Path(directory) / BUNDLE_PARAMS, "bundle")
    # Leaves without a sharding go to this process's first device. Left to itself Orbax would use the sharding the
    # bundle was written with, which names the writer's devices: a run on another topology (several processes)
    # fails with "Topology mismatch detected".
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_params = jax.tree.map(
        lambda x: x if getattr(x, "sharding", None) is not None else jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                                          sharding=local),
        abstract_params)
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
