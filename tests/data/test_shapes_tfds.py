"""The `clipgen_shapes` TFDS builder: built offline as array_record, read back with `tfds.data_source`, without
TensorFlow."""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import clipgen_jax  # noqa: F401  (registers the builder)
from clipgen_jax.data import shapes
from clipgen_jax.data.shapes_tfds import ClipgenShapes, prepare


def _build_tiny(data_dir) -> dict:
    builder = prepare("tiny", str(data_dir))
    source = tfds.data_source("clipgen_shapes/tiny", data_dir=str(data_dir))
    splits = {split: [source[split][i] for i in range(len(source[split]))] for split in source}
    return {"builder": builder, "splits": splits, "data_dir": str(data_dir)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _build_tiny(tmp_path_factory.mktemp("tfds_a"))


def _attributes(example) -> shapes.Attributes:
    return shapes.Attributes(*(int(example[name]) for name in shapes.ATTRIBUTE_NAMES))


def test_builder_is_registered_with_its_configs(tmp_path):
    assert tfds.builder_cls("clipgen_shapes") is ClipgenShapes
    default = tfds.builder("clipgen_shapes", data_dir=str(tmp_path))
    assert default.builder_config.name == "s32" and default.info.file_format.value == "array_record"
    configs = {config.name: config for config in ClipgenShapes.BUILDER_CONFIGS}
    assert ClipgenShapes.BUILDER_CONFIGS[0].name == "s32"  # the default: the canonical benchmark
    for name, size in [("s32", 32), ("s64", 64), ("s128", 128), ("s256", 256)]:
        config = configs[name]
        assert (config.image_size, config.num_train, config.num_validation, config.num_heldout) == (size, 20_000,
                                                                                                    2_000, 2_000)
    tiny_config = configs["tiny"]
    assert (tiny_config.image_size, tiny_config.num_train, tiny_config.num_validation,
            tiny_config.num_heldout) == (32, 512, 128, 96)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="checks the TensorFlow-free path")
def test_builds_and_reads_without_tensorflow(tiny):
    assert tiny["splits"]["train"] and "tensorflow" not in sys.modules


def test_tiny_features_and_split_sizes(tiny):
    info = tiny["builder"].info
    assert info.file_format.value == "array_record"
    assert {name: split.num_examples for name, split in info.splits.items()} == {"train": 512, "validation": 128,
                                                                                 "heldout": 96}
    assert info.features["image"].shape == (32, 32, 3) and info.features["image"].np_dtype == np.uint8
    for name in shapes.ATTRIBUTE_NAMES:
        assert info.features[name].names == list(shapes.ATTRIBUTE_VALUES[name])
    assert {split: len(examples) for split, examples in tiny["splits"].items()} == {"train": 512, "validation": 128,
                                                                                    "heldout": 96}


def test_tiny_examples_read_back(tiny):
    for examples in tiny["splits"].values():
        for example in examples:
            assert set(example) == {"image", "caption", *shapes.ATTRIBUTE_NAMES}
            assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
            assert example["caption"].decode() == shapes.canonical_caption(_attributes(example))
    # The stored images are the generator's, losslessly.
    expected = shapes.generate_examples("validation", 128, 32, seed=ClipgenShapes.BUILDER_CONFIGS[-1].seed)
    for example, reference in zip(tiny["splits"]["validation"], expected):
        np.testing.assert_array_equal(example["image"], reference["image"])


def test_tiny_splits_respect_heldout(tiny):
    for split in ("train", "validation"):
        assert not any(shapes.is_heldout(_attributes(e)) for e in tiny["splits"][split]), split
    assert [_attributes(e) for e in tiny["splits"]["heldout"]] == shapes.heldout_combinations()
    validation = [_attributes(e) for e in tiny["splits"]["validation"]]
    assert validation != [_attributes(e) for e in tiny["splits"]["train"][:len(validation)]]  # another seed


def test_two_builds_are_identical(tiny, tmp_path):
    again = _build_tiny(tmp_path)["splits"]
    for split, examples in tiny["splits"].items():
        for first, second in zip(examples, again[split], strict=True):
            np.testing.assert_array_equal(first["image"], second["image"])
            assert _attributes(first) == _attributes(second) and first["caption"] == second["caption"]


def test_prepare_reuses_an_existing_build(tiny):
    train_file = pathlib.Path(next(tiny["builder"].data_path.glob("*-train.array_record-*")))
    written = train_file.stat().st_mtime_ns
    builder = prepare("tiny", tiny["data_dir"])
    assert builder.data_path == tiny["builder"].data_path and train_file.stat().st_mtime_ns == written
