"""The minimal real stage: a convolutional autoencoder trained with an L1 + L2 reconstruction loss.

It is a complete, small stage on the shared loop (the same data, mesh, checkpoint and logging path that the VQGAN and
the prior use), cheap enough to train in tests on two CPU cores.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from clipgen_jax import optimizer, parallel
from clipgen_jax.evaluation import image_metrics
from clipgen_jax.models import autoencoder
from clipgen_jax.training import loop


class AutoencoderStage:

    def __init__(self, config: ml_collections.ConfigDict):
        self.image_size = config.data.image_size
        self.model = autoencoder.ConvAutoencoder(
            widths=tuple(config.model.widths), latent_channels=config.model.latent_channels,
            dtype=parallel.compute_dtype(config.train.compute_dtype), param_dtype=jnp.float32)
        self.optimizer, _ = optimizer.make(config.optimizer, config.train.steps)

    def init_state(self, rng: jax.Array) -> loop.TrainState:
        init_rng, state_rng = jax.random.split(rng)
        params = self.model.init(init_rng, jnp.zeros((1, self.image_size, self.image_size, 3)))["params"]
        return loop.TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=self.optimizer.init(params),
                               rng=state_rng)

    def _loss(self, params, images_BHWC):
        reconstructions = self.model.apply({"params": params}, images_BHWC)
        error = reconstructions - images_BHWC
        loss = jnp.mean(jnp.abs(error)) + jnp.mean(jnp.square(error))
        return loss, reconstructions

    def train_step(self, state: loop.TrainState, batch: dict) -> tuple[loop.TrainState, loop.Metrics]:
        (loss, reconstructions), grads = jax.value_and_grad(self._loss, has_aux=True)(state.params, batch["image"])
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "psnr": jnp.mean(image_metrics.psnr(reconstructions, batch["image"]))}
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), metrics

    def eval_step(self, state: loop.TrainState, batch: dict):
        loss, reconstructions = self._loss(state.params, batch["image"])
        shown = 16
        # Input and reconstruction side by side: rows alternate in the logged grid.
        pairs = jnp.stack([batch["image"][:shown], reconstructions[:shown]], axis=1).reshape(
            (-1,) + reconstructions.shape[1:])
        return {"loss": loss, "psnr": jnp.mean(image_metrics.psnr(reconstructions, batch["image"]))}, \
            {"inputs_vs_reconstructions": pairs}


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.TrainState:
    return loop.run(config, workdir, AutoencoderStage(config))
