"""The minimal stage: a small convolutional autoencoder on Shapes, which exercises the shared training loop.

Command:   python tools/train.py --config=configs/autoencoder.py:PRESET --workdir=runs/autoencoder
Presets:
  shapes   canonical Shapes (32 px), 600 steps of batch 32; 2 CPU cores, about 1-2 minutes.
  tiny     the `tiny` Shapes build, 20 steps of batch 8; seconds, for tests.
"""

import ml_collections

from clipgen_jax import optimizer
from clipgen_jax.data import images
from clipgen_jax.training import loop


def get_config(preset: str = "shapes") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.stage = "autoencoder"
    config.seed = 0
    config.data = images.default_data_config()
    config.data.source = "shapes"
    config.data.name = "s32"
    config.data.image_size = 32
    config.data.crop = "center"
    config.data.flip = False
    config.mesh = loop.default_mesh_config()
    config.train = loop.default_train_config()
    config.model = ml_collections.ConfigDict(dict(widths=(32, 64), latent_channels=16))
    config.optimizer = optimizer.default_config(learning_rate=3e-3, warmup_steps=50, grad_clip_norm=1.0)

    if preset == "shapes":
        config.train.update(steps=600, batch_size=32, log_every=50, eval_every=200, checkpoint_every=200)
    elif preset == "tiny":
        config.data.name = "tiny"
        config.model.update(widths=(8, 16), latent_channels=4)
        config.optimizer.warmup_steps = 2
        config.train.update(steps=20, batch_size=8, eval_batch_size=8, log_every=5, eval_every=10,
                            checkpoint_every=5)
    else:
        raise ValueError(f"unknown preset {preset!r} for configs/autoencoder.py; use 'shapes' or 'tiny'")
    return config
