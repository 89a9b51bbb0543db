"""Pixel-level image metrics on [-1, 1] images."""

import jax.numpy as jnp
import numpy as np


def psnr(images_NHWC: jnp.ndarray, references_NHWC: jnp.ndarray) -> jnp.ndarray:
    """Per-image PSNR in dB, with images mapped to [0, 1] (peak 1), clipped as they would be when saved."""
    images = (jnp.clip(images_NHWC, -1.0, 1.0) + 1.0) / 2.0
    references = (jnp.clip(references_NHWC, -1.0, 1.0) + 1.0) / 2.0
    mse = jnp.mean(jnp.square(images.astype(jnp.float32) - references.astype(jnp.float32)), axis=(1, 2, 3))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 pixels, rounded as a saved PNG would be."""
    return np.round((np.clip(np.asarray(images, np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
