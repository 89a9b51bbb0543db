"""The `clipgen_shapes` TFDS builder: the Shapes world (see `clipgen_jax.data.shapes`) as array_record files.

Importing this module (which importing `clipgen_jax` does) registers the builder. Everything works without TensorFlow:
the builder writes array_record by default, which `tfds.data_source` reads with random access (`tfds.load` would
need TensorFlow). Use `prepare` rather than repeating the TFDS calls:

    builder = prepare("s32", data_dir)
    train = tfds.data_source("clipgen_shapes/s32", data_dir=data_dir)["train"]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import tensorflow_datasets as tfds
from PIL import Image

from clipgen_jax.data import shapes

DEFAULT_FILE_FORMAT = "array_record"


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    """Image side and split sizes; `seed` fixes every image (each split draws from its own stream of it)."""

    image_size: int = 32
    num_train: int = 20_000
    num_validation: int = 2_000
    num_heldout: int = 2_000
    seed: int = 0


def _full_config(image_size: int) -> ShapesConfig:
    return ShapesConfig(name=f"s{image_size}", description=f"The Shapes benchmark at {image_size}x{image_size}.",
                        image_size=image_size)


class ClipgenShapes(tfds.core.GeneratorBasedBuilder):
    """Captioned single-object images with attribute labels; `heldout` holds the combinations training never sees."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        _full_config(32),  # the canonical benchmark, hence the default (first) config
        _full_config(64),
        _full_config(128),
        _full_config(256),
        ShapesConfig(name="tiny", description="A small S = 32 set for tests and smoke runs.",
                     image_size=32, num_train=512, num_validation=128, num_heldout=96),
    ]

    def __init__(self, *, file_format: str | None = None, **kwargs):
        # TFDS defaults to tfrecord, which only TensorFlow reads; array_record needs no TensorFlow.
        super().__init__(file_format=file_format or DEFAULT_FILE_FORMAT, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        labels = {name: tfds.features.ClassLabel(names=list(values))
                  for name, values in shapes.ATTRIBUTE_VALUES.items()}
        return tfds.core.DatasetInfo(
            builder=self,
            description="The Shapes world (docs/SHAPES.md): one shape on a plain background, its canonical "
                        "caption and its five attribute labels; `heldout` holds the combinations training never sees.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
                **labels,
            }),
            # Keep the generation order on disk, so `heldout` reads back cycling through the combinations in order.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # everything is procedural: nothing to download
        config = self.builder_config
        sizes = {"train": config.num_train, "validation": config.num_validation, "heldout": config.num_heldout}
        return {split: self._generate_examples(split, size) for split, size in sizes.items()}

    def _generate_examples(self, split: str, num_examples: int) -> Iterator[tuple[int, dict]]:
        config = self.builder_config
        examples = shapes.generate_examples(split, num_examples, config.image_size, config.seed)
        for index, example in enumerate(examples):
            # TFDS encodes numpy images with TensorFlow but PIL images with Pillow (lossless PNG either way).
            yield index, {**example, "image": Image.fromarray(example["image"])}


def prepare(config_name: str = "s32", data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The `clipgen_shapes/{config_name}` builder, built (as array_record, offline) if `data_dir` lacks it."""
    builder = tfds.builder(f"clipgen_shapes/{config_name}", data_dir=data_dir)
    builder.download_and_prepare(file_format=DEFAULT_FILE_FORMAT,
                                 download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder
