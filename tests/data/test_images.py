"""Tests for clipgen_jax.data.images: decoding every image mode, resize/crop/flip, the three sources, sharding,
skipping corrupt files, and bitwise resume from the iterator state."""

import io
import json
import logging
import pathlib
import shutil
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from clipgen_jax.data import images

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
NO_LIMIT = 10**9


def encode(image: Image.Image, image_format: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save_args)
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    image = images.decode_image(data, max_image_pixels=NO_LIMIT)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def gradient_image(width: int, height: int) -> Image.Image:
    """Gray image whose column x has value 10 * x, so crops are easy to recognise."""
    return Image.fromarray(np.tile((10 * np.arange(width, dtype=np.uint8))[None, :], (height, 1)), mode="L")


def folder_config(folder: pathlib.Path, **overrides) -> ml_collections.ConfigDict:
    """A folder source over every image (no validation part) unless `overrides` set validation_fraction."""
    config = images.default_data_config()
    config.source = "folder"
    config.folder = str(folder)
    config.validation_fraction = 0.0
    config.update(overrides)
    return config


def take(iterator: images.ImageBatchIterator, count: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(expected: list[dict], actual: list[dict]) -> None:
    assert len(expected) == len(actual)
    for expected_batch, actual_batch in zip(expected, actual):
        assert expected_batch.keys() == actual_batch.keys()
        for key in expected_batch:
            np.testing.assert_array_equal(expected_batch[key], actual_batch[key])


# ---------------------------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("mode, value, expected", [
    ("L", 77, (77, 77, 77)),
    ("LA", (77, 255), (77, 77, 77)),
    ("LA", (77, 0), WHITE),
    ("RGB", (10, 20, 30), (10, 20, 30)),
    ("RGBA", (10, 20, 30, 0), WHITE),
    ("RGBA", (255, 0, 0, 128), (255, 127, 127)),
])
def test_decode_modes_with_and_without_alpha(mode, value, expected):
    decoded = decode(encode(Image.new(mode, (5, 3), value), "PNG"))
    assert decoded.shape == (3, 5, 3)
    np.testing.assert_allclose(decoded, np.broadcast_to(expected, decoded.shape), atol=1)


def palette_image() -> Image.Image:
    image = Image.new("P", (4, 2), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.putpixel((3, 1), 1)
    return image


def test_decode_palette():
    decoded = decode(encode(palette_image(), "PNG"))
    assert tuple(decoded[0, 0]) == (10, 20, 30)
    assert tuple(decoded[1, 3]) == (200, 100, 50)


def test_decode_palette_with_transparency_composites_on_white():
    decoded = decode(encode(palette_image(), "PNG", transparency=1))
    assert tuple(decoded[0, 0]) == (10, 20, 30)
    assert tuple(decoded[1, 3]) == WHITE


def test_decode_cmyk_jpeg():
    decoded = decode(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    np.testing.assert_allclose(decoded, np.broadcast_to(RED, decoded.shape), atol=8)


def test_decode_16_bit_png_scales_instead_of_clipping():
    levels = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(levels), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    np.testing.assert_array_equal(decode(data)[0, :, 0], [0, 100, 255])


@pytest.mark.parametrize("image_format, save_args", [("GIF", {}), ("WEBP", {"lossless": True})])
def test_decode_animation_takes_first_frame(image_format, save_args):
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    data = encode(frames[0], image_format, save_all=True, append_images=frames[1:], duration=100, **save_args)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    np.testing.assert_allclose(decode(data), np.broadcast_to(RED, (8, 8, 3)), atol=2)


def test_decode_applies_exif_orientation():
    stored = Image.new("RGB", (32, 16), RED)
    stored.paste(BLUE, (16, 0, 32, 16))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    decoded = decode(encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    assert decoded.shape == (32, 16, 3)  # portrait once rotated
    np.testing.assert_allclose(decoded[8, 8], RED, atol=10)  # the left edge is now the top
    np.testing.assert_allclose(decoded[24, 8], BLUE, atol=10)


def test_decode_array():
    gray = np.full((3, 4, 1), 9, dtype=np.uint8)
    decoded = images.decode_image(gray, max_image_pixels=NO_LIMIT)
    np.testing.assert_array_equal(np.asarray(decoded), np.full((3, 4, 3), 9))


def test_decode_refuses_too_many_pixels_from_the_header():
    with pytest.raises(images.ImageTooLargeError, match="max_image_pixels=99"):
        images.decode_image(encode(Image.new("RGB", (10, 10)), "PNG"), max_image_pixels=99)


# ---------------------------------------------------------------------------------------------------------------
# Resize, crop, flip


def test_center_crop_at_native_size_is_exact():
    cropped = images.resize_and_crop(gradient_image(8, 4), 4)
    np.testing.assert_array_equal(np.asarray(cropped)[0], [20, 30, 40, 50])


def test_resize_scales_shorter_side_then_crops():
    image = noise_image(40, 20, seed=0)
    full = np.asarray(image.resize((20, 10), Image.Resampling.BICUBIC)).astype(int)
    np.testing.assert_allclose(np.asarray(images.resize_and_crop(image, 10)), full[:, 5:15], atol=1)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        left = int(np.random.default_rng(seed).integers(0, 11))
        np.testing.assert_allclose(np.asarray(images.resize_and_crop(image, 10, rng)), full[:, left:left + 10], atol=1)


def test_random_crop_picks_different_windows():
    image = gradient_image(8, 4)
    first_columns = {np.asarray(images.resize_and_crop(image, 4, np.random.default_rng(seed)))[0, 0]
                     for seed in range(30)}
    assert first_columns == {0, 10, 20, 30, 40}


def test_to_model_range():
    image = Image.fromarray(np.array([[[0, 255, 128]]], dtype=np.uint8))
    values = images.to_model_range(image)
    assert values.dtype == np.float32
    np.testing.assert_allclose(values[0, 0], [-1.0, 1.0, 128 / 127.5 - 1.0], atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Folder source and the pipeline


@pytest.fixture
def photo_folder(tmp_path) -> pathlib.Path:
    """Ten readable images of mixed sizes, modes and formats, in nested folders and mixed-case suffixes."""
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    for index in range(10):
        image = noise_image(20 + 3 * index, 30 - index, seed=index)
        name = ["a{}.png", "nested/b{}.JPG", "nested/deeper/c{}.webp"][index % 3].format(index)
        image_format = {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP"}[pathlib.Path(name).suffix.lower()]
        (tmp_path / name).write_bytes(encode(image.convert("RGBA" if index == 6 else "RGB"), image_format))
    (tmp_path / "notes.txt").write_text("not listed")
    return tmp_path


def test_folder_source_lists_images_recursively_in_sorted_order(photo_folder):
    source = images.FolderSource(photo_folder)
    assert len(source) == 10 and source.paths == sorted(source.paths)
    assert {pathlib.Path(path).parent.name for path in source.paths} == {photo_folder.name, "nested", "deeper"}
    assert source[0]["image"] == pathlib.Path(source.paths[0]).read_bytes()


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no .jpg/.jpeg/.png/.webp files under"):
        images.FolderSource(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        images.FolderSource(tmp_path / "missing")
    with pytest.raises(ValueError, match="needs data.folder"):
        config = folder_config(tmp_path)
        config.folder = None
        images.make_source(config, "train")


def test_folder_parts_split_by_path_hash_disjointly_and_stably(tmp_path):
    png = encode(Image.new("RGB", (2, 2), RED), "PNG")
    for index in range(300):
        (tmp_path / "sub" if index % 2 else tmp_path).mkdir(exist_ok=True)
        (tmp_path / ("sub" if index % 2 else ".") / f"{index}.png").write_bytes(png)
    config = folder_config(tmp_path, validation_fraction=0.1)
    train, validation = (set(images.make_source(config, split).paths) for split in images.FOLDER_PARTS)
    assert not train & validation and len(train | validation) == 300
    assert 15 <= len(validation) <= 45  # 30 expected; the hash fixes the draw, so this is exact on every machine
    assert validation == {str(tmp_path / p) for p in (pathlib.Path(p).relative_to(tmp_path).as_posix()
                                                      for p in train | validation)
                          if images.in_validation_part(p, 0.1)}
    # The part depends on the path under the folder, not on where the folder is or what else is in it.
    moved = tmp_path.parent / "moved"
    shutil.copytree(tmp_path, moved)
    (moved / "300.png").write_bytes(png)
    moved_validation = set(images.make_source(folder_config(moved, validation_fraction=0.1), "validation").paths)
    assert {p.replace(str(moved), str(tmp_path)) for p in moved_validation} - {str(tmp_path / "300.png")} == validation
    # A larger fraction only adds files to the validation part.
    assert validation < set(images.make_source(folder_config(tmp_path, validation_fraction=0.3), "validation").paths)
    assert set(images.make_source(folder_config(tmp_path), "train").paths) == train | validation


def test_folder_parts_are_named_and_bad_ones_refused(tmp_path):
    Image.new("RGB", (2, 2), RED).save(tmp_path / "only.png")
    config = folder_config(tmp_path, validation_fraction=0.1)
    assert images.describe(config, "validation") == f"folder:{tmp_path} (validation part, 10%)"
    assert images.describe(config, "train") == f"folder:{tmp_path} (training part, 90%)"
    assert images.describe(folder_config(tmp_path), "train") == (
        f"folder:{tmp_path} (every image: data.validation_fraction=0)")
    assert images.default_data_config().validation_fraction == 0.1
    with pytest.raises(ValueError, match=r"an image folder has the parts \('train', 'validation'\).*not split 'heldout'"):
        images.make_source(config, "heldout")
    with pytest.raises(ValueError, match="the validation part of .* is empty"):
        images.make_source(folder_config(tmp_path), "validation")
    with pytest.raises(ValueError, match=r"validation_fraction=1.0 must be in \[0, 1\)"):
        images.make_source(folder_config(tmp_path, validation_fraction=1.0), "train")
    assert images.recorded_validation_fraction({"source": "folder", "folder": "x"}) == 0.0


def test_batches_have_the_promised_shape_and_range(photo_folder):
    config = folder_config(photo_folder, image_size=16, crop="random", flip=True)
    batch = next(images.make_batch_iterator(config, split="train", batch_size=4, seed=0))
    assert batch.keys() == {"image"}
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_pipeline_center_crop_gives_known_pixels(tmp_path):
    (tmp_path / "gradient.png").write_bytes(encode(gradient_image(8, 4), "PNG"))
    config = folder_config(tmp_path, image_size=4)
    batch = next(images.make_batch_iterator(config, split="train", batch_size=1, seed=0, shuffle=False))
    expected = np.array([20, 30, 40, 50]) / 127.5 - 1.0
    np.testing.assert_allclose(batch["image"][0], np.broadcast_to(expected[None, :, None], (4, 4, 3)), atol=1e-6)


def test_flip_mirrors_about_half_of_the_records(tmp_path):
    (tmp_path / "gradient.png").write_bytes(encode(gradient_image(4, 4), "PNG"))
    config = folder_config(tmp_path, image_size=4, flip=True)
    batch = next(images.make_batch_iterator(config, split="train", batch_size=40, seed=0))
    first_columns = batch["image"][:, 0, 0, 0]
    original, mirrored = -1.0, 30 / 127.5 - 1.0
    assert np.all(np.isclose(first_columns, original) | np.isclose(first_columns, mirrored))
    assert 10 <= np.isclose(first_columns, mirrored).sum() <= 30
    flipped = batch["image"][np.isclose(first_columns, mirrored)][0]
    np.testing.assert_array_equal(flipped, batch["image"][np.isclose(first_columns, original)][0][:, ::-1])


def test_same_seed_same_batches_other_seed_other_batches(photo_folder):
    config = folder_config(photo_folder, image_size=8, crop="random", flip=True)

    def first_batches(seed):
        return take(images.make_batch_iterator(config, split="train", batch_size=4, seed=seed), 3)

    assert_batches_equal(first_batches(0), first_batches(0))
    assert not np.array_equal(first_batches(0)[0]["image"], first_batches(1)[0]["image"])


def test_finite_epochs_end_with_a_partial_batch(photo_folder):
    iterator = images.make_batch_iterator(folder_config(photo_folder, image_size=8), split="train", batch_size=4,
                                          seed=0, num_epochs=2)
    assert [len(batch["image"]) for batch in iterator] == [4, 4, 4, 4, 4]
    iterator = images.make_batch_iterator(folder_config(photo_folder, image_size=8), split="train", batch_size=4,
                                          seed=0, num_epochs=1)
    assert [len(batch["image"]) for batch in iterator] == [4, 4, 2]


@pytest.fixture
def folder_with_corrupt_files(tmp_path) -> tuple[pathlib.Path, set[str]]:
    """Eight readable 20x20 images and five that must be skipped (with max_image_pixels=1000)."""
    for index in range(8):
        (tmp_path / f"good{index}.png").write_bytes(encode(noise_image(20, 20, seed=index), "PNG"))
    jpeg = encode(noise_image(64, 64, seed=99), "JPEG")
    png = encode(noise_image(64, 64, seed=98), "PNG")
    corrupt = {
        "truncated.jpg": jpeg[:len(jpeg) // 2],
        "truncated.png": png[:len(png) // 2],
        "empty.png": b"",
        "text.jpg": b"this is not an image\n",
        "huge.png": encode(noise_image(40, 40, seed=97), "PNG"),  # 1600 pixels
    }
    for name, data in corrupt.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path, set(corrupt)


@pytest.mark.faults
def test_corrupt_files_are_skipped_counted_and_named(folder_with_corrupt_files, caplog):
    folder, corrupt_names = folder_with_corrupt_files
    config = folder_config(folder, image_size=8, max_image_pixels=1000)
    iterator = images.make_batch_iterator(config, split="train", batch_size=3, seed=0, num_epochs=1)
    with caplog.at_level(logging.WARNING, logger=images.__name__):
        sizes = [len(batch["image"]) for batch in iterator]
    assert sizes == [3, 3, 2] and iterator.num_skipped == 5
    warned = " ".join(record.getMessage() for record in caplog.records)
    assert all(name in warned for name in corrupt_names)
    assert "good" not in warned


def test_skip_warnings_are_rate_limited(tmp_path, caplog):
    (tmp_path / "good.png").write_bytes(encode(noise_image(8, 8, seed=0), "PNG"))
    for index in range(30):
        (tmp_path / f"broken{index:02d}.jpg").write_bytes(b"")
    iterator = images.make_batch_iterator(folder_config(tmp_path), split="train", batch_size=1, seed=0,
                                          num_epochs=1)
    with caplog.at_level(logging.WARNING, logger=images.__name__):
        assert len(list(iterator)) == 1
    assert iterator.num_skipped == 30 and len(caplog.records) == 10


@pytest.mark.faults
def test_a_source_of_only_unreadable_files_raises_instead_of_spinning(tmp_path):
    for index in range(3):
        (tmp_path / f"broken{index}.jpg").write_bytes(b"")
    iterator = images.make_batch_iterator(folder_config(tmp_path), split="train", batch_size=2, seed=0)
    with pytest.raises(RuntimeError, match="in a row"):
        next(iterator)


@pytest.mark.faults
def test_resume_from_state_is_bitwise_identical_across_skipped_files(folder_with_corrupt_files):
    folder, _ = folder_with_corrupt_files
    config = folder_config(folder, image_size=8, crop="random", flip=True, max_image_pixels=1000)
    original = images.make_batch_iterator(config, split="train", batch_size=3, seed=7)
    take(original, 5)
    state = json.loads(json.dumps(original.get_state()))
    expected = take(original, 6)

    restored = images.make_batch_iterator(config, split="train", batch_size=3, seed=7)
    restored.set_state(state)
    assert restored.num_skipped == state["num_skipped"] > 0
    assert_batches_equal(expected, take(restored, 6))
    assert restored.get_state() == original.get_state()


def test_worker_processes_give_the_same_batches_and_resume_from_an_in_process_state(folder_with_corrupt_files):
    folder, _ = folder_with_corrupt_files
    config = folder_config(folder, image_size=8, crop="random", flip=True, max_image_pixels=1000)
    in_process = images.make_batch_iterator(config, split="train", batch_size=3, seed=3)
    take(in_process, 2)
    state = in_process.get_state()
    expected = take(in_process, 4)

    config.worker_count = 2
    with_workers = images.make_batch_iterator(config, split="train", batch_size=3, seed=3)
    try:
        with_workers.set_state(state)
        assert_batches_equal(expected, take(with_workers, 4))
        assert with_workers.get_state() == in_process.get_state()
    finally:
        with_workers.close()


# ---------------------------------------------------------------------------------------------------------------
# TFDS sources


class ImagesTestDataset(tfds.core.GeneratorBasedBuilder):
    """20 train / 7 validation records: a 12x10 PNG whose red channel is the record index, a caption and the index;
    split `with_corrupt` has 4 records, the second of which is not an image."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "caption": tfds.features.Text(),
            "index": tfds.features.Tensor(shape=(), dtype=np.int64),
        }))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(20), "validation": self._generate_examples(7),
                "with_corrupt": self._generate_examples(4, corrupt_index=1)}

    def _generate_examples(self, count, corrupt_index=None):
        for index in range(count):
            pixels = np.zeros((10, 12, 3), np.uint8)
            pixels[..., 0] = index
            data = b"not an image" if index == corrupt_index else encode(Image.fromarray(pixels), "PNG")
            # Encoded bytes: TFDS encodes numpy images with TensorFlow, which is not installed.
            yield index, {"image": io.BytesIO(data), "caption": f"record {index}", "index": index}


@pytest.fixture(scope="module")
def tfds_data_dir(tmp_path_factory) -> pathlib.Path:
    data_dir = tmp_path_factory.mktemp("tfds")
    tfds.disable_progress_bar()
    ImagesTestDataset(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def tfds_config(data_dir: pathlib.Path, **overrides) -> ml_collections.ConfigDict:
    config = images.default_data_config()
    config.update(source="tfds", name="images_test_dataset", data_dir=str(data_dir), image_size=6, **overrides)
    return config


def test_tfds_source_decodes_images_and_passes_features_through(tfds_data_dir):
    iterator = images.make_batch_iterator(tfds_config(tfds_data_dir), split="validation", batch_size=7, seed=0,
                                          shuffle=False, num_epochs=1)
    batch = next(iterator)
    assert batch.keys() == {"image", "caption", "index"}
    assert batch["image"].shape == (7, 6, 6, 3) and batch["index"].dtype == np.int64
    assert batch["caption"].dtype == object
    assert list(batch["caption"]) == [f"record {index}" for index in batch["index"]]
    np.testing.assert_allclose(batch["image"][:, 0, 0, 0], batch["index"] / 127.5 - 1.0, atol=1e-6)


def test_tfds_corrupt_record_is_skipped(tfds_data_dir):
    iterator = images.make_batch_iterator(tfds_config(tfds_data_dir), split="with_corrupt", batch_size=4, seed=0,
                                          num_epochs=1)
    assert sorted(next(iterator)["index"]) == [0, 2, 3] and iterator.num_skipped == 1


def test_process_shards_are_disjoint_and_cover_the_split(tfds_data_dir):
    shards = []
    for process_index in range(3):
        iterator = images.make_batch_iterator(tfds_config(tfds_data_dir), split="train", batch_size=4, seed=0,
                                              num_epochs=1, process_index=process_index, process_count=3)
        shards.append([int(index) for batch in iterator for index in batch["index"]])
    assert sorted(sum(shards, [])) == list(range(20))
    assert [len(shard) for shard in shards] == [7, 7, 6]


def test_missing_image_feature_is_a_clear_error(tfds_data_dir):
    with pytest.raises(KeyError, match="no feature 'picture'"):
        images.make_source(tfds_config(tfds_data_dir, image_key="picture"), "train")


def test_tfrecord_dataset_without_tensorflow_names_the_tf_extra(tfds_data_dir, tmp_path, monkeypatch):
    """TensorFlow cannot write tfrecord datasets here, so relabel a copy of the array_record one as tfrecord."""
    shutil.copytree(tfds_data_dir, tmp_path, dirs_exist_ok=True)
    info_path = tmp_path / "images_test_dataset" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import fails, as without TensorFlow installed
    with pytest.raises(RuntimeError, match=r"tfrecord.*pip install 'clipgen_jax\[tf\]'"):
        images.make_source(tfds_config(tmp_path), "train")


# ---------------------------------------------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize("source, name, overrides", [
    ("shapes", "tiny", {"flip": True}),
    ("shapes", "tiny", {"crop": "random"}),
    ("tfds", "clipgen_shapes/tiny", {"flip": True}),
    ("tfds", "clipgen_shapes", {"crop": "random"}),
])
def test_shapes_refuses_flip_and_random_crop(source, name, overrides):
    config = images.default_data_config()
    config.update(source=source, name=name, **overrides)
    with pytest.raises(ValueError, match="Shapes refuses flip and random crop.*held-out combination"):
        images.make_batch_iterator(config, split="train", batch_size=2, seed=0)


def test_config_values_are_checked():
    config = images.default_data_config()
    config.crop = "left"
    with pytest.raises(ValueError, match="data.crop='left' is not one of"):
        images.make_source(config, "train")
    config = images.default_data_config()
    config.source = "webdataset"
    with pytest.raises(ValueError, match="data.source='webdataset' is not one of"):
        images.make_source(config, "train")


def test_shapes_tiny_center_crop_is_the_stored_image_and_resizes(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("shapes"))
    config = images.default_data_config()
    config.update(source="shapes", name="tiny", data_dir=data_dir)
    batch = next(images.make_batch_iterator(config, split="train", batch_size=8, seed=0, shuffle=False))
    assert {"image", "caption", "shape", "colour", "size", "position", "background"} <= batch.keys()
    assert batch["image"].shape == (8, 32, 32, 3)
    stored = tfds.data_source("clipgen_shapes/tiny", split="train", data_dir=data_dir)
    np.testing.assert_array_equal(batch["image"][0], np.asarray(stored[0]["image"], np.float32) / 127.5 - 1.0)
    assert batch["caption"][0] == stored[0]["caption"].decode()

    config.image_size = 16
    resized = next(images.make_batch_iterator(config, split="heldout", batch_size=2, seed=0))
    assert resized["image"].shape == (2, 16, 16, 3)
