"""Precompute: VQGAN tokens and CLIP embeddings of an image source, stored as a TFDS dataset for the prior.

    python tools/precompute.py --config=configs/precompute.py:shapes

Output: `{output.data_dir}/{output.name}/1.0.0/`, an array_record TFDS dataset (`tfds.data_source` or
`clipgen_jax.data.precomputed` read it; no TensorFlow needed) with, per example (one per view of each image):
`tokens` (int16 when the codebook fits, else int32; [h*w]), `clip_image_embedding` ([D], L2-normalised, float16 or
float32), `image_index` (the source record) and `view` (0 is the plain center crop; views 1.. are random crops and
flips); with captions also `caption` and `clip_text_embedding`; on Shapes also the five attribute labels. The
dataset's metadata (`builder.info.metadata`) records the VQGAN and CLIP identities (with weight hashes), image size,
grid, codebook size, views per image and the number of skipped unreadable images per split.

Resuming: each split is cut into shards of `shard_size` consecutive source images; a shard's file is written under a
hidden temporary name and renamed when complete, and a rerun computes only the shards whose file is missing. A shard
depends on nothing but its own images (batches never cross shards; augmentation is seeded per image), so a run
interrupted any number of times ends with the dataset an uninterrupted run writes, bit for bit, given the same
devices and batch size. The plan of the run (models, source, settings, split sizes) is written first
(`precompute_plan.json`); a rerun with a different plan is refused instead of mixing two datasets. `dataset_info.json`
is written last, so a directory that has it is complete.

Multi-host: process p of n writes the shards k with k % n == p on its own devices; process 0 writes the plan and,
once every shard exists, the metadata.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
import tqdm
from absl import flags
from array_record.python import array_record_module
from etils import epath
from jax.experimental import multihost_utils
from PIL import ImageOps
from tensorflow_datasets.core import example_serializer, naming

from clipgen_jax import checkpointing, locking, parallel
from clipgen_jax.data import images, precomputed, shapes
from clipgen_jax.models import clip as clip_lib

logger = logging.getLogger(__name__)

FILE_FORMAT = "array_record"
EMBEDDING_DTYPES = ("float16", "float32")
COMPUTE_DTYPES = ("float32", "bfloat16")
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")  # what tfds.builder accepts as a dataset name

# Skipped images: the first few are logged each, then every _SKIP_LOG_EVERY-th (as images.py does).
_SKIP_LOG_FIRST = 10
_SKIP_LOG_EVERY = 100


class PrecomputeError(ValueError):
    """Bad input or an output directory that cannot be used; the message says what to do."""


# ----------------------------------------------------------------------------------------------------------------
# Checking the config and planning the run.


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses configs that cannot run, before anything is loaded."""
    if not config.vqgan:
        raise PrecomputeError("config.vqgan is required: a VQGAN training workdir (e.g. runs/vqgan) or bundle")
    if not config.clip:
        raise PrecomputeError("config.clip is required: a CLIP Hub id, directory or packaged name (e.g. shapes-clip)")
    if not _NAME_PATTERN.match(config.output.name or ""):
        raise PrecomputeError(f"output.name={config.output.name!r} is not a TFDS dataset name: use lowercase "
                              "letters, digits and underscores, starting with a letter")
    if not config.output.data_dir:
        raise PrecomputeError("output.data_dir is required: the TFDS data_dir to write the dataset into")
    if not config.splits:
        raise PrecomputeError("config.splits is empty; list the source splits to precompute, e.g. ('train',)")
    if config.data.source == "folder" and not set(config.splits) <= set(images.FOLDER_PARTS):
        raise PrecomputeError(f"an image folder has the parts {images.FOLDER_PARTS} (data.validation_fraction); "
                              f"set splits to them, not {tuple(config.splits)}")
    if config.views < 1:
        raise PrecomputeError(f"views={config.views} must be at least 1")
    if config.views > 1 and images.is_shapes(config.data):
        raise PrecomputeError(f"Shapes refuses augmented views (views={config.views}): a mirrored or shifted image "
                              "can be a held-out combination (docs/SHAPES.md); set views=1")
    if config.data.crop != "center" or config.data.flip:
        raise PrecomputeError(f"precompute augments through `views` (view 0 is the center crop), not data.crop="
                              f"{config.data.crop!r} / data.flip={config.data.flip}; set data.crop='center' and "
                              "data.flip=False")
    if config.embedding_dtype not in EMBEDDING_DTYPES:
        raise PrecomputeError(f"embedding_dtype={config.embedding_dtype!r} is not one of {EMBEDDING_DTYPES}")
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise PrecomputeError(f"compute_dtype={config.compute_dtype!r} is not one of {COMPUTE_DTYPES}")
    if config.batch_size < 1 or config.batch_size % jax.local_device_count():
        raise PrecomputeError(f"batch_size={config.batch_size} must be a positive multiple of the "
                              f"{jax.local_device_count()} local devices")
    if config.shard_size < 1:
        raise PrecomputeError(f"shard_size={config.shard_size} must be positive")


def token_dtype(codebook_size: int) -> np.dtype:
    """int16 when every code fits (codebook_size <= 32768), else int32."""
    return np.dtype(np.int16) if codebook_size <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def resolve_caption_key(captions: str, data_config: ml_collections.ConfigDict,
                        first_example: Mapping[str, Any]) -> str | None:
    """The example key holding captions, or None for no captions.

    `captions`: "auto" (a TFDS text feature named "caption" when the dataset has one; folders: none), "none",
    "sidecar" (folders: the .txt file beside each image; images without one are skipped) or a TFDS text feature name.
    """
    if captions == "none":
        return None
    if data_config.source == "folder":
        if captions == "auto":
            return None
        if captions != "sidecar":
            raise PrecomputeError(f"captions={captions!r}: an image folder has captions only as sidecar .txt files; "
                                  "set captions='sidecar', 'auto' or 'none'")
        return precomputed.CAPTION
    if captions == "sidecar":
        raise PrecomputeError("captions='sidecar' reads .txt files beside images: it needs data.source='folder'")
    key = precomputed.CAPTION if captions == "auto" else captions
    if isinstance(first_example.get(key), str):
        return key
    if captions == "auto":
        return None
    text_keys = sorted(k for k, v in first_example.items() if isinstance(v, str) and not k.startswith("_"))
    raise PrecomputeError(f"captions={captions!r} is not a text feature of {data_config.name} (its text features: "
                          f"{text_keys}); set captions to one of them, 'auto' or 'none'")


def make_plan(config: ml_collections.ConfigDict, *, vqgan_identity: dict, clip_identity: dict,
              split_sizes: Mapping[str, int], caption_key: str | None, label_keys: tuple[str, ...]) -> dict[str, Any]:
    """Everything that determines the dataset's contents, as JSON values: what a rerun must match to resume."""
    views = {split: config.views if split in config.augmented_splits else 1 for split in config.splits}
    plan = {
        "format": precomputed.FORMAT,
        "vqgan": vqgan_identity,
        "clip": clip_identity,
        "image_size": vqgan_identity["image_size"],
        "grid_shape": vqgan_identity["grid_shape"],
        "codebook_size": vqgan_identity["codebook_size"],
        "views_per_image": views,
        "token_dtype": token_dtype(vqgan_identity["codebook_size"]).name,
        "embedding_dtype": config.embedding_dtype,
        "compute_dtype": config.compute_dtype,
        "source": {key: config.data[key] for key in ("source", "name", "data_dir", "folder", "image_key",
                                                     "max_image_pixels")},
        "caption_key": caption_key,
        "labels": list(label_keys),
        "seed": config.seed,
        "shard_size": config.shard_size,
        "splits": {split: {"num_images": size, "num_shards": max(1, -(-size // config.shard_size))}
                   for split, size in split_sizes.items()},
    }
    if config.data.source == "folder":  # which images each part holds
        plan["source"]["validation_fraction"] = config.data.validation_fraction
    return json.loads(json.dumps(plan))  # tuples -> lists, as the stored plan reads back


def make_features(plan: Mapping[str, Any]) -> tfds.features.FeaturesDict:
    """The TFDS features a plan's examples have. Arrays are stored as raw bytes (exact, compact, fast to decode)."""
    grid_h, grid_w = plan["grid_shape"]
    embed_dim = plan["clip"]["embed_dim"]
    embedding = dict(shape=(embed_dim,), dtype=np.dtype(plan["embedding_dtype"]), encoding=tfds.features.Encoding.BYTES)
    features = {
        precomputed.TOKENS: tfds.features.Tensor(shape=(grid_h * grid_w,), dtype=np.dtype(plan["token_dtype"]),
                                                 encoding=tfds.features.Encoding.BYTES),
        precomputed.IMAGE_EMBEDDING: tfds.features.Tensor(**embedding),
        precomputed.IMAGE_INDEX: tfds.features.Scalar(dtype=np.int64),
        precomputed.VIEW: tfds.features.Scalar(dtype=np.int32),
    }
    if plan["caption_key"] is not None:
        features[precomputed.CAPTION] = tfds.features.Text()
        features[precomputed.TEXT_EMBEDDING] = tfds.features.Tensor(**embedding)
    for name in plan["labels"]:
        features[name] = tfds.features.ClassLabel(names=list(shapes.ATTRIBUTE_VALUES[name]))
    return tfds.features.FeaturesDict(features)


def shard_template(directory: pathlib.Path, name: str, split: str) -> naming.ShardedFileTemplate:
    return naming.ShardedFileTemplate(data_dir=epath.Path(directory), dataset_name=name, split=split,
                                      filetype_suffix=FILE_FORMAT)


def shard_path(directory: pathlib.Path, name: str, split: str, shard: int, num_shards: int) -> pathlib.Path:
    """TFDS's file name for a shard: `{name}-{split}.array_record-{shard:05d}-of-{num_shards:05d}`."""
    return pathlib.Path(shard_template(directory, name, split).sharded_filepath(shard_index=shard,
                                                                                num_shards=num_shards))


def _first_difference(stored: Any, planned: Any, prefix: str = "") -> str | None:
    """The dotted key of the first value that differs between two JSON trees, or None when they are equal."""
    if isinstance(stored, dict) and isinstance(planned, dict):
        for key in sorted(set(stored) | set(planned)):
            found = _first_difference(stored.get(key), planned.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if stored == planned else f"{prefix[:-1]} (stored {stored!r}, now {planned!r})"


def check_output(directory: pathlib.Path, plan: Mapping[str, Any]) -> bool:
    """Whether `directory` already holds this plan's complete dataset (True), or is empty or this plan's unfinished
    run (False); raises `PrecomputeError` when it holds anything else. Reads only, so every process may call it."""
    plan_path = directory / precomputed.PLAN_FILE
    if plan_path.is_file():
        difference = _first_difference(json.loads(plan_path.read_text()), plan)
        if difference is not None:
            raise PrecomputeError(f"{directory} holds a precompute of a different dataset ({difference}); choose "
                                  "another output.name or output.data_dir, or delete it to start over")
        return (directory / precomputed.INFO_FILE).is_file()
    if directory.is_dir() and any(directory.iterdir()):
        raise PrecomputeError(f"{directory} is not empty and holds no {precomputed.PLAN_FILE}: it is not a "
                              "precompute output; choose another output.name or output.data_dir")
    return False


def _write_atomically(path: pathlib.Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.incomplete")
    temporary.write_text(text)
    os.replace(temporary, path)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------------------------------
# Reading images: one grain record per source image, holding all its views (decoded once).


_SKIPPED = "skipped"


@dataclasses.dataclass(frozen=True)
class _LoadViews(grain.transforms.Map):
    """Source index -> {"images": uint8 [V, S, S, 3], "image_index", caption, labels}, or {"skipped": why} for an
    unreadable image (or an empty caption).

    View 0 is the center crop; views 1.. are random crops, each mirrored with probability 1/2, drawn from a generator
    seeded by (seed, index), so they do not depend on sharding, batching or workers.
    """

    source: Any
    image_key: str
    caption_key: str | None
    label_keys: tuple[str, ...]
    image_size: int
    views: int
    seed: int
    max_image_pixels: int

    def map(self, index: int) -> dict[str, Any]:
        example = self.source[index]
        if images.is_skip_marker(example):  # the marker's one value says which file and why
            return {_SKIPPED: "; ".join(map(str, example.values()))}
        # Untrusted files make Pillow raise many exception types; any of them means "skip this image".
        try:
            image = images.decode_image(example[self.image_key], max_image_pixels=self.max_image_pixels)
            caption = example[self.caption_key].strip() if self.caption_key else None
            if caption == "":
                raise ValueError("its caption is empty")
        except Exception as error:
            return {_SKIPPED: f"{self._origin(index)}: {type(error).__name__}: {error}"}
        rng = np.random.default_rng([self.seed, index])
        views_VHWC = [np.asarray(images.resize_and_crop(image, self.image_size), np.uint8)]
        for _ in range(1, self.views):
            view = images.resize_and_crop(image, self.image_size, rng)
            if rng.random() < 0.5:
                view = ImageOps.mirror(view)
            views_VHWC.append(np.asarray(view, np.uint8))
        record = {"images": np.stack(views_VHWC), precomputed.IMAGE_INDEX: index}
        if caption is not None:
            record[precomputed.CAPTION] = caption
        for name in self.label_keys:
            record[name] = int(example[name])
        return record


    def _origin(self, index: int) -> str:
        if isinstance(self.source, images.FolderSource):
            return self.source.paths[index]
        return f"{self.source.description}[{index}]"


def _split_seed(seed: int, split: str) -> int:
    """Per-split seed, so that record i of two splits does not get the same crops."""
    return int(np.random.SeedSequence([seed, zlib.crc32(split.encode())]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------------------------
# The device step.


def make_encode_fn(vqgan_model: Any, loaded_clip: clip_lib.CLIP, *, tokens_dtype: np.dtype,
                   embedding_dtype: np.dtype, with_text: bool) -> Callable[..., dict[str, jax.Array]]:
    """A jitted fn(vqgan_params, clip_params, images uint8 [B, S, S, 3], input_ids [B, L], attention_mask [B, L])
    -> {"tokens": [B, h*w], "clip_image_embedding": [B, D], and with text "clip_text_embedding": [B, D]}.

    Images travel as uint8 (a quarter of the bytes of float32) and become [-1, 1] floats on the device."""

    def encode(vqgan_params, clip_params, images_BHWC, input_ids_BL, attention_mask_BL):
        x_BHWC = images_BHWC.astype(jnp.float32) / 127.5 - 1.0
        codes_Bhw = vqgan_model.apply({"params": vqgan_params}, x_BHWC, method=vqgan_model.encode)
        outputs = {precomputed.TOKENS: codes_Bhw.reshape(codes_Bhw.shape[0], -1).astype(tokens_dtype),
                   precomputed.IMAGE_EMBEDDING: loaded_clip.image_features(clip_params, x_BHWC).astype(embedding_dtype)}
        if with_text:
            text_BD = loaded_clip.text_features(clip_params, input_ids_BL, attention_mask_BL)
            outputs[precomputed.TEXT_EMBEDDING] = text_BD.astype(embedding_dtype)
        return outputs

    return jax.jit(encode)


@dataclasses.dataclass
class _Models:
    """Everything a shard needs from the models, placed on this process's devices."""

    encode: Callable[..., dict[str, jax.Array]]
    vqgan_params: Any
    clip_params: Any
    clip: clip_lib.CLIP
    batch_sharding: jax.sharding.NamedSharding
    batch_size: int


# ----------------------------------------------------------------------------------------------------------------
# Shards.


@dataclasses.dataclass
class _SplitJob:
    split: str
    num_images: int
    num_shards: int
    loader: _LoadViews

    def image_range(self, shard: int, shard_size: int) -> tuple[int, int]:
        return shard * shard_size, min((shard + 1) * shard_size, self.num_images)


class _SkipLog:
    def __init__(self):
        self.count = 0

    def add(self, description: str) -> None:
        self.count += 1
        if self.count <= _SKIP_LOG_FIRST or self.count % _SKIP_LOG_EVERY == 0:
            logger.warning("skipped unreadable image %s (%d skipped so far; the first %d skips are logged, then "
                           "every %dth)", description, self.count, _SKIP_LOG_FIRST, _SKIP_LOG_EVERY)


def _view_batches(records: Iterator[dict[str, Any]], batch_size: int, progress: tqdm.tqdm,
                  skips: _SkipLog) -> Iterator[list[tuple[dict[str, Any], int]]]:
    """(record, view) pairs in batches of `batch_size` (the last may be smaller); skipped records are logged."""
    batch = []
    for record in records:
        progress.update(1)
        if _SKIPPED in record:
            skips.add(record[_SKIPPED])
            continue
        for view in range(len(record["images"])):
            batch.append((record, view))
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def _run_batch(models: _Models, batch: list[tuple[dict[str, Any], int]], with_text: bool) -> dict[str, jax.Array]:
    """Dispatches one batch (padded to the fixed batch size, so there is one compilation) without waiting for it."""
    images_BHWC = np.zeros((models.batch_size,) + batch[0][0]["images"].shape[1:], np.uint8)
    images_BHWC[:len(batch)] = [record["images"][view] for record, view in batch]
    length = models.clip.context_length
    input_ids_BL = np.zeros((models.batch_size, length), np.int32)
    attention_mask_BL = np.zeros((models.batch_size, length), np.int32)
    if with_text:
        input_ids_BL[:len(batch)], attention_mask_BL[:len(batch)] = models.clip.tokenize(
            [record[precomputed.CAPTION] for record, _ in batch])
        # Padding rows get a valid prompt; their outputs are dropped.
        input_ids_BL[len(batch):], attention_mask_BL[len(batch):] = input_ids_BL[0], attention_mask_BL[0]
    arrays = [jax.device_put(a, models.batch_sharding) for a in (images_BHWC, input_ids_BL, attention_mask_BL)]
    return models.encode(models.vqgan_params, models.clip_params, *arrays)


def _write_batch(writer: Any, serializer: example_serializer.ExampleSerializer,
                 features: tfds.features.FeaturesDict, batch: list[tuple[dict[str, Any], int]],
                 outputs: dict[str, jax.Array], label_keys: tuple[str, ...]) -> None:
    arrays = {key: np.asarray(value)[:len(batch)] for key, value in outputs.items()}
    for row, (record, view) in enumerate(batch):
        example = {key: value[row] for key, value in arrays.items()}
        example[precomputed.IMAGE_INDEX] = record[precomputed.IMAGE_INDEX]
        example[precomputed.VIEW] = view
        if precomputed.CAPTION in record:
            example[precomputed.CAPTION] = record[precomputed.CAPTION]
        for name in label_keys:
            example[name] = record[name]
        # Deterministic: protobuf otherwise orders the feature map by a per-process hash, and a resumed run's shards
        # would differ in bytes from an uninterrupted run's.
        writer.write(serializer.get_tf_example(features.encode_example(example)).SerializeToString(deterministic=True))


def _records(loader: _LoadViews, start: int, end: int, worker_count: int) -> grain.DatasetIterator:
    dataset = grain.MapDataset.range(start, end).map(loader)
    if worker_count > 0:
        # grain 0.2.18's process prefetch reads an absl flag, which raises in programs that never parse absl flags.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        return iter(dataset.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count)))
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=256)))


def _write_shard(path: pathlib.Path, job: _SplitJob, start: int, end: int, *, models: _Models,
                 features: tfds.features.FeaturesDict, worker_count: int, progress: tqdm.tqdm,
                 skips: _SkipLog) -> None:
    """Computes the shard of images [start, end) into a temporary file, then renames it to `path`."""
    temporary = path.with_name(f".{path.name}.incomplete")
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    with_text = job.loader.caption_key is not None
    writer = array_record_module.ArrayRecordWriter(str(temporary), "group_size:1")  # TFDS's random-access layout
    records = _records(job.loader, start, end, worker_count)
    pending = None
    try:
        # The device works on batch k while the host serialises batch k - 1 and decodes ahead (grain threads).
        for batch in _view_batches(records, models.batch_size, progress, skips):
            outputs = _run_batch(models, batch, with_text)
            if pending is not None:
                _write_batch(writer, serializer, features, *pending, job.loader.label_keys)
            pending = (batch, outputs)
        if pending is not None:
            _write_batch(writer, serializer, features, *pending, job.loader.label_keys)
    finally:
        records.close()  # stops grain's threads or worker processes, also when interrupted
        writer.close()
    # Contents reach the disk before the name does, so a shard under its final name is complete even after a power
    # loss (a lost rename only means the shard is computed again).
    with open(temporary, "rb") as file:
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _num_records(path: pathlib.Path) -> int:
    reader = array_record_module.ArrayRecordReader(str(path))
    try:
        return reader.num_records()
    finally:
        reader.close()


# ----------------------------------------------------------------------------------------------------------------
# Metadata.


def _finalize(directory: pathlib.Path, name: str, plan: Mapping[str, Any]) -> dict[str, Any]:
    """Writes features.json, metadata.json and dataset_info.json (last) from the shards on disk; returns the
    metadata. Raises when a shard is missing (another process has not finished)."""
    split_infos = []
    num_skipped, num_examples = {}, {}
    for split, sizes in plan["splits"].items():
        paths = [shard_path(directory, name, split, k, sizes["num_shards"]) for k in range(sizes["num_shards"])]
        missing = [path.name for path in paths if not path.is_file()]
        if missing:
            raise PrecomputeError(f"{len(missing)} shards of {split} are missing (first: {missing[0]}): a process "
                                  "has not finished; rerun every process to complete them")
        lengths = [_num_records(path) for path in paths]
        num_examples[split] = sum(lengths)
        num_skipped[split] = sizes["num_images"] - num_examples[split] // plan["views_per_image"][split]
        split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths,
                                               num_bytes=sum(path.stat().st_size for path in paths),
                                               filename_template=shard_template(directory, name, split)))
    metadata = {**plan, "num_examples": num_examples, "num_skipped": num_skipped,
                "num_skipped_total": sum(num_skipped.values())}
    identity = tfds.core.dataset_info.DatasetIdentity(name=name, version=tfds.core.Version(precomputed.VERSION),
                                                      data_dir=str(directory), module_name=__name__)
    info = tfds.core.DatasetInfo(
        builder=identity,
        description=f"VQGAN tokens and CLIP embeddings of {plan['source']['source']}:{plan['source']['name']} "
                    "(clipgen_jax.precompute); the metadata names the VQGAN and CLIP.",
        features=make_features(plan), metadata=tfds.core.MetadataDict(metadata),
        split_dict=tfds.core.SplitDict(split_infos), disable_shuffling=True)
    info.set_file_format(FILE_FORMAT)
    # Written in a scratch directory and moved in with dataset_info.json last: a reader never sees half of it.
    scratch = directory / ".info.incomplete"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    info.write_to_directory(scratch)
    written = sorted(scratch.iterdir(), key=lambda path: path.name == precomputed.INFO_FILE)
    for path in written:
        os.replace(path, directory / path.name)
    scratch.rmdir()
    return metadata


# ----------------------------------------------------------------------------------------------------------------
# The run.


def precompute(config: ml_collections.ConfigDict, *, process_index: int | None = None,
               process_count: int | None = None,
               on_shard_written: Callable[[str, int], None] | None = None) -> pathlib.Path:
    """Writes (or completes) the dataset `config` describes; returns its directory.

    `process_index` / `process_count` default to this JAX process; `on_shard_written(split, shard)` is called after
    each shard is renamed into place (progress reporting, and tests that interrupt a run).
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    check_config(config)
    directory = precomputed.dataset_dir(config.output.data_dir, config.output.name).absolute()
    # Beside the dataset directory, not in it: a reader (or check_output) sees only the dataset's own files.
    lock_file = locking.lock_path(directory.with_name(f".{directory.name}.lock"), process_index)
    with locking.exclusive(lock_file, f"precompute output {directory}",
                           "wait for that run to finish (or stop it), or set another output.name or output.data_dir"):
        return _precompute(config, directory, process_index=process_index, process_count=process_count,
                           on_shard_written=on_shard_written)


def _precompute(config: ml_collections.ConfigDict, directory: pathlib.Path, *, process_index: int, process_count: int,
                on_shard_written: Callable[[str, int], None] | None) -> pathlib.Path:
    compute_dtype = jnp.dtype(config.compute_dtype)

    vqgan_path = checkpointing.bundle_path(config.vqgan, "vqgan")
    vqgan_model, vqgan_params, vqgan_metadata = checkpointing.load_vqgan(vqgan_path, dtype=compute_dtype)
    vqgan_identity = precomputed.vqgan_identity(vqgan_path, vqgan_params, vqgan_metadata["model"])
    if config.data.image_size != vqgan_identity["image_size"]:
        raise PrecomputeError(f"data.image_size={config.data.image_size} but the VQGAN {vqgan_path} works at "
                              f"{vqgan_identity['image_size']} px; set data.image_size={vqgan_identity['image_size']}")
    loaded_clip = clip_lib.load(config.clip, dtype=compute_dtype)
    clip_identity = precomputed.clip_identity(loaded_clip)

    label_keys = shapes.ATTRIBUTE_NAMES if images.is_shapes(config.data) else ()
    caption_mode = config.captions
    sources = {split: images.make_source(config.data, split, with_captions=caption_mode == "sidecar")
               for split in config.splits}
    for split, source in sources.items():
        if len(source) == 0:
            raise PrecomputeError(f"split {split!r} of {source} is empty; remove it from config.splits")
    caption_key = resolve_caption_key(caption_mode, config.data, sources[config.splits[0]][0])
    plan = make_plan(config, vqgan_identity=vqgan_identity, clip_identity=clip_identity,
                     split_sizes={split: len(source) for split, source in sources.items()}, caption_key=caption_key,
                     label_keys=label_keys)

    if check_output(directory, plan):
        logger.info("%s is already complete (same VQGAN, CLIP, source and settings); nothing to do", directory)
        return directory
    if process_index == 0 and not (directory / precomputed.PLAN_FILE).is_file():
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(directory / precomputed.PLAN_FILE, json.dumps(plan, indent=2, sort_keys=True) + "\n")
    _barrier("precompute: plan written")

    features = make_features(plan)
    jobs = [_SplitJob(split=split, num_images=len(source), num_shards=plan["splits"][split]["num_shards"],
                      loader=_LoadViews(source=source, image_key=config.data.image_key, caption_key=caption_key,
                                        label_keys=label_keys, image_size=config.data.image_size,
                                        views=plan["views_per_image"][split], seed=_split_seed(config.seed, split),
                                        max_image_pixels=config.data.max_image_pixels))
            for split, source in sources.items()]
    todo = [(job, shard) for job in jobs for shard in range(process_index, job.num_shards, process_count)
            if not shard_path(directory, config.output.name, job.split, shard, job.num_shards).is_file()]
    if todo:
        mesh = parallel.make_mesh(devices=jax.local_devices())
        replicated = parallel.replicated(mesh)
        models = _Models(
            encode=make_encode_fn(vqgan_model, loaded_clip, tokens_dtype=np.dtype(plan["token_dtype"]),
                                  embedding_dtype=np.dtype(config.embedding_dtype), with_text=caption_key is not None),
            vqgan_params=jax.device_put(vqgan_params, replicated),
            clip_params=jax.device_put(loaded_clip.params, replicated), clip=loaded_clip,
            batch_sharding=parallel.batch_sharding(mesh), batch_size=config.batch_size)
        num_images = sum(end - start for start, end in (job.image_range(shard, config.shard_size)
                                                        for job, shard in todo))
        logger.info("process %d of %d: %d shards (%d images) to compute into %s", process_index, process_count,
                    len(todo), num_images, directory)
        skips = _SkipLog()
        start_time = time.perf_counter()
        with tqdm.tqdm(total=num_images, unit="img", desc="precompute", smoothing=0.1) as progress:
            for job, shard in todo:
                start, end = job.image_range(shard, config.shard_size)
                path = shard_path(directory, config.output.name, job.split, shard, job.num_shards)
                _write_shard(path, job, start, end, models=models, features=features,
                             worker_count=config.data.worker_count, progress=progress, skips=skips)
                if on_shard_written is not None:
                    on_shard_written(job.split, shard)
        elapsed = time.perf_counter() - start_time
        logger.info("process %d: %d images in %.1f s (%.0f images/s, %d skipped)", process_index, num_images, elapsed,
                    num_images / elapsed, skips.count)
    _barrier("precompute: shards written")

    if process_index == 0:
        metadata = _finalize(directory, config.output.name, plan)
        logger.info("wrote %s: %s examples, %d unreadable images skipped", directory,
                    metadata["num_examples"], metadata["num_skipped_total"])
    return directory
