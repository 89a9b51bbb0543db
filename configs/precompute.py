"""Precompute VQGAN tokens and CLIP embeddings for the prior (clipgen_jax/precompute.py).

Command:   python tools/precompute.py --config=configs/precompute.py:PRESET [--config.vqgan=DIR --config.clip=NAME ...]
           Running it again computes only the missing shards. Read the result with clipgen_jax.data.precomputed.
Presets:
  shapes    Shapes train, validation and heldout (24,000 images) through the VQGAN in runs/vqgan and "shapes-clip":
            64 tokens, image and caption embeddings and the five attribute labels per image, to
            runs/precomputed/shapes_s32. 2 CPU cores; speed: benchmarks/results/RESULTS.md.
  imagenet  ImageNet (TFDS imagenet2012) at 256 px through the f16 VQGAN (configs/vqgan.py:imagenet_f16_16384) and
            OpenAI's ViT-B/32; 4 views per training image, float16 embeddings. Accelerators; not run in this project.
  emoji     runs/emoji/images (both parts, with their names) through runs/emoji/vqgan and the runs/emoji/clip CLIP, to
            runs/precomputed/emoji32. 2 CPU cores shared, 2026-12-06: 31 s for the 1,375 images.
  tiny      the `tiny` Shapes build's validation and heldout splits in small shards, for tests.
"""

import ml_collections

from clipgen_jax.data import images


def get_config(preset: str = "shapes") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = images.default_data_config()  # the image source; crop/flip stay off (augmentation is `views`)
    config.splits = ("train",)
    config.captions = "auto"  # "auto" | "none" | "sidecar" (folders' .txt files) | a TFDS text feature name
    config.vqgan = ml_collections.config_dict.placeholder(str)  # VQGAN training workdir or bundle
    config.clip = ml_collections.FieldReference("shapes-clip", field_type=str)  # Hub id, directory, packaged name
    config.output = ml_collections.ConfigDict(dict(data_dir="runs/precomputed", name="precomputed"))
    config.views = 1  # examples per image in `augmented_splits`: the center crop, then random crops + flips
    config.augmented_splits = ("train",)  # other splits get the center crop only
    config.seed = 0  # the random crops and flips
    config.embedding_dtype = "float32"  # "float16" halves the embeddings on disk
    config.compute_dtype = "float32"  # "bfloat16" on accelerators is faster but changes tokens near code boundaries
    config.batch_size = 256  # images per device step (a multiple of the local device count)
    config.shard_size = 4096  # source images per output file: the unit of resuming

    if preset == "shapes":
        config.data.update(source="shapes", name="s32", image_size=32)
        config.splits = ("train", "validation", "heldout")
        config.vqgan = "runs/vqgan"
        config.output.name = "shapes_s32"
    elif preset == "imagenet":
        config.data.update(source="tfds", name="imagenet2012", image_size=256, worker_count=8)
        config.splits = ("train", "validation")
        config.vqgan = "runs/vqgan_imagenet"
        config.clip = "openai/clip-vit-base-patch32"
        config.output.name = "imagenet_f16_vitb32"
        config.views = 4
        config.embedding_dtype = "float16"
        config.batch_size = 512
        config.shard_size = 10_000
    elif preset == "emoji":
        config.data.update(source="folder", folder="runs/emoji/images", image_size=32)
        config.splits = ("train", "validation")
        config.captions = "sidecar"
        config.vqgan = "runs/emoji/vqgan"
        config.clip = "runs/emoji/clip/export"
        config.output.name = "emoji32"
    elif preset == "tiny":
        config.data.update(source="shapes", name="tiny", image_size=32)
        config.splits = ("validation", "heldout")
        config.vqgan = None
        config.clip = None
        config.output.name = "tiny"
        config.batch_size = 32
        config.shard_size = 40
    else:
        raise ValueError(f"unknown preset {preset!r} for configs/precompute.py; use shapes, imagenet, emoji or tiny")
    return config
