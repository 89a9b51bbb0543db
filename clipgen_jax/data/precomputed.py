"""Reading a precomputed dataset (VQGAN tokens + CLIP embeddings, written by `clipgen_jax.precompute`) back.

The dataset is an ordinary TFDS dataset in array_record format under `{data_dir}/{name}/{VERSION}`, so
`tfds.data_source` reads it too; this module adds what the prior's trainer needs:

- `make_batch_iterator`: deterministic grain batches of the stored arrays (`tokens`, `clip_image_embedding`, ...),
  shuffled by seed, split between processes, with a JSON state for checkpoints (like `images.ImageBatchIterator`);
- `check_identity`: refuses a dataset made with another VQGAN or CLIP than the trainer's, in one line that says which
  and what to do;
- `vqgan_identity` / `clip_identity`: the identity records both sides compare (written by precompute, checked here).
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from clipgen_jax import checkpointing
from clipgen_jax.data import images

VERSION = "1.0.0"
FORMAT = "clipgen_precomputed"

TOKENS = "tokens"
IMAGE_EMBEDDING = "clip_image_embedding"
TEXT_EMBEDDING = "clip_text_embedding"
CAPTION = "caption"
IMAGE_INDEX = "image_index"  # the source record an example was computed from
VIEW = "view"  # which augmented view of that record (0 is the unaugmented center crop)

# Written before any shard, so that a rerun can tell "resume this" from "a different dataset is here".
PLAN_FILE = "precompute_plan.json"
# Written last: its presence means the dataset is complete.
INFO_FILE = "dataset_info.json"


class IdentityMismatchError(ValueError):
    """A precomputed dataset was made with another VQGAN or CLIP than the one it is used with."""


# ----------------------------------------------------------------------------------------------------------------
# Identities.


def vqgan_identity(path: str | pathlib.Path, params: Any, model_config: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a VQGAN's tokens: its weights (hashed), codebook size and grid; the path is for messages."""
    factor = 2 ** (len(model_config["ch_mult"]) - 1)
    side = int(model_config["resolution"]) // factor
    return {"path": str(pathlib.Path(path).absolute()), "weights_hash": checkpointing.params_hash(params),
            "codebook_size": int(model_config["codebook_size"]), "image_size": int(model_config["resolution"]),
            "grid_shape": [side, side]}


def clip_identity(loaded_clip: Any) -> dict[str, Any]:
    """What identifies a CLIP's embeddings (`loaded_clip`: a `clipgen_jax.models.clip.CLIP`)."""
    return {"name": str(loaded_clip.name), "weights_hash": loaded_clip.weights_hash(),
            "embed_dim": int(loaded_clip.embed_dim)}


# Compared in this order, so that the message names the most telling difference (a different embedding size says
# more than a different hash).
_COMPARED_FIELDS = {"vqgan": ("codebook_size", "grid_shape", "weights_hash"), "clip": ("embed_dim", "weights_hash")}
_LABELS = {"vqgan": ("VQGAN", "path", "vqgan"), "clip": ("CLIP", "name", "clip")}


def check_identity(metadata: Mapping[str, Any], *, vqgan: Mapping[str, Any] | None = None,
                   clip: Mapping[str, Any] | None = None, dataset: str = "the precomputed dataset") -> None:
    """Raises `IdentityMismatchError` (one line: what differs and what to do) unless the dataset's metadata was made
    with the given VQGAN and CLIP identities (from `vqgan_identity` / `clip_identity`; None skips that check).

    Paths and names are not compared (a moved or renamed model is the same model); weights, codebook size, token grid
    and embedding size are."""
    for kind, expected in (("vqgan", vqgan), ("clip", clip)):
        if expected is None:
            continue
        stored = metadata.get(kind)
        what, key, flag = _LABELS[kind]
        if stored is None:
            raise IdentityMismatchError(f"{dataset} records no {what} identity: it was not written by "
                                        "tools/precompute.py; precompute it again")
        for field in _COMPARED_FIELDS[kind]:
            if stored[field] != expected[field]:
                raise IdentityMismatchError(
                    f"{dataset} was precomputed with {what} {stored[key]} ({field} {_short(stored[field])}), but "
                    f"this run's {what} {expected[key]} has {field} {_short(expected[field])}: precompute again "
                    f"with this {what} (tools/precompute.py --config.{flag}={expected[key]}) or use the {what} the "
                    f"dataset was made with")


def _short(value: Any) -> str:
    return value[:12] if isinstance(value, str) and len(value) == 64 else str(value)


# ----------------------------------------------------------------------------------------------------------------
# Opening a dataset.


def dataset_dir(data_dir: str | pathlib.Path, name: str) -> pathlib.Path:
    return pathlib.Path(data_dir) / name / VERSION


def load_builder(data_dir: str | pathlib.Path, name: str) -> tfds.core.DatasetBuilder:
    """The TFDS builder of a complete precomputed dataset (read from its directory, so a name that a registered TFDS
    dataset also has cannot pick up that one)."""
    directory = dataset_dir(data_dir, name)
    if not (directory / INFO_FILE).is_file():
        state = "is unfinished" if (directory / PLAN_FILE).is_file() else "does not exist"
        raise FileNotFoundError(f"precomputed dataset {directory} {state}; run (or rerun, which resumes) "
                                f"python tools/precompute.py --config=configs/precompute.py:PRESET "
                                f"--config.output.data_dir={data_dir} --config.output.name={name}")
    return tfds.builder_from_directory(str(directory))


def load_metadata(data_dir: str | pathlib.Path, name: str) -> dict[str, Any]:
    """The dataset's metadata: VQGAN and CLIP identities, image size, grid, codebook size, views, skipped images."""
    metadata = load_builder(data_dir, name).info.metadata
    if metadata is None or metadata.get("format") != FORMAT:
        raise ValueError(f"{dataset_dir(data_dir, name)} is a TFDS dataset but not a precomputed one (no "
                         f"{FORMAT!r} metadata); point the prior at the output of tools/precompute.py")
    return dict(metadata)


# ----------------------------------------------------------------------------------------------------------------
# Batches.


@dataclasses.dataclass(frozen=True)
class _SelectFeatures(grain.transforms.Map):
    """Keeps `keys` of a record; text (stored as UTF-8 bytes) becomes str."""

    keys: tuple[str, ...]

    def map(self, record: dict[str, Any]) -> dict[str, Any]:
        return {key: record[key].decode("utf-8") if isinstance(record[key], bytes) else record[key]
                for key in self.keys}


# Splits whose selected features take at most this many bytes are read into memory once (the Shapes train split:
# 20,000 records of 64 tokens and a 128-d embedding, 5.4 MB, in ~3 s): each batch is then a few array lookups, not
# file reads and decoding (0.39 against 2.9 ms per batch of 16 on the 2-core machine, where grain's threaded reader
# took 6.1 ms of CPU, ~8% of a Shapes training step: benchmarks/precomputed_read_speed.py).
DEFAULT_MEMORY_LIMIT_BYTES = 1 << 30
_VARIABLE_SIZE_BYTES = 1024  # what a text or other variable-size value is assumed to take


def _record_bytes(features: tfds.features.FeaturesDict, keys: Sequence[str]) -> int:
    total = 0
    for key in keys:
        feature = features[key]
        shape, dtype = tuple(feature.shape), np.dtype(feature.np_dtype)
        fixed = dtype != np.dtype(object) and all(isinstance(d, int) for d in shape)
        total += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if fixed else _VARIABLE_SIZE_BYTES
    return total


class _InMemoryRecords:
    """Every record of `records` (a finite grain MapDataset of feature dicts) held as one array per feature: a grain
    random-access source that returns exactly what `records` does, without reading files."""

    def __init__(self, records: grain.MapDataset):
        rows = [records[i] for i in range(len(records))]
        self._columns = {key: images.stack([row[key] for row in rows]) for key in rows[0]}
        self._length = len(rows)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {key: column[index] for key, column in self._columns.items()}


class PrecomputedBatchIterator:
    """Batches (dicts of numpy arrays with a leading batch dimension; text as object arrays of str) read in order
    from `records` (already sharded, shuffled and repeated lazily by grain).

    With `worker_count` 0 the records are read by random access in the calling thread: no reader threads compete
    with the training step for the CPU. With more, grain worker processes read ahead.
    Repeating forever, batches run across epoch boundaries, so every batch is full; with finite epochs the last batch
    holds what is left. State: `{"next_index": records consumed so far}` (JSON), independent of `worker_count`.
    """

    def __init__(self, records: grain.MapDataset, *, batch_size: int, worker_count: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._records = records
        self._batch_size = batch_size
        self._worker_count = worker_count
        self._next_index = 0
        self._iterator: grain.DatasetIterator | None = None  # started lazily, so set_state right after creation is free
        # The training loop logs skipped inputs; precompute already dropped (and counted) unreadable images.
        self.num_skipped = 0

    def __iter__(self) -> PrecomputedBatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._worker_count == 0:
            end = min(self._next_index + self._batch_size, len(self._records))
            records = [self._records[i] for i in range(self._next_index, end)]
        else:
            if self._iterator is None:
                self._iterator = images.iterate_from(self._records, self._next_index, self._worker_count)
            records = list(itertools.islice(self._iterator, self._batch_size))
        if not records:
            raise StopIteration
        self._next_index += len(records)
        return {key: images.stack([record[key] for record in records]) for key in records[0]}

    def get_state(self) -> dict[str, int]:
        return {"next_index": self._next_index}

    def set_state(self, state: dict[str, int]) -> None:
        self.close()
        self._next_index = int(state["next_index"])

    def close(self) -> None:
        """Stops grain's worker processes, if any (they are restarted on the next batch)."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None


def make_batch_iterator(data_dir: str | pathlib.Path, name: str, *, split: str, batch_size: int, seed: int,
                        shuffle: bool = True, num_epochs: int | None = None, keys: Sequence[str] | None = None,
                        process_index: int | None = None, process_count: int | None = None,
                        worker_count: int = 0, memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES
                        ) -> PrecomputedBatchIterator:
    """Batches of `batch_size` precomputed examples (the features in `keys`, default all) for this process.

    Process `process_index` of `process_count` (default: this JAX process) reads records i, i + n, i + 2n, ...; the
    shuffle order is fixed by `seed` (with the process index folded in) and differs per epoch. `num_epochs=None`
    repeats forever. If this process's records of the split take at most `memory_limit_bytes` (0: never), they are
    read into memory first; the batches are the same either way.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    builder = load_builder(data_dir, name)
    available = sorted(builder.info.features)
    keys = available if keys is None else list(keys)
    missing = sorted(set(keys) - set(available))
    if missing:
        raise KeyError(f"precomputed dataset {name} has no features {missing} (it has {available})")
    if split not in builder.info.splits:
        raise KeyError(f"precomputed dataset {name} has no split {split!r} (it has {sorted(builder.info.splits)})")
    records = grain.MapDataset.source(builder.as_data_source(split))[process_index::process_count]
    if len(records) == 0:
        raise ValueError(f"process {process_index} of {process_count} gets no records from {name}:{split}")
    records = records.map(_SelectFeatures(tuple(keys)))
    if len(records) * _record_bytes(builder.info.features, keys) <= memory_limit_bytes:
        records = grain.MapDataset.source(_InMemoryRecords(records))
    records = records.seed(int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0]))
    if shuffle:
        records = records.shuffle()
    return PrecomputedBatchIterator(records.repeat(num_epochs), batch_size=batch_size, worker_count=worker_count)
