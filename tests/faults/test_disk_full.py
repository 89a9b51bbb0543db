"""A full disk (OSError ENOSPC injected where the files are written; the tests run as root, whom permissions do not
stop) and an unusable workdir: a one-line error, nothing half-written presented as complete (checkpoints, exported
bundles, precompute shards and dataset_info.json), and a rerun after the fault completes the work."""

import errno

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from clipgen_jax import checkpointing, precompute
from clipgen_jax.data import precomputed
from faultlib import (assert_one_line_error, checkpoint_steps, precompute_args, precompute_config, run_tool,
                      train_args)

pytestmark = pytest.mark.faults

AUTOENCODER = "configs/autoencoder.py:tiny"  # 20 steps, a checkpoint every 5


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device (injected)")


def test_training_stops_with_one_line_when_a_checkpoint_cannot_be_written(shapes_data_dir, tmp_path):
    args = train_args(tmp_path, shapes_data_dir, config=AUTOENCODER, eval_every=0)
    # The second save (step 10) fails once all its arrays are written, as a disk that fills up during a save does.
    failed = run_tool("tools/train.py", *args, fault={"enospc": "clipgen_jax.checkpointing:write_manifest", "after": 1})
    # Orbax logs the failed save with its traceback; the tool's own last word is one line.
    assert_one_line_error(failed, r"No space left on device.*; fix that, then run the same command again \(it "
                                  r"resumes from the last complete checkpoint\)", quiet=False)
    assert checkpoint_steps(tmp_path) == [5]  # step 10 never became a checkpoint: a rerun resumes from 5
    assert {path.name for path in (tmp_path / "checkpoints").iterdir()} == {"5", "10.orbax-checkpoint-tmp"}


def test_an_unusable_workdir_is_a_one_line_error(shapes_data_dir, tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    result = run_tool("tools/train.py", *train_args(tmp_path / "a_file" / "run", shapes_data_dir, config=AUTOENCODER))
    assert_one_line_error(result, r"Not a directory: .*a_file")


def test_a_bundle_that_cannot_be_written_leaves_nothing_and_keeps_the_previous_one(tmp_path, monkeypatch):
    params = {"w": jnp.arange(6.0)}
    bundle = checkpointing.save_bundle(tmp_path / "export", params, {"kind": "test", "version": 1})
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", _disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        checkpointing.save_bundle(tmp_path / "export", {"w": jnp.zeros(6)}, {"kind": "test", "version": 2},
                                  overwrite=True)
    with pytest.raises(OSError, match="No space left on device"):
        checkpointing.save_bundle(tmp_path / "new_export", params, {"kind": "test"})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]  # no half-written bundle, hidden or not
    assert checkpointing.load_bundle_metadata(bundle) == {"kind": "test", "version": 1}
    monkeypatch.undo()
    np.testing.assert_array_equal(checkpointing.load_bundle_params(bundle, params)["w"], np.arange(6.0))


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / f"{index:02d}.png")
    return folder


def _shards(directory):
    """Shards under their final names (a shard being written has a hidden temporary one)."""
    return sorted(path.name for path in directory.glob("[!.]*.array_record-*"))


def test_precompute_that_runs_out_of_space_is_unfinished_until_rerun(models_dir, image_folder, tmp_path, monkeypatch):
    config = precompute_config(models_dir, tmp_path / "out", folder=image_folder)  # 12 images: shards of 8 and 4
    directory = precomputed.dataset_dir(tmp_path / "out", config.output.name)
    shards = ["tiny-train.array_record-00000-of-00002", "tiny-train.array_record-00001-of-00002"]

    # The disk fills up while the second shard is written (the first batch write of this run succeeds).
    result = run_tool("tools/precompute.py", *precompute_args(config),
                      fault={"enospc": "clipgen_jax.precompute:_write_batch", "after": 1})
    assert_one_line_error(result, r"No space left on device.*; fix that, then run the same command again")
    assert _shards(directory) == shards[:1]
    assert not (directory / precomputed.INFO_FILE).exists()

    monkeypatch.setattr(tfds.core.DatasetInfo, "write_to_directory", _disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        precompute.precompute(config)  # the second shard is written, then the metadata fails
    assert _shards(directory) == shards
    assert not (directory / precomputed.INFO_FILE).exists()
    with pytest.raises(FileNotFoundError, match="is unfinished"):
        precomputed.load_builder(tmp_path / "out", config.output.name)

    monkeypatch.undo()
    precompute.precompute(config)
    metadata = precomputed.load_metadata(tmp_path / "out", config.output.name)
    assert metadata["num_examples"] == {"train": 12} and metadata["num_skipped"] == {"train": 0}
    assert [path.name for path in directory.iterdir() if path.name.startswith(".")] == []  # no temporary left
