"""Stage 1: the VQGAN image tokenizer.

Command:   python tools/train.py --config=configs/vqgan.py:PRESET --workdir=runs/vqgan
           (the finished run exports its inference weights to runs/vqgan/export, which later stages load)
Presets:
  imagenet_f16_16384  the paper's tokenizer: 256 px, ch 128, ch_mult (1,1,2,2,4) = f16 (16x16 tokens), 2 res blocks,
                      attention at 16, z 256, codebook 16384 x 256, LPIPS + hinge PatchGAN from step 250001 as
                      taming's config. Hardware: 8+ accelerators for days (taming trained ~ 1M+ steps).
                      Needs ImageNet as TFDS (array_record) in --config.data.data_dir and the LPIPS weights
                      (`python -m clipgen_jax.models.lpips --fetch`).
  coco_f16_16384      the same architecture on COCO images (TFDS `coco/2017`), as CLIP-GEN's COCO model.
  shapes              the canonical Shapes world (S = 32): f4 (an 8x8 token grid), 256 l2-normalised 8-d codes with
                      dead-code restarts, a convolutional encoder, L1 + L2 loss weighted towards the object plus an
                      image-gradient loss (no LPIPS: at 32 px it costs 7x per CPU step), 6000 steps of batch 8,
                      cosine decay from 1e-3. 2 CPU cores: 9.6 min (576 s) alone with compilation, 2 evaluations
                      and export (2026-11-28), 14.0 min (842 s) on a slower machine; heldout PSNR 36.5 dB, codebook
                      usage 100%, oracle agreement 92.2% (94.0% on the slower machine: README "Shapes results").
                      Evaluate with `python tools/evaluate.py vqgan --vqgan=runs/vqgan`.
  tiny                a few steps of a very small model on the `tiny` Shapes build, with the GAN on: for tests.
"""

import ml_collections

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
    config.optimizer = ml_collections.ConfigDict(dict(learning_rate=4e-4, disc_learning_rate=4e-4, b1=0.5, b2=0.9,
                                                      schedule="constant", warmup_steps=0))

    if preset == "imagenet_f16_16384":
        _taming_f16(config)
        config.data.update(source="tfds", name="imagenet2012")
        config.train.eval_split = "validation"
    elif preset == "coco_f16_16384":
        _taming_f16(config)
        config.data.update(source="tfds", name="coco/2017")
        config.train.eval_split = "validation"
    elif preset == "shapes":
        config.data.update(source="shapes", name="s32", image_size=32)
        # Sized for 2 CPU cores (~85 training images/s): one res block per level and 32 base channels; 8 norm groups
        # (not taming's 32, which would normalise each of 32 channels alone) and 8-d codes, both better in probes.
        config.model.update(ch=32, num_res_blocks=1, norm_groups=8, code_dim=8)
        # What the prior has to model: 256 codes instead of 1024 (with a convolutional encoder) raised the prior's
        # re-ranked held-out all-attribute accuracy from 42% to 50-58% on the same prior recipe, at some cost in
        # oracle agreement (README "Shapes results").
        config.model.update(codebook_size=256, encoder_attention=False)
        # The object covers 2.5-8% of the pixels; weighting the loss towards it measured better on every attribute
        # (held-out oracle agreement 52.8% vs 47.9%, PSNR 33.5 vs 31.5 dB). The oracle reads faint background noise
        # as object coverage, so the background has to come back exact: a cosine decay to 0 (agreement 73.8% vs
        # 51.3% on 480 fresh held-out renders) and the image-gradient loss, which counts a blurred edge in full
        # (86.7%), get it most of the way (README "Shapes results").
        config.loss.update(foreground_weight=10.0, gradient_weight=1.0)
        config.optimizer.update(learning_rate=1e-3, schedule="cosine", warmup_steps=100)
        # Small batches, many steps: with the same images seen, batch 16 x 3400 steps took held-out agreement from
        # 83.2% (batch 32 x 1700) to 94.3% and batch 8 x 6800 to 97.5% (README "Shapes results"); 6000 steps of
        # batch 8 fit the 12 minutes. Each evaluation + checkpoint costs ~14 s of them: two.
        config.train.update(steps=6000, batch_size=8, eval_batch_size=64, log_every=100, eval_every=3000,
                            checkpoint_every=3000)
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
                         f"shapes or tiny")
    return config
