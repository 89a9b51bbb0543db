"""A CLIP of your own: transformers' FlaxCLIPModel trained with the symmetric InfoNCE loss (training/clip.py).

Command:   python tools/train.py --config=configs/clip.py:PRESET --workdir=runs/clip
           runs/clip/export then loads like a Hub CLIP: clipgen_jax.models.clip.load("runs/clip/export").
Presets:
  shapes       the shipped "shapes-clip": ViT (patch 4, 3 x 128) and text transformer (3 x 128), 6500 steps of
               batch 64, 4 hard-negative captions per image. 2 CPU cores, 2026-11-27: 62.8 min shared (~50 alone).
               Scores (zero-shot attributes 99.15-100% on held-out images): clipgen_jax/assets/clip/README.md.
  shapes_eval  the same with another seed and data order: "shapes-clip-eval", which only scores generated images.
  vit_b32      OpenAI's ViT-B/32 from scratch on captioned data of your own (set data.*); accelerators. Not trained.
  finetune     fine-tunes a loaded CLIP (model.init_from, default openai/clip-vit-base-patch32) on your captions.
  emoji        a domain CLIP on the Unicode names beside runs/emoji/images (sidecar captions), training part only:
               ViT and text transformer 2 x 128, 64-d, 800 steps of batch 64. 2 CPU cores shared, 2026-12-06: 9.4 min.
               Validation part (132 pairs): retrieval top-1 6.1%, top-5 18.2% either way (chance 0.8%, 3.8%).
  emoji_eval   the same on every image (data.validation_fraction=0) with seed 1: scores generated emoji (13.4 min).
  tiny         a 1-layer model on the `tiny` Shapes build; seconds on a CPU, for tests.
"""

import ml_collections

from clipgen_jax import optimizer
from clipgen_jax.data import captions, images
from clipgen_jax.training import clip, loop


def get_config(preset: str = "shapes") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.stage = "clip"
    config.seed = 0
    config.data = images.default_data_config()
    config.captions = captions.default_caption_config()
    config.mesh = loop.default_mesh_config()
    config.train = loop.default_train_config()
    config.model = clip.default_model_config()
    config.optimizer = optimizer.default_config(learning_rate=5e-4, warmup_steps=2000, b1=0.9, b2=0.98,
                                                weight_decay=0.2, grad_clip_norm=1.0)
    config.eval = ml_collections.ConfigDict(dict(shapes_zero_shot=True))
    config.export_dtype = "float32"  # "float16" halves the export (the shipped Shapes CLIPs use it)

    if preset in ("shapes", "shapes_eval"):
        # One grain worker process: caption drawing in the training process's threads slows it 1.6x on 2 cores.
        config.data.update(source="shapes", name="s32", image_size=32, worker_count=1)
        config.captions.hard_negatives = 4
        # Mostly position, then shape: the attributes in-batch negatives teach slowest (docs/experiments.md, CLIP).
        config.captions.hard_negative_weights = (1.0, 0.25, 0.25, 3.0, 0.25)
        # 20 tokens hold every Shapes training caption (the longest template with "bottom right" is exactly 20).
        config.model.update(image_size=32, patch_size=4, vision_width=128, vision_layers=3, vision_heads=4,
                            text_width=128, text_layers=3, text_heads=4, context_length=20, projection_dim=128,
                            hidden_act="gelu")
        config.optimizer.update(learning_rate=1e-3, warmup_steps=200, final_lr_fraction=0.05, weight_decay=0.1)
        config.train.update(steps=6500, batch_size=64, eval_batch_size=500, log_every=100, eval_every=1000,
                            checkpoint_every=1000)
        config.export_dtype = "float16"
        if preset == "shapes_eval":
            config.seed = 1
    elif preset in ("emoji", "emoji_eval"):
        config.data.update(source="folder", folder="runs/emoji/images", image_size=32)
        # Noto Color Emoji's Unicode names are at most 18 CLIP tokens with the start and end tokens.
        config.model.update(image_size=32, patch_size=4, vision_width=128, vision_layers=2, vision_heads=4,
                            text_width=128, text_layers=2, text_heads=4, context_length=18, projection_dim=64,
                            hidden_act="gelu")
        config.optimizer.update(learning_rate=1e-3, warmup_steps=100, final_lr_fraction=0.05, weight_decay=0.1)
        config.train.update(steps=800, batch_size=64, eval_batch_size=128, log_every=100, eval_every=400,
                            checkpoint_every=400)
        if preset == "emoji_eval":
            config.seed = 1
            config.data.validation_fraction = 0.0
    elif preset == "vit_b32":
        config.data.update(source="tfds", name="coco_captions", image_size=224, crop="random")
        config.train.update(steps=100_000, batch_size=4096, eval_batch_size=1024, eval_every=5000,
                            checkpoint_every=5000)
    elif preset == "finetune":
        config.model.init_from = "openai/clip-vit-base-patch32"
        config.data.update(source="folder", image_size=224, crop="random", flip=True)
        config.optimizer.update(learning_rate=1e-5, warmup_steps=500, weight_decay=0.1)
        config.train.update(steps=5000, batch_size=256, eval_every=1000, checkpoint_every=1000)
    elif preset == "tiny":
        config.data.update(source="shapes", name="tiny", image_size=32)
        config.captions.hard_negatives = 2
        config.model.update(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                            text_width=32, text_layers=1, text_heads=2, context_length=24, projection_dim=16,
                            hidden_act="gelu")
        config.optimizer.update(learning_rate=1e-3, warmup_steps=2)
        config.train.update(steps=6, batch_size=8, eval_batch_size=8, log_every=2, eval_every=3, checkpoint_every=3)
    else:
        raise ValueError(f"unknown preset {preset!r} for configs/clip.py; use shapes, shapes_eval, vit_b32, "
                         "finetune, emoji, emoji_eval or tiny")
    return config
