"""Precompute: the TFDS dataset it writes (values, features, metadata), resuming after a kill or an exception bit
for bit, two processes, augmented views of a folder with a corrupt image, and the refusals."""

import json
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from clipgen_jax import checkpointing, precompute, training
from clipgen_jax.data import images, precomputed
from clipgen_jax.models import clip

from helpers import assert_same_dataset, dataset_files, dataset_records, tiny_models

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random VQGAN bundle (32 px, 16 x 16 grid, 64 codes) and a tiny random CLIP (16-d), on disk."""
    root = tmp_path_factory.mktemp("models")
    tiny_models(root)
    return root


def _config(models, shapes_data_dir, out):
    config = training.load_config("configs/precompute.py:tiny")
    config.vqgan = str(models / "vqgan")
    config.clip = str(models / "clip")
    config.data.data_dir = str(shapes_data_dir)
    config.output.data_dir = str(out)
    return config


@pytest.fixture(scope="module")
def reference(models, shapes_data_dir, tmp_path_factory):
    """An uninterrupted single-process run of the tiny preset: (config, dataset directory)."""
    config = _config(models, shapes_data_dir, tmp_path_factory.mktemp("reference"))
    return config, precompute.precompute(config)


def test_writes_a_tfds_dataset_of_tokens_embeddings_captions_and_labels(reference, models, shapes_data_dir):
    config, directory = reference
    builder = tfds.builder_from_directory(str(directory))
    assert builder.info.file_format.value == "array_record"
    assert builder.info.splits["validation"].shard_lengths == [40, 40, 40, 8]
    assert builder.info.splits["heldout"].shard_lengths == [40, 40, 16]
    features = builder.info.features
    assert features["tokens"].shape == (256,) and features["tokens"].np_dtype == np.int16
    assert features["clip_image_embedding"].shape == (16,) and features["clip_image_embedding"].np_dtype == np.float32

    source = builder.as_data_source("validation")
    records = [source[i] for i in range(40)]
    tokens_NL = np.stack([r["tokens"] for r in records])
    image_NL = np.stack([r["clip_image_embedding"] for r in records])
    text_NL = np.stack([r["clip_text_embedding"] for r in records])
    assert tokens_NL.dtype == np.int16 and image_NL.dtype == np.float32
    assert [r["image_index"] for r in records] == list(range(40)) and {r["view"] for r in records} == {0}

    # The same numbers straight from the models, on the same images (the tiny Shapes validation split, in order).
    data_config = images.default_data_config()
    data_config.update(source="shapes", name="tiny", data_dir=str(shapes_data_dir), image_size=32)
    batch = next(images.make_batch_iterator(data_config, split="validation", batch_size=40, seed=0, shuffle=False,
                                            num_epochs=1))
    model, params, bundle_metadata = checkpointing.load_vqgan(models / "vqgan")
    expected_tokens = np.asarray(model.apply({"params": params}, batch["image"][:32], method=model.encode))
    np.testing.assert_array_equal(tokens_NL[:32], expected_tokens.reshape(32, -1))
    assert len(np.unique(tokens_NL)) > 1
    loaded = clip.load(models / "clip")
    np.testing.assert_allclose(image_NL, loaded.embed_images(batch["image"]), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(image_NL, axis=-1), 1.0, atol=1e-5)
    assert [r["caption"].decode() for r in records] == list(batch["caption"])
    np.testing.assert_allclose(text_NL, loaded.embed_texts(list(batch["caption"])), atol=2e-5)
    for name in ("shape", "colour", "size", "position", "background"):
        np.testing.assert_array_equal([r[name] for r in records], batch[name])

    metadata = precomputed.load_metadata(config.output.data_dir, "tiny")
    assert metadata["vqgan"] == precomputed.vqgan_identity(models / "vqgan", params, bundle_metadata["model"])
    assert metadata["clip"] == precomputed.clip_identity(loaded) and metadata["clip"]["embed_dim"] == 16
    assert (metadata["image_size"], metadata["grid_shape"], metadata["codebook_size"]) == (32, [16, 16], 64)
    assert metadata["views_per_image"] == {"validation": 1, "heldout": 1}
    assert metadata["num_skipped"] == {"validation": 0, "heldout": 0} and metadata["token_dtype"] == "int16"


# Precomputes the tiny preset with the config fields in argv[1] (JSON) and SIGKILLs itself after the third shard.
_KILLED_RUN = """
import json, os, signal, sys
from clipgen_jax import precompute, training
config = training.load_config("configs/precompute.py:tiny")
config.update(json.loads(sys.argv[1]))
written = []
def kill_after_three(split, shard):
    written.append((split, shard))
    if len(written) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
precompute.precompute(config, on_shard_written=kill_after_three)
"""


@pytest.mark.faults
def test_resume_after_a_kill_gives_the_uninterrupted_dataset(reference, models, shapes_data_dir, tmp_path):
    """The first shards come from a process killed with SIGKILL, the rest from a rerun (another process): the
    result equals the uninterrupted run byte for byte."""
    _, expected = reference
    fields = {"vqgan": str(models / "vqgan"), "clip": str(models / "clip"),
              "data": {"data_dir": str(shapes_data_dir)}, "output": {"data_dir": str(tmp_path)}}
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, json.dumps(fields)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    directory = precomputed.dataset_dir(tmp_path, "tiny")
    assert sorted(path.name for path in directory.glob("*.array_record-*")) == [
        f"tiny-validation.array_record-0000{k}-of-00004" for k in range(3)]
    assert not (directory / precomputed.INFO_FILE).exists()
    with pytest.raises(FileNotFoundError, match="is unfinished"):
        precomputed.load_builder(tmp_path, "tiny")
    # A kill in the middle of the fourth shard leaves its temporary file behind, half written.
    fourth = precompute.shard_path(directory, "tiny", "validation", 3, 4)
    fourth.with_name(f".{fourth.name}.incomplete").write_bytes(b"half a shard")

    resumed = []
    config = _config(models, shapes_data_dir, tmp_path)
    precompute.precompute(config, on_shard_written=lambda split, shard: resumed.append((split, shard)))
    assert resumed == [("validation", 3), ("heldout", 0), ("heldout", 1), ("heldout", 2)]
    assert_same_dataset(directory, expected)


@pytest.mark.faults
def test_an_exception_mid_run_also_resumes(reference, models, shapes_data_dir, tmp_path):
    _, expected = reference
    config = _config(models, shapes_data_dir, tmp_path)

    def fail_after_five_shards(split, shard):
        if (split, shard) == ("heldout", 0):
            raise KeyboardInterrupt("injected")

    with pytest.raises(KeyboardInterrupt):
        precompute.precompute(config, on_shard_written=fail_after_five_shards)
    precompute.precompute(config)
    assert_same_dataset(precomputed.dataset_dir(tmp_path, "tiny"), expected)


def test_a_complete_dataset_is_left_alone_and_a_different_one_refused(reference, caplog):
    config, directory = reference
    before = {path.name: path.stat().st_mtime_ns for path in directory.iterdir()}
    with caplog.at_level("INFO", logger="clipgen_jax.precompute"):
        assert precompute.precompute(config) == directory
    assert "already complete" in caplog.text
    assert {path.name: path.stat().st_mtime_ns for path in directory.iterdir()} == before

    different = config.copy_and_resolve_references()
    different.seed = 1
    with pytest.raises(precompute.PrecomputeError, match=r"different dataset \(seed \(stored 0, now 1\)\)"):
        precompute.precompute(different)


def test_two_processes_write_the_same_dataset(reference, models, shapes_data_dir, tmp_path):
    _, expected = reference
    config = _config(models, shapes_data_dir, tmp_path)
    # Process 0 writes shards 0 and 2 of each split, then finds process 1's missing.
    with pytest.raises(precompute.PrecomputeError, match="shards of validation are missing"):
        precompute.precompute(config, process_index=0, process_count=2)
    shards = []
    precompute.precompute(config, process_index=1, process_count=2,
                          on_shard_written=lambda split, shard: shards.append((split, shard)))
    assert shards == [("validation", 1), ("validation", 3), ("heldout", 1)]
    precompute.precompute(config, process_index=0, process_count=2)
    assert_same_dataset(precomputed.dataset_dir(tmp_path, "tiny"), expected)


def _write_folder(root: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    for index, (width, height) in enumerate([(48, 32), (32, 64), (56, 40), (33, 47)]):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"image{index}.png")
        (root / f"image{index}.txt").write_text(f"picture number {index}\n")
    (root / "image4.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "image4.txt").write_text("a broken picture")


def test_folder_with_views_captions_and_a_corrupt_image(models, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    _write_folder(folder)
    config = training.load_config("configs/precompute.py:tiny")
    config.data.update(source="folder", folder=str(folder), validation_fraction=0.0)
    config.update(vqgan=str(models / "vqgan"), clip=str(models / "clip"), splits=("train",), views=3,
                  captions="sidecar", batch_size=4, shard_size=3)
    config.output.data_dir = str(tmp_path / "out")
    directory = precompute.precompute(config)
    metadata = precomputed.load_metadata(tmp_path / "out", "tiny")
    assert metadata["num_skipped"] == {"train": 1} and metadata["num_skipped_total"] == 1
    assert metadata["views_per_image"] == {"train": 3} and metadata["labels"] == []
    source = tfds.builder_from_directory(str(directory)).as_data_source("train")
    records = [source[i] for i in range(len(source))]
    assert [(r["image_index"], r["view"]) for r in records] == [(i, v) for i in range(4) for v in range(3)]
    assert {r["caption"].decode() for r in records} == {f"picture number {i}" for i in range(4)}

    # View 0 is the center crop: the same embedding as the plain pipeline's image; views 1, 2 are other crops/flips.
    data_config = images.default_data_config()
    data_config.update(source="folder", folder=str(folder), validation_fraction=0.0, image_size=32)
    batch = next(images.make_batch_iterator(data_config, split="train", batch_size=8, seed=0, shuffle=False,
                                            num_epochs=1))
    loaded = clip.load(models / "clip")
    view0 = np.stack([r["clip_image_embedding"] for r in records if r["view"] == 0])
    np.testing.assert_allclose(view0, loaded.embed_images(batch["image"]), atol=2e-5)
    others = np.stack([r["clip_image_embedding"] for r in records if r["view"] > 0])
    assert np.all(np.any(others.reshape(4, 2, -1) != view0[:, None], axis=-1))
    text_IVD = np.stack([r["clip_text_embedding"] for r in records]).reshape(4, 3, -1)
    np.testing.assert_array_equal(text_IVD, np.repeat(text_IVD[:, :1], 3, axis=1))

    again = config.copy_and_resolve_references()
    again.output.data_dir = str(tmp_path / "again")
    precompute.precompute(again)
    again_directory = precomputed.dataset_dir(tmp_path / "again", "tiny")
    for name in dataset_files(directory):
        if ".array_record-" in name:
            assert dataset_records(directory / name) == dataset_records(again_directory / name)


@pytest.mark.parametrize("change, message", [
    (dict(views=2), r"Shapes refuses augmented views \(views=2\)"),
    (dict(vqgan=None), "config.vqgan is required"),
    (dict(embedding_dtype="bfloat16"), "embedding_dtype='bfloat16' is not one of"),
    (dict(batch_size=0), "batch_size=0 must be a positive multiple"),
    (dict(output=dict(name="Not-A-Name")), "is not a TFDS dataset name"),
    (dict(data=dict(image_size=64)), r"data.image_size=64 but the VQGAN .* works at 32 px"),
    (dict(captions="sidecar"), "captions='sidecar' reads .txt files beside images"),
    (dict(captions="title"), r"captions='title' is not a text feature of tiny \(its text features: \['caption'\]\)"),
])
def test_bad_input_is_refused_in_one_line(models, shapes_data_dir, tmp_path, change, message):
    config = _config(models, shapes_data_dir, tmp_path)
    config.update(change)
    with pytest.raises(precompute.PrecomputeError, match=message) as error:
        precompute.precompute(config)
    assert "\n" not in str(error.value)


def test_missing_models_and_foreign_output_directories(models, shapes_data_dir, tmp_path):
    config = _config(models, shapes_data_dir, tmp_path)
    config.vqgan = str(tmp_path / "no_vqgan")
    with pytest.raises(FileNotFoundError, match="holds no vqgan bundle"):
        precompute.precompute(config)
    config = _config(models, shapes_data_dir, tmp_path)
    directory = precomputed.dataset_dir(tmp_path, "tiny")
    directory.mkdir(parents=True)
    (directory / "something_else.txt").write_text("not ours")
    with pytest.raises(precompute.PrecomputeError, match="is not empty and holds no precompute_plan.json"):
        precompute.precompute(config)


def test_token_dtype_fits_the_codebook():
    assert precompute.token_dtype(64) == np.int16
    assert precompute.token_dtype(32768) == np.int16
    assert precompute.token_dtype(32769) == np.int32
