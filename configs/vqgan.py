"""Stage 1: the VQGAN image tokenizer (training/vqgan.py); its export is what the later stages load.

Command:   python tools/train.py --config=configs/vqgan.py:PRESET --workdir=runs/vqgan
           python tools/evaluate.py vqgan --vqgan=runs/vqgan --split=heldout
Presets:
  shapes              f4 (8 x 8 tokens), 256 l2-normalised 8-d codes; 6000 steps of batch 8. 2 CPU cores, 2026-11-28:
                      9.6 min alone (576 s with compilation, 2 evaluations, export; 14.0 min on a slower machine).
                      2026-12-08 make demo (slower machine, --cpu_devices=2: 11.0 min with evaluation). Held-out:
                      PSNR 36.8 dB, codebook usage 100%, agreement 71.5% strict (94.7% lenient; 27.8% ambiguous).
  shapes_long         the same for 12000 steps. 2 CPU cores, 2026-12-08, --cpu_devices=2: about 19 min alone.
                      Validation: agreement 95.6% strict; held-out: PSNR 39.7 dB, agreement 90.9% strict (99.3%
                      lenient), 9.0% ambiguous.
  imagenet_f16_16384  the paper's tokenizer as taming's config (f16, 16384 codes, LPIPS + PatchGAN from step 250001);
                      8+ accelerators for days, not trained in this project. Needs ImageNet as TFDS and the LPIPS
                      weights (`python -m clipgen_jax.models.lpips --fetch`).
  coco_f16_16384      the same architecture on COCO (TFDS `coco/2017`). Not trained here.
  emoji               the shapes model on runs/emoji/images (tools/make_emoji_folder.py: 1,375 glyphs at 32 px), its
                      training part (1,243); 3000 steps of batch 8. 2 CPU cores shared with other jobs, 2026-12-06:
                      41.7 min (15.0 CPU-minutes). Validation part (132): PSNR 22.4 dB, SSIM 0.775, LPIPS 0.156,
                      all 256 codes used (docs/experiments.md, "Real images: emoji").
  tiny                a few steps of a very small model with the GAN on; seconds on a CPU, for tests.
"""

import ml_collections

from clipgen_jax import optimizer
from clipgen_jax.data import images
from clipgen_jax.training import loop


def _taming_f16(config: ml_collections.ConfigDict) -> None:
    config.model.update(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=256,
                        resolution=256, codebook_size=16384, code_dim=256, quantizer="vq", beta=0.25)
    config.data.update(image_size=256, crop="random", flip=True)
    config.loss.update(perceptual_weight=1.0, disc_weight=0.8, disc_start=250_001, l2_weight=0.0)
    config.quantizer.restart_dead_codes = False
    # taming: base_learning_rate 4.5e-6 scaled by the global batch (accumulate_grad_batches x GPUs x batch 12).
    config.train.update(steps=1_000_000, batch_size=96, eval_batch_size=32, log_every=100, eval_every=5000,
                        checkpoint_every=5000, ema_decay=0.0)
    config.optimizer.update(learning_rate=4.5e-6 * 96, disc_learning_rate=4.5e-6 * 96)


def get_config(preset: str = "shapes") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.stage = "vqgan"
    config.seed = 0
    config.data = images.default_data_config()
    config.mesh = loop.default_mesh_config()
    config.train = loop.default_train_config()
    config.train.ema_decay = 0.0  # > 0 keeps an EMA of the generator weights, used for evaluation and export
    config.model = ml_collections.ConfigDict(dict(
        ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), z_channels=64, resolution=32,
        codebook_size=1024, code_dim=16, quantizer="l2", beta=0.25, legacy_beta=False, norm_groups=32,
        encoder_attention=True))
    config.quantizer = ml_collections.ConfigDict(dict(
        restart_dead_codes=True, restart_every=100, restart_threshold=0.01, usage_decay=0.99,
        continuous_warmup_steps=0))  # > 0: decode unquantized latents for that many steps, then seed the codebook
    config.loss = ml_collections.ConfigDict(dict(
        # foreground_weight > 0: L1 / L2 weighted towards pixels unlike the image's border colour
        # (training/vqgan.foreground_weights), for small objects on plain backgrounds.
        l1_weight=1.0, l2_weight=1.0, gradient_weight=0.0, foreground_weight=0.0, perceptual_weight=0.0,
        codebook_weight=1.0,
        disc_weight=0.0, disc_start=0, gan_loss="hinge", disc_adaptive_max=1e4, disc_ndf=64, disc_layers=3,
        lpips_weights=ml_collections.config_dict.placeholder(str)))  # None: the default weights location
    config.optimizer = optimizer.default_config(learning_rate=4e-4, schedule="constant", b1=0.5, b2=0.9)
    config.optimizer.disc_learning_rate = 4e-4  # the discriminator's peak rate (same schedule and betas)

    if preset == "imagenet_f16_16384":
        _taming_f16(config)
        config.data.update(source="tfds", name="imagenet2012")
        config.train.eval_split = "validation"
    elif preset == "coco_f16_16384":
        _taming_f16(config)
        config.data.update(source="tfds", name="coco/2017")
        config.train.eval_split = "validation"
    elif preset in ("shapes", "shapes_long"):
        config.data.update(source="shapes", name="s32", image_size=32)
        # Sized for 2 CPU cores; 8 norm groups and 8-d codes measured better (docs/experiments.md, VQGAN).
        config.model.update(ch=32, num_res_blocks=1, norm_groups=8, code_dim=8)
        # 256 codes and a convolutional encoder: the prior models these tokens better (docs/experiments.md, VQGAN).
        config.model.update(codebook_size=256, encoder_attention=False)
        # Loss towards the small object and its edges, no LPIPS (7x the CPU step at 32 px): docs/experiments.md, VQGAN.
        config.loss.update(foreground_weight=10.0, gradient_weight=1.0)
        # A decay to 0 returns the background exact, which the oracle needs (docs/experiments.md, VQGAN).
        config.optimizer.update(learning_rate=1e-3, schedule="cosine", warmup_steps=100)
        # Small batches, many steps, at equal images seen (docs/experiments.md, VQGAN).
        config.train.update(steps=6000, batch_size=8, eval_batch_size=64, log_every=100, eval_every=3000,
                            checkpoint_every=3000)
        if preset == "shapes_long":  # crisper small shapes for twice the time (docs/experiments.md, VQGAN)
            config.train.update(steps=12000, eval_every=6000)
    elif preset == "emoji":
        config.data.update(source="folder", folder="runs/emoji/images", image_size=32)
        config.model.update(ch=32, num_res_blocks=1, norm_groups=8, code_dim=8, codebook_size=256,
                            encoder_attention=False)
        config.loss.gradient_weight = 1.0  # glyphs fill the frame: no foreground weighting
        config.optimizer.update(learning_rate=1e-3, schedule="cosine", warmup_steps=100)
        config.train.update(steps=3000, batch_size=8, eval_batch_size=64, log_every=100, eval_every=1500,
                            checkpoint_every=1500)
    elif preset == "tiny":
        config.data.update(source="shapes", name="tiny", image_size=32)
        config.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), z_channels=32,
                            codebook_size=64, code_dim=8)
        config.quantizer.restart_every = 5
        config.loss.update(disc_weight=0.5, disc_start=4, disc_ndf=16, disc_layers=2)
        config.train.update(steps=12, batch_size=8, eval_batch_size=8, log_every=4, eval_every=6,
                            checkpoint_every=6, ema_decay=0.9)
    else:
        raise ValueError(f"unknown preset {preset!r} for configs/vqgan.py; use imagenet_f16_16384, coco_f16_16384, "
                         f"shapes, shapes_long, emoji or tiny")
    return config
