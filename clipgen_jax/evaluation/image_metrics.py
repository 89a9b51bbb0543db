"""Pixel-level image metrics on [-1, 1] images."""

import jax
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


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> jnp.ndarray:
    x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    window = jnp.exp(-0.5 * jnp.square(x / sigma))
    return window / window.sum()


def ssim(images_NHWC: jnp.ndarray, references_NHWC: jnp.ndarray) -> jnp.ndarray:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, 'valid' windows), on
    images mapped to [0, 1] and averaged over channels."""
    x = (jnp.clip(images_NHWC.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0
    y = (jnp.clip(references_NHWC.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0
    window = _gaussian_window()
    channels = x.shape[-1]
    kernel = jnp.tile((window[:, None] * window[None, :])[:, :, None, None], (1, 1, 1, channels))

    def blur(z):
        return jax.lax.conv_general_dilated(z, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=channels)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return jnp.mean(ssim_map, axis=(1, 2, 3))


def code_statistics(token_counts_K: np.ndarray) -> dict[str, float]:
    """Codebook usage (fraction of codes used at least once) and perplexity (exp of the code-frequency entropy)."""
    counts = np.asarray(token_counts_K, np.float64)
    probabilities = counts / counts.sum()
    nonzero = probabilities[probabilities > 0]
    return {"codebook_usage": float(np.mean(counts > 0)),
            "perplexity": float(np.exp(-np.sum(nonzero * np.log(nonzero))))}
