"""A corpus of hostile and unusual image files, made here, fed to the folder source (the training input pipeline)
and to precompute: every file is either used (decoded as the plain decoder decodes it) or skipped and counted, with
nothing crashing or hanging (a watchdog ends the run if a file makes the pipeline hang)."""

import faulthandler
import io
import logging
import struct
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from clipgen_jax import precompute
from clipgen_jax.data import images, precomputed
from faultlib import precompute_config

pytestmark = pytest.mark.faults

IMAGE_SIZE = 32
MAX_IMAGE_PIXELS = 64 * 64  # the configured limit: anything larger is skipped from its header
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _encode(image: Image.Image, image_format: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save_args)
    return buffer.getvalue()


def _noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header (IHDR, CRC fixed up) claims `width` x `height` pixels: a decompression bomb's header."""
    data = bytearray(_encode(Image.new("RGB", (1, 1)), "PNG"))
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _animation(image_format: str) -> bytes:
    first, *rest = [Image.new("RGB", (24, 24), colour) for colour in (RED, BLUE)]
    return _encode(first, image_format, save_all=True, append_images=rest, duration=100, loop=0)


def _exif_rotated() -> bytes:
    """40 wide x 20 high, red left half, blue right half, stored with EXIF orientation 6 (display rotated 90° CW)."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20], pixels[:, 20:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.fromarray(pixels), "JPEG", exif=exif, quality=95)


def _corpus() -> dict[str, tuple[bytes, bool]]:
    """File name -> (contents, whether it is usable)."""
    jpeg, png = _encode(_noise(48, 40, 1), "JPEG"), _encode(_noise(48, 40, 2), "PNG")
    return {
        "good.png": (png, True),
        "one_pixel.png": (_encode(Image.new("RGB", (1, 1), RED), "PNG"), True),
        "grayscale.png": (_encode(Image.new("L", (30, 20), 77), "PNG"), True),
        "sixteen_bit.png": (_encode(Image.fromarray(np.full((20, 30), 40000, np.uint16)), "PNG"), True),
        "cmyk.jpg": (_encode(Image.new("CMYK", (20, 30), (0, 255, 255, 0)), "JPEG"), True),
        "palette_transparent.png": (_encode(Image.new("RGBA", (20, 20), (0, 0, 0, 0)).convert("P"), "PNG",
                                            transparency=0), True),
        "animated_gif.png": (_animation("GIF"), True),  # folders list .jpg/.jpeg/.png/.webp; the content decides
        "animated.webp": (_animation("WEBP"), True),
        "exif_rotated.jpg": (_exif_rotated(), True),
        "png_named.jpg": (png, True),  # the suffix lies; the content decides
        "panorama.png": (_encode(_noise(63, 2, 3), "PNG"), True),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], False),
        "truncated.png": (png[: len(png) // 2], False),
        "empty.png": (b"", False),
        "text.webp": (b"this is not an image\n", False),
        "jpeg_magic_then_garbage.jpg": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, False),
        "over_the_limit.png": (_encode(_noise(80, 80, 4), "PNG"), False),  # 6400 > MAX_IMAGE_PIXELS
        "bomb_header.png": (_png_claiming(100_000, 100_000), False),
        "huge_header.png": (_png_claiming(5_000, 5_000), False),
    }


@pytest.fixture
def corpus(tmp_path):
    """The corpus in a folder (plus files the folder source must not list), and its usable and unusable names in
    the folder source's order."""
    folder = tmp_path / "corpus"
    (folder / "a_directory.png").mkdir(parents=True)  # named like an image: not a file, not listed
    (folder / "notes.txt").write_bytes(_encode(_noise(8, 8, 5), "PNG"))  # an image under a non-image suffix
    files = _corpus()
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    order = sorted(files, key=lambda name: str(folder / name))
    return folder, [name for name in order if files[name][1]], [name for name in order if not files[name][1]]


@pytest.fixture(autouse=True)
def watchdog():
    """A file that makes decoding hang fails the run (with every thread's stack) instead of stalling it."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _expected_pixels(path) -> np.ndarray:
    image = images.decode_image(path.read_bytes(), max_image_pixels=MAX_IMAGE_PIXELS)
    return images.to_model_range(images.resize_and_crop(image, IMAGE_SIZE))


def test_folder_source_uses_or_skips_and_counts_every_file(corpus, caplog):
    folder, usable, unusable = corpus
    config = images.default_data_config()
    config.update(source="folder", folder=str(folder), validation_fraction=0.0, image_size=IMAGE_SIZE,
                  max_image_pixels=MAX_IMAGE_PIXELS)
    assert len(images.make_source(config, "train")) == len(usable) + len(unusable)
    iterator = images.make_batch_iterator(config, split="train", batch_size=len(usable) + len(unusable), seed=0,
                                          shuffle=False, num_epochs=1)
    with caplog.at_level(logging.WARNING, logger=images.__name__):
        (batch,) = list(iterator)
    assert iterator.num_skipped == len(unusable)
    warned = caplog.text
    assert all(f"{folder / name}:" in warned for name in unusable)
    assert not any(f"{folder / name}:" in warned for name in usable)
    assert batch["image"].shape == (len(usable), IMAGE_SIZE, IMAGE_SIZE, 3)
    for name, pixels in zip(usable, batch["image"]):
        np.testing.assert_array_equal(pixels, _expected_pixels(folder / name), err_msg=name)

    by_name = dict(zip(usable, batch["image"]))
    assert np.all(by_name["grayscale.png"][..., 0] == by_name["grayscale.png"][..., 2])
    np.testing.assert_allclose(by_name["sixteen_bit.png"], round(40000 / 257) / 127.5 - 1, atol=1e-6)
    rotated = by_name["exif_rotated.jpg"]  # displayed 20 wide x 40 high: red on top, blue below
    assert rotated[2, IMAGE_SIZE // 2, 0] > 0.8 > rotated[-3, IMAGE_SIZE // 2, 0]
    assert by_name["animated_gif.png"][..., 0].min() > 0.9 and by_name["animated.webp"][..., 0].min() > 0.9


def test_precompute_uses_or_skips_and_counts_every_file(corpus, models_dir, tmp_path):
    folder, usable, unusable = corpus
    config = precompute_config(models_dir, tmp_path / "out", folder=folder)
    config.data.max_image_pixels = MAX_IMAGE_PIXELS
    directory = precompute.precompute(config)
    metadata = precomputed.load_metadata(tmp_path / "out", config.output.name)
    assert metadata["num_skipped"] == {"train": len(unusable)}
    assert metadata["num_examples"] == {"train": len(usable)}
    order = images.FolderSource(folder).paths
    source = tfds.builder_from_directory(str(directory)).as_data_source("train")
    used = [order[record["image_index"]] for record in (source[i] for i in range(len(source)))]
    assert used == [str(folder / name) for name in usable]
