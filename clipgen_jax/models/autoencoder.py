"""A small convolutional autoencoder: the minimal stage that exercises the shared training loop end to end."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class ConvAutoencoder(nn.Module):
    """Each width halves the resolution on the way down and doubles it on the way up; output in [-1, 1] by tanh."""
    widths: Sequence[int] = (32, 64)
    latent_channels: int = 16
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _conv(self, features: int, name: str, strides: int = 1) -> nn.Conv:
        return nn.Conv(features, (3, 3), strides=strides, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def _encode(self, x_BHWC: jnp.ndarray) -> jnp.ndarray:
        h = x_BHWC.astype(self.dtype)
        for i, width in enumerate(self.widths):
            h = nn.swish(self._conv(width, f"down_{i}", strides=2)(h))
        return self._conv(self.latent_channels, "to_latent")(h)

    def _decode(self, z_BhwC: jnp.ndarray) -> jnp.ndarray:
        h = z_BhwC
        for i, width in enumerate(reversed(self.widths)):
            h = nn.ConvTranspose(width, (4, 4), strides=(2, 2), dtype=self.dtype, param_dtype=self.param_dtype,
                                 name=f"up_{i}")(h)
            h = nn.swish(h)
        return jnp.tanh(self._conv(3, "to_rgb")(h)).astype(jnp.float32)

    @nn.compact
    def __call__(self, x_BHWC: jnp.ndarray) -> jnp.ndarray:
        return self._decode(self._encode(x_BHWC))
