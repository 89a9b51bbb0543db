"""Stage 1: the VQGAN tokenizer, trained as taming-transformers does, on the shared loop.

Generator loss: L1 (+ optional L2) reconstruction + perceptual (LPIPS) + quantizer terms + an adaptively weighted GAN
term, weight = ||grad_last rec|| / (||grad_last gan|| + 1e-4), clamped, times disc_weight, from `disc_start` on.
The discriminator (PatchGAN) has its own Adam optimizer. One jitted step updates both.

The adaptive weight only needs gradients at the decoder's last convolution, so the step backpropagates each loss to
the reconstruction, takes the two last-layer gradients from that convolution alone, and then runs one backward pass
through the generator with the combined cotangent (taming runs two extra partial backward passes instead).
"""

from __future__ import annotations

import pathlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from clipgen_jax import checkpointing, optimizer, parallel
from clipgen_jax.evaluation import image_metrics
from clipgen_jax.models import discriminator as discriminator_lib
from clipgen_jax.models import lpips, quantizers, vqgan
from clipgen_jax.training import loop

@flax.struct.dataclass
class VQGANState:
    step: jax.Array
    params: Any  # generator (encoder, quantizer, decoder)
    opt_state: Any
    disc_params: Any  # None (and its optimizer state None) when the GAN term is off
    disc_opt_state: Any
    ema_params: Any  # exponential moving average of `params`; None when train.ema_decay is 0
    code_usage: jax.Array  # [K] moving average of how often each code is chosen per step (dead-code restarts)
    rng: jax.Array


def check_image_size(model: vqgan.VQGAN, image_size: int) -> None:
    if image_size != model.resolution:
        raise ValueError(
            f"data.image_size={image_size} but this VQGAN preset is built for {model.resolution} px images; set "
            f"--config.data.image_size={model.resolution} or choose a preset for {image_size} px")


def _image_gradient_l1(images_BHWC, reconstructions_BHWC):
    """L1 between horizontal and vertical pixel differences: the loss lives on edges and corners, which a plain
    per-pixel loss weighs by their (small) area."""
    def differences(x):
        return x[:, 1:, :, :] - x[:, :-1, :, :], x[:, :, 1:, :] - x[:, :, :-1, :]

    (dy_a, dx_a), (dy_b, dx_b) = differences(images_BHWC), differences(reconstructions_BHWC)
    return jnp.mean(jnp.abs(dy_a - dy_b)) + jnp.mean(jnp.abs(dx_a - dx_b))


def foreground_weights(images_BHWC: jax.Array, strength: float) -> jax.Array:
    """Per-pixel loss weights [B, H, W, 1]: 1 + strength x the pixel's distance (0..1) from the image's background
    colour (the per-channel median of its border pixels), dilated by one pixel.

    On images of a small object on a plain background (Shapes: 2.5% of the pixels for a small one) a plain mean
    weighs the object, whose outline decides its shape, by its area; this spends the loss where the content is. The
    one-pixel dilation covers the background just outside the outline, where a blurred corner shows."""
    border_BN3 = jnp.concatenate([images_BHWC[:, 0], images_BHWC[:, -1], images_BHWC[:, 1:-1, 0],
                                  images_BHWC[:, 1:-1, -1]], axis=1)
    background_B113 = jnp.median(border_BN3, axis=1)[:, None, None, :]
    distance_BHW1 = jnp.mean(jnp.abs(images_BHWC - background_B113), axis=-1, keepdims=True) / 2.0
    dilated_BHW1 = jax.lax.reduce_window(distance_BHW1, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")
    return jax.lax.stop_gradient(1.0 + strength * dilated_BHW1)


class VQGANStage:

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.model = vqgan.from_config(config.model, parallel.compute_dtype(config.train.compute_dtype))
        check_image_size(self.model, config.data.image_size)
        loss = config.loss
        self.use_gan = loss.disc_weight > 0
        self.use_perceptual = loss.perceptual_weight > 0
        if self.use_perceptual:
            self.lpips_params = lpips.load_params(loss.lpips_weights)  # a clear error names the fetch command
        self.discriminator = discriminator_lib.NLayerDiscriminator(
            ndf=loss.disc_ndf, n_layers=loss.disc_layers, dtype=self.model.dtype, param_dtype=jnp.float32)
        self.optimizer, _ = optimizer.make(config.optimizer, config.train.steps)
        self.disc_optimizer, _ = optimizer.make(config.optimizer, config.train.steps,
                                                peak=config.optimizer.disc_learning_rate)

    # ---------------------------------------------------------------------------------------------------------------
    def init_state(self, rng: jax.Array) -> VQGANState:
        gen_rng, disc_rng, state_rng = jax.random.split(rng, 3)
        size = self.model.resolution
        params = vqgan.init_params(self.model, gen_rng)
        disc_params = disc_opt_state = None
        if self.use_gan:
            disc_params = self.discriminator.init(disc_rng, jnp.zeros((1, size, size, 3)))["params"]
            disc_opt_state = self.disc_optimizer.init(disc_params)
        return VQGANState(
            step=jnp.asarray(0, jnp.int32), params=params, opt_state=self.optimizer.init(params),
            disc_params=disc_params, disc_opt_state=disc_opt_state,
            ema_params=params if self.config.train.ema_decay > 0 else None,
            code_usage=jnp.ones((self.model.codebook_size,), jnp.float32), rng=state_rng)

    def _reconstruction_loss(self, images, reconstructions):
        loss = self.config.loss
        if loss.foreground_weight > 0:
            weights = foreground_weights(images, loss.foreground_weight)

            def pixel_mean(error_BHWC):  # a weighted mean, on the scale of a plain one
                return jnp.mean(weights * error_BHWC) / jnp.mean(weights)
        else:
            pixel_mean = jnp.mean
        terms = {"l1": pixel_mean(jnp.abs(images - reconstructions))}
        total = loss.l1_weight * terms["l1"]
        if loss.l2_weight > 0:
            terms["l2"] = pixel_mean(jnp.square(images - reconstructions))
            total += loss.l2_weight * terms["l2"]
        if loss.gradient_weight > 0:
            terms["gradient"] = _image_gradient_l1(images, reconstructions)
            total += loss.gradient_weight * terms["gradient"]
        if self.use_perceptual:
            terms["perceptual"] = jnp.mean(
                lpips.lpips_distance(self.lpips_params, images, reconstructions, dtype=self.model.dtype))
            total += loss.perceptual_weight * terms["perceptual"]
        return total, terms

    def _adaptive_gan_weight(self, last_layer_input, kernel, rec_cotangent, gan_cotangent):
        """||d rec / d W_last|| / (||d gan / d W_last|| + 1e-4), clamped: the gradients at the decoder's last conv."""

        def last_conv(w):
            return jax.lax.conv_general_dilated(last_layer_input.astype(jnp.float32), w, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))

        _, conv_vjp = jax.vjp(last_conv, kernel.astype(jnp.float32))
        rec_norm = jnp.linalg.norm(conv_vjp(rec_cotangent)[0])
        gan_norm = jnp.linalg.norm(conv_vjp(gan_cotangent)[0])
        weight = discriminator_lib.adaptive_gan_weight(rec_norm, gan_norm, self.config.loss.disc_adaptive_max)
        return jax.lax.stop_gradient(weight)

    def train_step(self, state: VQGANState, batch: dict) -> tuple[VQGANState, loop.Metrics]:
        cfg = self.config
        images = batch["image"]
        step_rng = jax.random.fold_in(state.rng, state.step)

        continuous = state.step < cfg.quantizer.continuous_warmup_steps

        def generator(params):
            (reconstructions, indices, q_losses, latents), variables = self.model.apply(
                {"params": params}, images, continuous, mutable=["intermediates"])
            last_input = variables["intermediates"]["decoder"][vqgan.LAST_LAYER_INPUT][0]
            return (reconstructions, q_losses["total"]), (indices, q_losses, latents, last_input)

        (reconstructions, q_total), generator_vjp, (indices, q_losses, latents, last_input) = jax.vjp(
            generator, state.params, has_aux=True)
        (rec_loss, rec_terms), rec_cotangent = jax.value_and_grad(
            lambda r: self._reconstruction_loss(images, r), has_aux=True)(reconstructions)
        metrics = {**rec_terms, "codebook_loss": q_losses["codebook"], "commitment_loss": q_losses["commitment"]}
        loss = rec_loss + cfg.loss.codebook_weight * q_total
        cotangent = rec_cotangent

        disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
        if self.use_gan:
            gan_on = (state.step >= cfg.loss.disc_start).astype(jnp.float32)

            def generator_gan_loss(r):
                return discriminator_lib.generator_loss(
                    self.discriminator.apply({"params": state.disc_params}, r), cfg.loss.gan_loss)

            gan_loss, gan_cotangent = jax.value_and_grad(generator_gan_loss)(reconstructions)
            kernel = state.params["decoder"]["conv_out"]["kernel"]
            d_weight = self._adaptive_gan_weight(last_input, kernel, rec_cotangent, gan_cotangent)
            gan_scale = d_weight * cfg.loss.disc_weight * gan_on
            loss += gan_scale * gan_loss
            cotangent = rec_cotangent + gan_scale * gan_cotangent

            def disc_loss_fn(d_params):
                real = self.discriminator.apply({"params": d_params}, images)
                fake = self.discriminator.apply({"params": d_params}, jax.lax.stop_gradient(reconstructions))
                return gan_on * discriminator_lib.discriminator_loss(real, fake, cfg.loss.gan_loss), (real, fake)

            (disc_loss, (real, fake)), disc_grads = jax.value_and_grad(disc_loss_fn, has_aux=True)(disc_params)
            disc_updates, disc_opt_state = self.disc_optimizer.update(disc_grads, disc_opt_state, disc_params)
            disc_params = optax.apply_updates(disc_params, disc_updates)
            metrics.update(gan_loss=gan_loss, adaptive_weight=d_weight, disc_loss=disc_loss,
                           logits_real=jnp.mean(real), logits_fake=jnp.mean(fake))

        grads = generator_vjp((cotangent, jnp.asarray(cfg.loss.codebook_weight, q_total.dtype)))[0]
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        counts = quantizers.code_usage_counts(indices, self.model.codebook_size)
        decay = cfg.quantizer.usage_decay
        code_usage = decay * state.code_usage + (1.0 - decay) * counts
        # When the continuous warm-up ends, every code is re-seeded from current latents (all count as dead), so the
        # codebook starts where the encoder's outputs are.
        warmup_ends = state.step + 1 == cfg.quantizer.continuous_warmup_steps
        threshold = jnp.where(warmup_ends, jnp.inf, cfg.quantizer.restart_threshold)
        restart_now = warmup_ends
        if cfg.quantizer.restart_dead_codes:
            restart_now |= (state.step + 1) % cfg.quantizer.restart_every == 0
        restarted = quantizers.restart_dead_codes(
            params["quantize"]["codebook"], code_usage, latents.reshape(-1, latents.shape[-1]), step_rng, threshold)
        params["quantize"]["codebook"] = jnp.where(restart_now, restarted, params["quantize"]["codebook"])
        code_usage = jnp.where(restart_now & (code_usage < threshold), 1.0, code_usage)

        ema_params = state.ema_params
        if ema_params is not None:
            ema_params = optax.incremental_update(params, ema_params, 1.0 - cfg.train.ema_decay)

        probabilities = counts / counts.sum()
        metrics.update(
            loss=loss, grad_norm=optax.tree.norm(grads),
            psnr=jnp.mean(image_metrics.psnr(reconstructions, images)),
            batch_code_usage=jnp.mean(counts > 0),
            batch_perplexity=jnp.exp(-jnp.sum(probabilities * jnp.log(jnp.maximum(probabilities, 1e-10)))))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, disc_params=disc_params,
                                  disc_opt_state=disc_opt_state, ema_params=ema_params, code_usage=code_usage)
        return new_state, metrics

    def inference_params(self, state: VQGANState):
        return state.ema_params if state.ema_params is not None else state.params

    def eval_step(self, state: VQGANState, batch: dict):
        images = batch["image"]
        reconstructions, indices, _, _ = self.model.apply({"params": self.inference_params(state)}, images)
        shown = 16
        pairs = jnp.stack([images[:shown], reconstructions[:shown]], axis=1).reshape((-1,) + images.shape[1:])
        scalars = {"psnr": jnp.mean(image_metrics.psnr(reconstructions, images)),
                   "l1": jnp.mean(jnp.abs(images - reconstructions))}
        return scalars, {"inputs_vs_reconstructions": pairs}


def train(config: ml_collections.ConfigDict, workdir: str) -> VQGANState:
    """Trains, then exports the inference weights (EMA when kept) as a bundle in `workdir/export`."""
    stage = VQGANStage(config)
    state = loop.run(config, workdir, stage)
    params = parallel.to_host(stage.inference_params(state))  # every process: a collective under FSDP
    if jax.process_index() == 0:
        metadata = {"kind": "vqgan", "model": config.model.to_dict(), "step": int(state.step),
                    "data": config.data.to_dict()}
        checkpointing.save_bundle(pathlib.Path(workdir) / checkpointing.EXPORT_DIR, params, metadata,
                                  overwrite=True)
    return state
