"""VQGAN+CLIP, the optimisation-based baseline CLIP-GEN is compared with: no generator is trained; for each prompt the
VQGAN's latent grid is optimised until the decoded image matches the prompt in CLIP's embedding space.

    from clipgen_jax.vqgan_clip import VQGANCLIP
    method = VQGANCLIP.load("runs/shapes/vqgan", "shapes-clip")
    images_PKHWC, scores_PK = method.generate(["a small red circle in the top left on a black background"],
                                              num_candidates=4, keep=1, seed=0)

`generate` takes and returns what `Pipeline.generate` does (uint8 images [P, keep, H, W, 3], CLIP scores [P, keep]
best first, scored by `pipeline.decode_and_score`), so an evaluation can call either method.

The recipe of the classic VQGAN+CLIP notebooks: a continuous latent z [B, h, w, code_dim] starts from random codebook
entries, or the encoding of a random image (uniform noise, or one random colour: the default); every step snaps it
to the nearest codes with a straight-through estimator, decodes, cuts `cutouts` random crops out of the image
(resized to CLIP's input, with a little noise and optional flips) and takes an Adam step on z towards a higher mean
CLIP cosine similarity to the prompt. The output is the image of the final snapped codes, i.e. exactly the VQGAN's
decoding of a token grid, like the prior's samples.
"""

from __future__ import annotations

import dataclasses
import numbers
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipgen_jax import checkpointing, numerics, pipeline, sampling
from clipgen_jax.models import clip as clip_lib
from clipgen_jax.models import vqgan as vqgan_lib

# Where the latents start: iid random codebook entries, the encoding of uniform pixel noise, or the encoding of a
# plain image of one random colour (a blank canvas).
INITS = ("codes", "noise", "flat")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The optimisation's hyper-parameters. The defaults are sized by cost for the 32 px Shapes world on a 2-core CPU
    (96 prompts x 4 candidates in a few minutes): a sweep on 8 held-out prompts (steps 40-100, learning rate
    0.05-0.2, 1-8 cutouts, crop scale 0.7-1, noise 0-0.15, all three inits) found no setting that gets any prompt's
    five attributes right with the Shapes oracle, while the conditioning CLIP's similarity rose with every extra step
    (to 0.95; true renderings score 0.98-0.99): on a CLIP trained on 20,000 clean images, more optimisation only makes
    more adversarial images.

    `cut_scale`: the smallest cutout side as a fraction of the image side (1 = whole-image views only). Shapes
    attributes include position and size, which crops and flips change, so both stay mild by default."""

    steps: int = 30
    learning_rate: float = 0.1
    cutouts: int = 2
    cut_scale: float = 0.9
    noise: float = 0.05
    flip: bool = False
    init: str = "flat"

    def __post_init__(self):
        if not (isinstance(self.steps, numbers.Integral) and self.steps >= 1):
            raise ValueError(f"steps={self.steps} must be a positive integer")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
        if not (isinstance(self.cutouts, numbers.Integral) and self.cutouts >= 1):
            raise ValueError(f"cutouts={self.cutouts} must be a positive integer")
        if not 0 < self.cut_scale <= 1:
            raise ValueError(f"cut_scale={self.cut_scale} must be in (0, 1]")
        if not self.noise >= 0:
            raise ValueError(f"noise={self.noise} must be >= 0")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} must be one of {INITS}")


def _resample_matrix(start: jax.Array, size: jax.Array, in_size: int, out_size: int) -> jax.Array:
    """[out, in] linear-interpolation weights that map pixels [start, start + size) of an axis onto `out_size` pixels,
    with a triangle kernel widened when shrinking (an antialiased bilinear resize). Traced start and size keep one
    compiled shape for every random crop; normalising each row clamps at the image edge."""
    scale = jnp.maximum(size / out_size, 1.0)
    source_O = start + (jnp.arange(out_size) + 0.5) * size / out_size - 0.5
    weights_OI = jnp.maximum(0.0, 1.0 - jnp.abs(source_O[:, None] - jnp.arange(in_size)[None, :]) / scale)
    return weights_OI / jnp.sum(weights_OI, axis=1, keepdims=True)


def cutouts(images_BHWC: jax.Array, key: jax.Array, settings: Settings, out_size: int) -> jax.Array:
    """`settings.cutouts` random square crops of each image, resized to `out_size`: [B, C, out, out, 3].
    Differentiable with respect to the images; `key` is one key per image [B, 2], so a row's augmentations do not
    depend on what else is in its batch."""
    _, height, width, _ = images_BHWC.shape
    side = min(height, width)

    def matrices(row_key):
        scale_key, y_key, x_key, flip_key = jax.random.split(row_key, 4)
        count = settings.cutouts
        size_C = side * jax.random.uniform(scale_key, (count,), minval=settings.cut_scale, maxval=1.0)
        top_C = jax.random.uniform(y_key, (count,)) * (height - size_C)
        left_C = jax.random.uniform(x_key, (count,)) * (width - size_C)
        rows_COH = jax.vmap(lambda t, s: _resample_matrix(t, s, height, out_size))(top_C, size_C)
        cols_COW = jax.vmap(lambda t, s: _resample_matrix(t, s, width, out_size))(left_C, size_C)
        if settings.flip:
            flipped_C = jax.random.bernoulli(flip_key, 0.5, (count,))
            cols_COW = jnp.where(flipped_C[:, None, None], cols_COW[:, ::-1], cols_COW)
        return rows_COH, cols_COW

    rows_BCOH, cols_BCOW = jax.vmap(matrices)(key)
    crops = jnp.einsum("bcoh,bhwk,bcpw->bcopk", rows_BCOH, images_BHWC, cols_BCOW)
    noise_key = jax.vmap(lambda k: jax.random.fold_in(k, 1))(key)
    noise = jax.vmap(lambda k: jax.random.normal(k, crops.shape[1:]))(noise_key)
    return crops + settings.noise * noise


def _clip_straight_through(images: jax.Array) -> jax.Array:
    """Clipped to [-1, 1] forward, as the saved uint8 image is; identity backward, so a pixel that overshoots (a black
    background decodes slightly below -1) still gets the gradient that would bring it back."""
    return images + jax.lax.stop_gradient(jnp.clip(images, -1.0, 1.0) - images)


@dataclasses.dataclass
class VQGANCLIP:
    """A VQGAN whose latents are optimised and the CLIP that steers them and re-ranks the results."""

    vqgan: vqgan_lib.VQGAN
    vqgan_params: Any
    clip: clip_lib.CLIP

    def __post_init__(self):
        self.grid_shape = (self.vqgan.resolution // self.vqgan.downsample_factor,) * 2
        # One compilation per Settings (they are static: steps and cutouts fix shapes and the loop length).
        self._optimise = jax.jit(self._optimise_fn, static_argnames=("settings",))

    @classmethod
    def load(cls, vqgan: str | pathlib.Path, clip: str, *, dtype: Any = jnp.float32) -> VQGANCLIP:
        """From a VQGAN workdir or bundle and a CLIP (Hub id, directory or packaged name)."""
        vqgan_model, vqgan_params, _ = checkpointing.load_vqgan(vqgan, dtype)
        return cls(vqgan=vqgan_model, vqgan_params=vqgan_params, clip=clip_lib.load(clip, dtype=dtype))

    @property
    def image_size(self) -> int:
        return self.vqgan.resolution

    # -- the optimisation, a pure function of (params, queries, keys) ------------------------------------------------

    def _snap_and_decode(self, vqgan_params, latents_BhwD):
        """Nearest codes in the forward pass, the gradient passed straight through to the continuous latents."""
        quantized, _, _ = self.vqgan.apply({"params": vqgan_params}, latents_BhwD, method=self.vqgan.quantize_latents)
        return self.vqgan.apply({"params": vqgan_params}, quantized, method=self.vqgan.decode_codes)

    def _initial_latents(self, vqgan_params, key_B2, init: str):
        def one(row_key):
            if init == "codes":
                codes = jax.random.randint(row_key, self.grid_shape, 0, self.vqgan.codebook_size)
                return jnp.take(self.vqgan.apply({"params": vqgan_params}, method=self.vqgan.codebook), codes, axis=0)
            shape = (1, self.image_size, self.image_size, 3) if init == "noise" else (1, 1, 1, 3)
            pixels = jax.random.uniform(row_key, shape, minval=-1.0, maxval=1.0)
            image = jnp.broadcast_to(pixels, (1, self.image_size, self.image_size, 3))
            return self.vqgan.apply({"params": vqgan_params}, image, method=self.vqgan.encode_latents)[0]
        latents = jax.vmap(one)(key_B2)
        if self.vqgan.quantizer == "l2":
            # The l2 quantizer ignores a latent's norm but Adam's steps are absolute: on unit latents the learning
            # rate is an angle, the same for every start (encoder outputs are several times longer than codes).
            latents = numerics.l2_normalise(latents)
        return latents

    def _optimise_fn(self, vqgan_params, clip_params, queries_BD, key_B2, settings: Settings):
        """(int32 codes [B, h, w], uint8 images [B, H, W, 3], CLIP scores [B], mean cutout similarity before each
        step [steps, B]). Row b depends only on queries_BD[b] and key_B2[b]."""
        init_key_B2 = jax.vmap(lambda k: jax.random.fold_in(k, 0))(key_B2)
        step_key_B2 = jax.vmap(lambda k: jax.random.fold_in(k, 1))(key_B2)
        out_size = self.clip.preprocessing.shortest_edge  # a whole-image cutout then gets exactly CLIP's own view

        def loss_fn(latents, step):
            images = _clip_straight_through(self._snap_and_decode(vqgan_params, latents))
            keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(step_key_B2)
            views_BCSSk = cutouts(images, keys, settings, out_size)
            features = self.clip.image_features(clip_params, views_BCSSk.reshape((-1,) + views_BCSSk.shape[2:]),
                                                round_to_uint8=False)
            similarity_BC = jnp.einsum("bcd,bd->bc", features.reshape(views_BCSSk.shape[:2] + (-1,)), queries_BD)
            similarity_B = jnp.mean(similarity_BC, axis=1)
            # A sum, not a mean, over rows: each row's gradient is then its own, whatever the batch holds.
            return -jnp.sum(similarity_B), similarity_B

        optimizer = optax.adam(settings.learning_rate)
        latents = self._initial_latents(vqgan_params, init_key_B2, settings.init)

        def step_fn(carry, step):
            latents, opt_state = carry
            grads, similarity_B = jax.grad(loss_fn, has_aux=True)(latents, step)
            updates, opt_state = optimizer.update(grads, opt_state, latents)
            return (optax.apply_updates(latents, updates), opt_state), similarity_B

        (latents, _), history_SB = jax.lax.scan(step_fn, (latents, optimizer.init(latents)),
                                                jnp.arange(settings.steps))
        codes_Bhw = self.vqgan.apply({"params": vqgan_params}, latents, method=self.vqgan.quantize_latents)[1]
        images_u8, scores_B = pipeline.decode_and_score(self.vqgan, vqgan_params, self.clip, clip_params, codes_Bhw,
                                                        queries_BD)
        return codes_Bhw, images_u8, scores_B, history_SB

    def optimise(self, queries_BD: np.ndarray, keys_B2: jax.Array, settings: Settings = Settings()
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One batch: (codes [B, h, w], uint8 images [B, H, W, 3], CLIP scores [B], similarity history [steps, B])
        for L2-normalised query embeddings [B, D] and one PRNG key per row [B, 2]."""
        outputs = self._optimise(self.vqgan_params, self.clip.params, jnp.asarray(queries_BD, jnp.float32),
                                 keys_B2, settings=settings)
        return tuple(np.asarray(x) for x in outputs)

    # -- generation, as Pipeline.generate ---------------------------------------------------------------------------

    def generate(self, texts: Sequence[str] | None = None, image_embeddings: np.ndarray | None = None, *,
                 num_candidates: int = 4, keep: int = 1, seed: int = 0, batch_size: int = 64,
                 settings: Settings = Settings()) -> tuple[np.ndarray, np.ndarray]:
        """For each prompt (or CLIP image embedding), optimises `num_candidates` images from different random starts,
        ranks them by CLIP similarity to the prompt and keeps the best `keep`.

        Returns (uint8 images [P, keep, H, W, 3], scores [P, keep] sorted descending), as `Pipeline.generate`.
        Candidate n of prompt p starts from, and is augmented with, a key of (seed, p, n) alone, so a candidate does
        not change with batch_size or with the other prompts (up to floating-point reassociation in batched ops)."""
        pipeline.check_candidates(num_candidates, keep, batch_size)
        queries_PD = pipeline.query_embeddings(self.clip, texts, image_embeddings)
        num_prompts = len(queries_PD)
        rows_RD = np.repeat(queries_PD, num_candidates, axis=0)  # row p * N + n: candidate n of prompt p
        keys_R2 = sampling.row_keys(seed, np.repeat(np.arange(num_prompts), num_candidates),
                                    np.tile(np.arange(num_candidates), num_prompts))
        batch_size = min(batch_size, len(rows_RD))
        images, scores = [], []
        for start in range(0, len(rows_RD), batch_size):
            chunk_BD, keys_B2 = rows_RD[start:start + batch_size], keys_R2[start:start + batch_size]
            valid = len(chunk_BD)
            # One shape for every call (the last is padded with copies), so the optimisation compiles once.
            chunk_BD = np.concatenate([chunk_BD, np.repeat(chunk_BD[-1:], batch_size - valid, axis=0)])
            keys_B2 = jnp.concatenate([keys_B2, jnp.repeat(keys_B2[-1:], batch_size - valid, axis=0)])
            _, images_u8, scores_B, _ = self.optimise(chunk_BD, keys_B2, settings)
            images.append(images_u8[:valid])
            scores.append(scores_B[:valid].astype(np.float32))
        images_PNHWC = np.concatenate(images).reshape((num_prompts, num_candidates) + images[0].shape[1:])
        return pipeline.rerank(images_PNHWC, np.concatenate(scores).reshape(num_prompts, num_candidates), keep)


def generate(vqgan: vqgan_lib.VQGAN, vqgan_params: Any, clip: clip_lib.CLIP, texts: Sequence[str], *,
             num_candidates: int = 4, keep: int = 1, seed: int = 0, batch_size: int = 64,
             settings: Settings = Settings()) -> tuple[np.ndarray, np.ndarray]:
    """`VQGANCLIP(vqgan, vqgan_params, clip).generate(texts, ...)`, for one-off calls; keep a VQGANCLIP to reuse its
    compilation across calls."""
    return VQGANCLIP(vqgan=vqgan, vqgan_params=vqgan_params, clip=clip).generate(
        texts, num_candidates=num_candidates, keep=keep, seed=seed, batch_size=batch_size, settings=settings)
