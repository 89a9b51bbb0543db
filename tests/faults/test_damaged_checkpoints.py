"""Damaged checkpoints (a truncated file, a flipped byte, a deleted file, an emptied step directory): resuming skips
them with a warning naming them, falls back to the newest checkpoint that is intact, moves the damaged ones aside so
that the run can save those steps again, and never restores garbage; only checkpoints are damaged, the rest of a
workdir is not involved. A flipped byte in array data is the case Orbax alone reads back as wrong values. Loading a
prior for generation (Pipeline.load) checks the same manifests, and those of inference bundles."""

import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipgen_jax import checkpointing, pipeline, training
from faultlib import RUNS, assert_bitwise_equal, final_state

pytestmark = pytest.mark.faults


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {"truncate": _truncate, "flip": _flip, "delete": lambda path: path.unlink()}


def _largest_file(step_dir):
    """The largest file of a checkpoint: array data (the parameters)."""
    return max((path for path in step_dir.rglob("*") if path.is_file()), key=lambda path: path.stat().st_size)


def _state(scale: float):
    return {"params": {"w": jnp.arange(4096, dtype=jnp.float32) * scale, "b": jnp.full((3,), scale)},
            "step": jnp.asarray(int(scale), jnp.int32)}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _two_checkpoints(directory):
    checkpointer = checkpointing.Checkpointer(directory, async_save=False)
    for step in (1, 2):
        checkpointer.save(step, _state(step), {"next_index": step}, force=True)
    checkpointer.close()


def _restore_latest(directory):
    checkpointer = checkpointing.Checkpointer(directory, async_save=False)
    try:
        return checkpointer.restore_latest(_abstract(_state(0)))
    finally:
        checkpointer.close()


def _assert_falls_back_to_step_1(directory, caplog, names: str):
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
        state, data_state = _restore_latest(directory)
    assert data_state == {"next_index": 1}
    np.testing.assert_array_equal(state["params"]["w"], np.asarray(_state(1)["params"]["w"]))
    assert f"checkpoint {directory}/2 is unreadable" in caplog.text and names in caplog.text
    assert sorted(path.name for path in directory.iterdir()) == ["1", "2.unreadable"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "empty_step_directory"])
def test_a_damaged_newest_checkpoint_is_skipped_named_and_moved_aside(tmp_path, caplog, damage):
    _two_checkpoints(tmp_path)
    damaged = _largest_file(tmp_path / "2")
    if damage == "empty_step_directory":
        for child in (tmp_path / "2").iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        names = "2"
    else:
        DAMAGE[damage](damaged)
        names = str(damaged)
    _assert_falls_back_to_step_1(tmp_path, caplog, names)

    # The run resumed from step 1 reaches step 2 again and saves it: the moved-aside directory is not in the way.
    checkpointer = checkpointing.Checkpointer(tmp_path, async_save=False)
    checkpointer.save(2, _state(2), {"next_index": 2}, force=True)
    state, data_state = checkpointer.restore_latest(_abstract(_state(0)))
    checkpointer.close()
    assert data_state == {"next_index": 2}
    np.testing.assert_array_equal(state["params"]["w"], np.asarray(_state(2)["params"]["w"]))


def test_the_only_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    _two_checkpoints(tmp_path)
    shutil.rmtree(tmp_path / "1")
    _flip(_largest_file(tmp_path / "2"))
    with pytest.raises(checkpointing.UnrestorableCheckpointsError, match=r"none of the 1 checkpoints .* damaged"):
        _restore_latest(tmp_path)
    assert (tmp_path / "2").is_dir()  # nothing is moved or deleted when nothing restores


def test_a_checkpoint_without_manifest_restores_unverified_with_a_warning(tmp_path, caplog):
    """Checkpoints written before manifests existed still resume."""
    _two_checkpoints(tmp_path)
    (tmp_path / "2" / checkpointing.MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
        _, data_state = _restore_latest(tmp_path)
    assert data_state == {"next_index": 2}
    assert f"{tmp_path}/2 has no {checkpointing.MANIFEST}" in caplog.text


def test_every_file_of_a_checkpoint_damaged_every_way(tmp_path):
    """Whatever file of the newest checkpoint is truncated, flipped or deleted, the restored state is exactly one
    of the two that were saved (a few seconds: cheap enough for every run)."""
    _two_checkpoints(tmp_path / "pristine")
    files = sorted(path.relative_to(tmp_path / "pristine" / "2")
                   for path in (tmp_path / "pristine" / "2").rglob("*") if path.is_file())
    assert len(files) > 10
    for name in files:
        for damage, apply in DAMAGE.items():
            directory = tmp_path / f"{damage}-{str(name).replace('/', '-')}"
            shutil.copytree(tmp_path / "pristine", directory)
            apply(directory / "2" / name)
            state, data_state = _restore_latest(directory)
            step = data_state["next_index"]
            np.testing.assert_array_equal(state["params"]["w"], np.asarray(_state(step)["params"]["w"]),
                                          err_msg=f"{damage} {name}")
            np.testing.assert_array_equal(state["params"]["b"], np.asarray(_state(step)["params"]["b"]),
                                          err_msg=f"{damage} {name}")


def test_training_resumes_past_a_flipped_byte_and_ends_as_if_nothing_happened(vqgan_reference, shapes_data_dir,
                                                                              tmp_path, caplog):
    """A finished tiny VQGAN run whose newest checkpoint (step 8) has one flipped bit in its largest array file:
    the rerun restores step 6 instead, trains steps 7 and 8 again and ends with the uninterrupted run's state."""
    reference_dir, expected = vqgan_reference
    run, workdir = RUNS["vqgan"], tmp_path / "run"
    shutil.copytree(reference_dir, workdir)
    shutil.rmtree(workdir / checkpointing.EXPORT_DIR)
    damaged = _largest_file(workdir / "checkpoints" / str(run.steps))
    _flip(damaged)
    config = training.load_config(run.config)
    config.train.update(run.train)
    config.data.data_dir = str(shapes_data_dir)
    with caplog.at_level(logging.INFO):
        training.train(config, str(workdir))
    assert f"{damaged} does not match the SHA-256 it was written with" in caplog.text
    assert f"resumed from {workdir / 'checkpoints'} at step {run.steps - 2}" in caplog.text
    assert (workdir / "checkpoints" / f"{run.steps}.unreadable").is_dir()
    assert_bitwise_equal(final_state(workdir, run), expected)
    assert checkpointing.is_bundle(workdir / checkpointing.EXPORT_DIR)


@pytest.mark.parametrize("damaged", ["newest_checkpoint", "export", "bundle"])
def test_loading_a_prior_checks_its_files_as_resuming_does(damaged, prior_reference, tmp_path, caplog):
    """A flipped bit in the largest file of a finished tiny prior run: Pipeline.load of the workdir skips a damaged
    newest checkpoint (the export removed, so that the checkpoint is what loads) or a damaged export with a warning
    naming the file, and loads the newest intact one, without moving anything; a damaged bundle named directly has
    nothing to fall back to and is refused."""
    reference_dir, _ = prior_reference
    run, workdir = RUNS["prior"], tmp_path / "run"
    shutil.copytree(reference_dir, workdir)
    export = workdir / checkpointing.EXPORT_DIR
    if damaged == "newest_checkpoint":
        shutil.rmtree(export)
        flipped, loads_step = _largest_file(workdir / "checkpoints" / str(run.steps)), run.steps - 2
    else:
        flipped, loads_step = _largest_file(export / checkpointing.BUNDLE_PARAMS), run.steps
    _flip(flipped)
    if damaged == "bundle":
        with pytest.raises(checkpointing.CorruptCheckpointError, match=f"{flipped} does not match the SHA-256"):
            pipeline.Pipeline.load(export)
        return
    with caplog.at_level(logging.WARNING):
        pipe = pipeline.Pipeline.load(workdir)
    assert f"{flipped} does not match the SHA-256 it was written with; trying an older prior" in caplog.text
    assert pipe.metadata["step"] == loads_step
    expected = pipeline._restore_checkpoint_params(reference_dir, loads_step, pipe.prior)  # the pristine files
    assert_bitwise_equal([np.asarray(leaf) for leaf in jax.tree.leaves(pipe.prior_params)],
                         [np.asarray(leaf) for leaf in jax.tree.leaves(expected)])
    assert flipped.is_file() and not list((workdir / "checkpoints").glob(f"*{checkpointing.UNREADABLE_SUFFIX}"))
