"""Captioned image batches for CLIP training: images from `images.py`, captions from one of three places, tokenized in
the input pipeline so the training step sees only arrays.

Caption sources (`caption_config.source`):
- "feature": a text feature of a TFDS dataset (`caption_config.key`, default "caption");
- "sidecar": for an image folder, the `.txt` file beside each image (`cat.jpg` -> `cat.txt`); images without one are
  skipped and counted like unreadable images;
- "shapes_templates": on the Shapes world, a fresh random training caption per example (docs/SHAPES.md's templates and
  synonyms), optionally with `hard_negatives` captions of neighbouring combinations in the same wording.
"auto" picks "shapes_templates" on Shapes, "sidecar" for folders and "feature" for TFDS.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import ml_collections
import numpy as np

from clipgen_jax.data import images, shapes

CAPTION_SOURCES = ("auto", "feature", "sidecar", "shapes_templates")
HARD_NEGATIVES_KEY = "hard_negative_captions"


def default_caption_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        source="auto",
        key="caption",  # the TFDS text feature ("feature" source)
        hard_negatives=0,  # Shapes only: extra captions per image, each one attribute away (never a held-out one)
        # How often each attribute (shape, colour, size, position, background) is the one a hard negative changes.
        hard_negative_weights=(1.0, 1.0, 1.0, 1.0, 1.0),
    ))


def resolve_source(data_config: ml_collections.ConfigDict, caption_config: ml_collections.ConfigDict) -> str:
    source = caption_config.source
    if source not in CAPTION_SOURCES:
        raise ValueError(f"captions.source={source!r} is not one of {CAPTION_SOURCES}")
    if source == "auto":
        source = ("shapes_templates" if images.is_shapes(data_config) else
                  "sidecar" if data_config.source == "folder" else "feature")
    if source == "shapes_templates" and not images.is_shapes(data_config):
        raise ValueError("captions.source='shapes_templates' needs the Shapes world as data.source")
    if source == "sidecar" and data_config.source != "folder":
        raise ValueError("captions.source='sidecar' reads .txt files beside images: it needs data.source='folder'")
    if caption_config.hard_negatives and source != "shapes_templates":
        raise ValueError(f"captions.hard_negatives={caption_config.hard_negatives} needs Shapes template captions "
                         "(hard negatives are built by changing one attribute); set it to 0")
    return source


@dataclasses.dataclass(frozen=True)
class ShapesTemplateCaptions(grain.transforms.RandomMap):
    """Replaces the canonical caption with a random training caption of the example's labels, plus hard negatives."""

    hard_negatives: int
    attribute_weights: tuple[float, ...]

    def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if images.is_skip_marker(example):
            return example
        example = dict(example)
        attrs = shapes.Attributes(*(int(example[name]) for name in shapes.ATTRIBUTE_NAMES))
        negatives = []
        if self.hard_negatives:
            negatives = shapes.hard_negative_combinations(attrs, self.hard_negatives, rng, self.attribute_weights)
        captions = shapes.random_captions([attrs] + negatives, rng)
        example["caption"] = captions[0]
        if self.hard_negatives:
            example[HARD_NEGATIVES_KEY] = captions[1:]
        return example


@dataclasses.dataclass(frozen=True)
class RenameCaption(grain.transforms.Map):
    key: str

    def map(self, example: dict[str, Any]) -> dict[str, Any]:
        if images.is_skip_marker(example) or self.key == "caption":
            return example
        example = dict(example)
        example["caption"] = example.pop(self.key)
        return example


@dataclasses.dataclass(frozen=True)
class Tokenize(grain.transforms.Map):
    """caption -> input_ids / attention_mask (int32 [L]); hard negatives -> hard_negative_ids / _mask ([K, L]).
    Captions longer than the context length are truncated (the end-of-text token is kept)."""

    tokenizer: Any
    context_length: int

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.context_length,
                                 return_tensors="np")
        return encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int32)

    def map(self, example: dict[str, Any]) -> dict[str, Any]:
        if images.is_skip_marker(example):
            return example
        example = dict(example)
        ids, mask = self._encode([example["caption"]])
        example["input_ids"], example["attention_mask"] = ids[0], mask[0]
        if HARD_NEGATIVES_KEY in example:
            example["hard_negative_ids"], example["hard_negative_mask"] = self._encode(
                list(example.pop(HARD_NEGATIVES_KEY)))
        return example


def caption_transforms(data_config: ml_collections.ConfigDict, caption_config: ml_collections.ConfigDict,
                       tokenizer: Any, context_length: int) -> list:
    """The grain transforms that turn preprocessed image examples into tokenized, captioned ones."""
    source = resolve_source(data_config, caption_config)
    transforms: list = []
    if source == "shapes_templates":
        transforms.append(ShapesTemplateCaptions(hard_negatives=caption_config.hard_negatives,
                                                 attribute_weights=tuple(caption_config.hard_negative_weights)))
    elif source == "feature":
        transforms.append(RenameCaption(key=caption_config.key))
    transforms.append(Tokenize(tokenizer=tokenizer, context_length=context_length))
    return transforms


def make_batch_iterator(data_config: ml_collections.ConfigDict, caption_config: ml_collections.ConfigDict,
                        tokenizer: Any, context_length: int, **kwargs) -> images.ImageBatchIterator:
    """`images.make_batch_iterator` with tokenized captions (same arguments, same resumable state)."""
    source = resolve_source(data_config, caption_config)
    return images.make_batch_iterator(
        data_config, transforms=caption_transforms(data_config, caption_config, tokenizer, context_length),
        with_captions=source == "sidecar", **kwargs)
