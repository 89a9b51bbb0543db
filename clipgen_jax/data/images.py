"""Image sources and the grain input pipeline that turns them into batches of [-1, 1] float images.

Three sources, chosen by `data_config.source` (see `default_data_config`):
- "shapes": the offline Shapes world (`clipgen_shapes` TFDS builder), built on demand;
- "tfds": any prepared TFDS dataset (array_record is read directly; tfrecord needs TensorFlow);
- "folder": a directory tree of unlabeled .jpg/.jpeg/.png/.webp files, split into a "train" and a "validation" part
  by a hash of each file's path under the folder (`data.validation_fraction`, default 0.1, of the images validate).

Every source yields examples whose image is still encoded (bytes) where possible, so decoding happens inside the
pipeline (in grain worker processes when `worker_count > 0`) and an unreadable image can be skipped instead of
crashing. A skipped record travels down the pipeline as a marker and is dropped and counted by `ImageBatchIterator`
in the main process, so the count is right whatever the number of workers.

Per-record randomness (crop offset, flip) comes from grain's `random_map`, which seeds each record from the
pipeline seed and the record's position, so batches do not depend on `worker_count`, and the iterator state is just
that position (plus the skip count).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import logging
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image, ImageOps

from clipgen_jax.data import shapes_tfds

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
SOURCES = ("shapes", "tfds", "folder")
FOLDER_PARTS = ("train", "validation")
CROPS = ("random", "center")
SHAPES_TFDS_NAME = "clipgen_shapes"

# Transparent images are composited on white: transparent web images (logos, icons, product cut-outs) are drawn for
# light pages, and dark line art on black would vanish.
ALPHA_BACKGROUND = (255, 255, 255)

# Keys private to the pipeline. A record carrying _SKIPPED_KEY is a marker for an unreadable image; its value says
# which record and why. _ORIGIN_KEY names the record (file path or TFDS split and index) for that message.
_SKIPPED_KEY = "_skipped"
_ORIGIN_KEY = "_origin"

# The first few skipped files are each logged; after that only every _SKIP_LOG_EVERY-th, so a folder full of
# broken files cannot flood the log.
_SKIP_LOG_FIRST = 10
_SKIP_LOG_EVERY = 100

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def default_data_config() -> ml_collections.ConfigDict:
    """The data config with every field at its default; experiment configs start from this and override fields.

    The defaults are valid for every source (no flip, center crop), because Shapes refuses the augmentations;
    configs for natural images should set `crop="random"` and `flip=True` for training.
    """
    config = ml_collections.ConfigDict()
    config.source = "shapes"  # "shapes" | "tfds" | "folder"
    config.name = "s32"  # shapes: builder config (s32, s64, s128, s256, tiny); tfds: dataset name, e.g. "name/config"
    # Typed placeholders (None until set) so that --config.data.data_dir=... works on the command line.
    config.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir; None = TFDS default
    config.folder = ml_collections.config_dict.placeholder(str)  # root directory for source="folder"
    # Folders: this fraction of the images (chosen by a hash of the path under `folder`) is the "validation" part,
    # never trained on; the rest is "train". 0 trains on every image (and evaluates on training images).
    config.validation_fraction = 0.1
    config.image_key = "image"  # feature holding the image (TFDS sources)
    config.image_size = 32  # output side in pixels
    config.crop = "center"  # "random" (training) | "center" (evaluation)
    config.flip = False  # random horizontal flip
    config.worker_count = 0  # grain worker processes; 0 = decode in threads of the main process
    config.max_image_pixels = 8192 * 8192  # larger images are skipped before decoding (decompression bombs)
    return config


# ----------------------------------------------------------------------------------------------------------------
# Decoding and augmentation of one image.


class ImageTooLargeError(ValueError):
    """An image has more pixels than `max_image_pixels`; raised from its header, before the pixels are decoded."""


def decode_image(data: bytes | np.ndarray, *, max_image_pixels: int) -> Image.Image:
    """Decodes encoded bytes (or wraps an already decoded uint8/uint16 array) into an RGB Pillow image.

    Takes the first frame of animations and applies the EXIF orientation. Raises `ImageTooLargeError` for too many
    pixels, and whatever Pillow raises (OSError, SyntaxError, ValueError, ...) for data that is not a readable image.
    """
    if isinstance(data, np.ndarray):
        image = Image.fromarray(data[..., 0] if data.ndim == 3 and data.shape[-1] == 1 else data)
    else:
        image = Image.open(io.BytesIO(data))  # reads the header only
    if image.width * image.height > max_image_pixels:
        raise ImageTooLargeError(f"{image.width}x{image.height} pixels is over max_image_pixels={max_image_pixels}")
    image.load()  # decodes the first frame; raises here for truncated data
    return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB: 16-bit values are scaled (Pillow's convert clips them at 255), and
    transparency (alpha channels and palette/tRNS transparency) is composited on `ALPHA_BACKGROUND`."""
    if image.mode in _SIXTEEN_BIT_MODES:
        levels = np.asarray(image).astype(np.float32)
        image = Image.fromarray(np.round(np.clip(levels, 0, 65535) / 257).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        background = Image.new("RGBA", image.size, ALPHA_BACKGROUND + (255,))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, size: int, rng: np.random.Generator | None = None) -> Image.Image:
    """Scales the shorter side to `size` and crops a `size` x `size` square: at a random offset drawn from `rng`,
    or centred when `rng` is None.

    Resampling is Pillow's BICUBIC, which widens its kernel when downscaling (antialiased, close to an area filter).
    Only the cropped window is resampled (Pillow's `box`, which still reads the pixels around it, so the result
    equals resize-then-crop): a long panorama costs no more than a square. An image already `size` pixels on its
    shorter side is cropped without resampling, so center crop at the native size is exact.
    """
    width, height = image.size
    scale = size / min(width, height)
    scaled_width, scaled_height = max(size, round(width * scale)), max(size, round(height * scale))
    left = _crop_offset(scaled_width - size, rng)
    top = _crop_offset(scaled_height - size, rng)
    if (scaled_width, scaled_height) == (width, height):
        return image.crop((left, top, left + size, top + size))
    x_scale, y_scale = width / scaled_width, height / scaled_height
    box = (left * x_scale, top * y_scale, (left + size) * x_scale, (top + size) * y_scale)
    return image.resize((size, size), Image.Resampling.BICUBIC, box=box)


def _crop_offset(slack: int, rng: np.random.Generator | None) -> int:
    return int(rng.integers(0, slack + 1)) if rng is not None else slack // 2


def to_model_range(image: Image.Image) -> np.ndarray:
    """RGB uint8 image -> float32 [H, W, 3] in [-1, 1] (0 -> -1, 255 -> 1)."""
    return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class _Preprocess(grain.transforms.RandomMap):
    """Decode, resize, crop, flip and rescale one example's image; an unreadable image becomes a skip marker.

    The processed image always lands under "image", whatever `image_key` was; other features pass through.
    """

    image_key: str
    image_size: int
    random_crop: bool
    flip: bool
    max_image_pixels: int

    def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if is_skip_marker(example):
            return example
        example = dict(example)
        origin = example.pop(_ORIGIN_KEY)
        encoded = example.pop(self.image_key)
        # Untrusted files make Pillow raise many exception types (OSError, SyntaxError, ValueError, struct.error,
        # EOFError, ...); any of them means "cannot read this image", which must skip it, not stop training.
        try:
            image = decode_image(encoded, max_image_pixels=self.max_image_pixels)
        except Exception as error:
            return _skip_marker(origin, error)
        image = resize_and_crop(image, self.image_size, rng if self.random_crop else None)
        if self.flip and rng.random() < 0.5:
            image = ImageOps.mirror(image)
        example["image"] = to_model_range(image)
        return example


def _skip_marker(origin: str, error: Exception) -> dict[str, str]:
    return {_SKIPPED_KEY: f"{origin}: {type(error).__name__}: {error}"}


def is_skip_marker(example: dict[str, Any]) -> bool:
    """Whether a pipeline record stands for a skipped (unreadable) example; later transforms pass it through."""
    return _SKIPPED_KEY in example


# ----------------------------------------------------------------------------------------------------------------
# Sources: random access (`__len__`, `__getitem__`) to examples whose image is still encoded.


def in_validation_part(relative_path: str, validation_fraction: float) -> bool:
    """Whether a folder's file (its POSIX path under the folder) is in the validation part: the first 8 bytes of the
    SHA-256 of the path, read as a fraction of 2^64, are below `validation_fraction`. The same on every machine, and a
    file keeps its part when other files are added or removed."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < validation_fraction * 2.0**64


def recorded_validation_fraction(recorded_data: dict) -> float:
    """The `validation_fraction` a recorded data config (a workdir's config.json, a bundle's metadata) used: one
    written before folders had parts records none, and its folder run trained on every image (0)."""
    return recorded_data.get("validation_fraction", 0.0)


def describe(data_config: ml_collections.ConfigDict, split: str) -> str:
    """What a split of a data config reads, for logs and results: "folder:/photos (validation part, 10%)",
    "clipgen_shapes/s32:heldout"."""
    if data_config.source != "folder":
        name = f"{SHAPES_TFDS_NAME}/{data_config.name}" if data_config.source == "shapes" else data_config.name
        return f"{name}:{split}"
    fraction = data_config.validation_fraction
    if fraction == 0:
        return f"folder:{data_config.folder} (every image: data.validation_fraction=0)"
    part, share = ("training", 1 - fraction) if split == "train" else ("validation", fraction)
    return f"folder:{data_config.folder} ({part} part, {100 * share:g}%)"


class FolderSource:
    """Every .jpg/.jpeg/.png/.webp file (any letter case) under `root`, recursively, in sorted path order (the same
    order on every machine and every run, which sharding and resuming rely on), or one part of them: with `split`
    "validation" the files `in_validation_part`, with "train" the others. Examples are {"image": encoded bytes} plus
    the path for warnings; there are no labels.

    With `with_captions`, each example also has "caption", the UTF-8 text of the `.txt` file beside the image
    (`a/cat.jpg` -> `a/cat.txt`, surrounding whitespace stripped); an image without one, or with an empty one, is
    skipped like an unreadable image."""

    def __init__(self, root: str | os.PathLike[str], with_captions: bool = False, split: str | None = None,
                 validation_fraction: float = 0.0):
        self.with_captions = with_captions
        root = pathlib.Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist or is not a directory; "
                                    "set data.folder to a directory of images")
        paths = sorted(path for path in root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
        if not paths:
            raise ValueError(f"no {'/'.join(IMAGE_SUFFIXES)} files under {root}; "
                             "point data.folder at a folder of images")
        if split is not None:
            paths = [path for path in paths if in_validation_part(path.relative_to(root).as_posix(),
                                                                   validation_fraction) == (split == "validation")]
            if not paths:
                raise ValueError(f"the {split} part of {root} is empty (data.validation_fraction="
                                 f"{validation_fraction}); set data.validation_fraction so that it holds images "
                                 "(0 evaluates on the training images), or add images")
        self.paths = [str(path) for path in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            data = pathlib.Path(path).read_bytes()
            example = {"image": data, _ORIGIN_KEY: path}
            if self.with_captions:
                caption = pathlib.Path(path).with_suffix(".txt").read_text(encoding="utf-8").strip()
                if not caption:
                    raise ValueError("its caption file is empty")
                example["caption"] = caption
        except (OSError, ValueError) as error:  # deleted since listing, no caption, not UTF-8: skip like a corrupt file
            return _skip_marker(path, error)
        return example

    def __repr__(self) -> str:
        return f"FolderSource({len(self.paths)} files)"


class TfdsSource:
    """One split of a TFDS dataset. Image features are left encoded (decoded in the pipeline, so corrupt ones are
    skipped); Text features are decoded to str; every other feature passes through as TFDS returns it."""

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str, image_key: str):
        features = builder.info.features
        if image_key not in features:
            raise KeyError(f"{builder.info.full_name} has no feature {image_key!r} (it has {sorted(features)}); "
                           "set data.image_key")
        is_encoded = isinstance(features[image_key], tfds.features.Image)
        decoders = {image_key: tfds.decode.SkipDecoding()} if is_encoded else None
        self.description = f"{builder.info.full_name}:{split}"
        self._text_keys = tuple(key for key, feature in features.items() if isinstance(feature, tfds.features.Text))
        self._records = _read_split(builder, split, decoders)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = dict(self._records[index])
        for key in self._text_keys:
            example[key] = example[key].decode("utf-8")
        example[_ORIGIN_KEY] = f"{self.description}[{index}]"
        return example

    def __repr__(self) -> str:
        return f"TfdsSource({self.description}, {len(self._records)} records)"


def _read_split(builder: tfds.core.DatasetBuilder, split: str, decoders: dict | None) -> Sequence[dict[str, Any]]:
    """Random access to a split: array_record directly; tfrecord (no random access) only through TensorFlow, by
    reading the whole split into memory."""
    if not builder.is_prepared():
        raise FileNotFoundError(f"TFDS dataset {builder.info.full_name} is not prepared under {builder.data_dir}; "
                                f"build it first (tfds build ... --file_format=array_record) or fix data.data_dir")
    try:
        return builder.as_data_source(split=split, decoders=decoders)
    except NotImplementedError:  # stored in a format without random access (tfrecord)
        pass
    if importlib.util.find_spec("tensorflow") is None:
        raise RuntimeError(
            f"TFDS dataset {builder.info.full_name} is stored as {builder.info.file_format.value}, which only "
            f"TensorFlow can read: pip install 'clipgen_jax[tf]', or convert it to array_record once with "
            f"`tfds convert_format --dataset_version_dir={builder.data_dir} --out_file_format=array_record`")
    logger.warning("reading %s split %s into memory through TensorFlow (tfrecord has no random access); "
                   "convert it to array_record for large datasets", builder.info.full_name, split)
    return list(tfds.as_numpy(builder.as_dataset(split=split, decoders=decoders)))


def is_shapes(data_config: ml_collections.ConfigDict) -> bool:
    """Whether the config reads the Shapes world (directly or by its TFDS name)."""
    return data_config.source == "shapes" or (
        data_config.source == "tfds" and data_config.name.startswith(SHAPES_TFDS_NAME))


def make_source(data_config: ml_collections.ConfigDict, split: str,
                with_captions: bool = False) -> FolderSource | TfdsSource:
    """The random-access source a data config describes (for folders `split` is a part, "train" or "validation";
    `with_captions` reads folders' sidecar .txt captions)."""
    _check_config(data_config)
    if data_config.source == "folder":
        if split not in FOLDER_PARTS:
            raise ValueError(f"an image folder has the parts {FOLDER_PARTS} (data.validation_fraction), not split "
                             f"{split!r}; use --split=validation for its held-out images")
        return FolderSource(data_config.folder, with_captions=with_captions, split=split,
                            validation_fraction=data_config.validation_fraction)
    if data_config.source == "shapes":
        builder = shapes_tfds.prepare(data_config.name, data_dir=data_config.data_dir)
    else:
        builder = tfds.builder(data_config.name, data_dir=data_config.data_dir)
    return TfdsSource(builder, split, data_config.image_key)


def _check_config(data_config: ml_collections.ConfigDict) -> None:
    if data_config.source not in SOURCES:
        raise ValueError(f"data.source={data_config.source!r} is not one of {SOURCES}")
    if data_config.crop not in CROPS:
        raise ValueError(f"data.crop={data_config.crop!r} is not one of {CROPS}")
    if data_config.source == "folder" and not data_config.folder:
        raise ValueError("data.source='folder' needs data.folder, the directory of images")
    if not 0 <= data_config.validation_fraction < 1:
        raise ValueError(f"data.validation_fraction={data_config.validation_fraction} must be in [0, 1)")
    if is_shapes(data_config) and (data_config.flip or data_config.crop == "random"):
        raise ValueError(
            f"Shapes refuses flip and random crop (data.flip={data_config.flip}, data.crop={data_config.crop!r}): "
            "a mirrored or shifted training image can be a held-out combination (docs/SHAPES.md); "
            "set data.flip=False and data.crop='center'")


# ----------------------------------------------------------------------------------------------------------------
# Batching.


class ImageBatchIterator:
    """Iterator of batches: dicts of numpy arrays with a leading batch dimension ("image": float32 [B, S, S, 3] in
    [-1, 1]; labels stacked; text as object arrays of str).

    Reads records in order from `records` (already sharded, shuffled, repeated and preprocessed lazily by grain),
    drops skip markers (counting them in `num_skipped` and logging a rate-limited warning naming the file) and
    stacks the rest. Repeating forever, batches run across epoch boundaries, so every batch is full; with finite
    epochs the last batch holds whatever is left (it may be smaller than `batch_size`).

    State: `{"next_index": records consumed so far, skipped ones included; "num_skipped": ...}`, plain ints (JSON).
    It does not depend on `worker_count`, so a run may resume with a different number of workers.
    """

    def __init__(self, records: grain.MapDataset, *, batch_size: int, worker_count: int, records_per_epoch: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._records = records
        self._batch_size = batch_size
        self._worker_count = worker_count
        self._records_per_epoch = records_per_epoch
        self._next_index = 0
        self._consecutive_skips = 0
        self._iterator: grain.DatasetIterator | None = None  # started lazily, so set_state right after creation is free
        self.num_skipped = 0

    def __iter__(self) -> ImageBatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._start()
        examples = []
        while len(examples) < self._batch_size:
            example = next(self._iterator, None)
            if example is None:
                break
            self._next_index += 1
            if _SKIPPED_KEY in example:
                self._count_skip(example[_SKIPPED_KEY])
            else:
                self._consecutive_skips = 0
                examples.append(example)
        if not examples:
            raise StopIteration
        return {key: stack([example[key] for example in examples]) for key in examples[0]}

    def get_state(self) -> dict[str, int]:
        return {"next_index": self._next_index, "num_skipped": self.num_skipped}

    def set_state(self, state: dict[str, int]) -> None:
        self.close()
        self._next_index = int(state["next_index"])
        self.num_skipped = int(state["num_skipped"])
        self._consecutive_skips = 0

    def close(self) -> None:
        """Stops grain's reader threads or worker processes (they are restarted on the next batch)."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None

    def _start(self) -> grain.DatasetIterator:
        return iterate_from(self._records, self._next_index, self._worker_count)

    def _count_skip(self, description: str) -> None:
        self.num_skipped += 1
        self._consecutive_skips += 1
        if self.num_skipped <= _SKIP_LOG_FIRST or self.num_skipped % _SKIP_LOG_EVERY == 0:
            logger.warning("skipped unreadable image %s (%d skipped so far; the first %d skips are logged, then every "
                           "%dth)", description, self.num_skipped, _SKIP_LOG_FIRST, _SKIP_LOG_EVERY)
        if self._consecutive_skips >= self._records_per_epoch:
            raise RuntimeError(f"{self._consecutive_skips} records in a row (a whole epoch) were unreadable images; "
                               "check the warnings above and the data config")


def iterate_from(records: grain.MapDataset, start: int, worker_count: int) -> grain.DatasetIterator:
    """Grain iterator over `records[start:]`, read in `worker_count` processes (0: threads of this process)."""
    dataset = records[start:].to_iter_dataset()
    if worker_count > 0:
        # grain 0.2.18's process prefetch reads an absl flag, which raises in programs that never parse absl
        # flags (tests, notebooks, non-absl CLIs); the flag defaults are what we want.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(dataset)


def stack(values: list[Any]) -> np.ndarray:
    """One batch array from per-example values (text as an object array of str)."""
    if isinstance(values[0], (str, bytes)):
        return np.array(values, dtype=object)
    return np.stack(values)


def make_batch_iterator(data_config: ml_collections.ConfigDict, *, split: str, batch_size: int, seed: int,
                        shuffle: bool = True, num_epochs: int | None = None, process_index: int | None = None,
                        process_count: int | None = None, transforms: Sequence[Any] = (),
                        with_captions: bool = False) -> ImageBatchIterator:
    """The training loop's entry point: batches of `batch_size` examples for this process.

    Process `process_index` of `process_count` (default: this JAX process) reads the records i, i + n, i + 2n, ...
    of the source, disjoint from every other process. Shuffle order, crops and flips are fixed by `seed`; the
    process index is folded into it so that processes do not draw the same permutation and crops for neighbouring
    records. `num_epochs=None` repeats forever; each epoch is shuffled differently.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    source = make_source(data_config, split, with_captions=with_captions)
    records = grain.MapDataset.source(source)[process_index::process_count]
    if len(records) == 0:
        raise ValueError(f"process {process_index} of {process_count} gets no records from {source}")
    records_per_epoch = len(records)
    records = records.seed(_process_seed(seed, process_index))
    if shuffle:
        records = records.shuffle()
    records = records.repeat(num_epochs).random_map(_Preprocess(
        image_key=data_config.image_key,
        image_size=data_config.image_size,
        random_crop=data_config.crop == "random",
        flip=data_config.flip,
        max_image_pixels=data_config.max_image_pixels,
    ))
    for transform in transforms:
        records = (records.random_map(transform) if isinstance(transform, grain.transforms.RandomMap)
                   else records.map(transform))
    return ImageBatchIterator(records, batch_size=batch_size, worker_count=data_config.worker_count,
                              records_per_epoch=records_per_epoch)


def _process_seed(seed: int, process_index: int) -> int:
    return int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
