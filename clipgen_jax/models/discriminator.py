"""taming-transformers' PatchGAN discriminator (NLayerDiscriminator) and the GAN losses of its VQGAN training.

Normalisation. taming uses BatchNorm, always in training mode while the GAN trains, so each call normalises with the
statistics of the batch it is given (real and fake batches separately). Here the default is `norm="group"`, a
deliberate deviation: GroupNorm keeps the discriminator a pure function of its parameters (no mutable batch stats
threaded through the jitted GAN step, nothing to sync across devices) and independent of the per-device batch size,
which is small on accelerators. `norm="batch"` reproduces taming: call it with `train=True` and
`mutable=["batch_stats"]` while training. `norm="none"` drops the normalisation layers.
"""

from __future__ import annotations

import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

Norm = Literal["batch", "group", "none"]
GanLossKind = Literal["hinge", "vanilla"]

KERNEL_SIZE = 4
PADDING = 1  # taming's padw
LEAKY_RELU_SLOPE = 0.2
GROUP_NORM_GROUPS = 32
# torch.nn.BatchNorm2d's defaults (torch momentum 0.1 is flax momentum 0.9).
BATCH_NORM_MOMENTUM = 0.9
NORM_EPSILON = 1e-5
# taming's weights_init: conv weights ~ N(0, 0.02), norm scales ~ N(1, 0.02), norm biases 0.
CONV_INIT_STDDEV = 0.02
# The epsilon of taming's calculate_adaptive_weight.
ADAPTIVE_WEIGHT_EPSILON = 1e-4


def _norm_scale_init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
    return 1.0 + CONV_INIT_STDDEV * jax.random.normal(key, shape, dtype)


class NLayerDiscriminator(nn.Module):
    """Maps [B, H, W, C] images in [-1, 1] to [B, h, w, 1] float32 real/fake logits, one per overlapping patch.

    With n_layers=3, a 256x256 input gives a 30x30 grid of logits, each seeing a 70x70 patch.
    """
    ndf: int = 64
    n_layers: int = 3
    norm: Norm = "group"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _conv(self, features: int, strides: int, use_bias: bool, name: str) -> nn.Conv:
        return nn.Conv(features, (KERNEL_SIZE, KERNEL_SIZE), strides=strides, padding=PADDING, use_bias=use_bias,
                       kernel_init=nn.initializers.normal(CONV_INIT_STDDEV), dtype=self.dtype,
                       param_dtype=self.param_dtype, name=name)

    def _normalize(self, h: jnp.ndarray, train: bool, name: str) -> jnp.ndarray:
        if self.norm == "batch":
            return nn.BatchNorm(use_running_average=not train, momentum=BATCH_NORM_MOMENTUM, epsilon=NORM_EPSILON,
                                scale_init=_norm_scale_init, dtype=self.dtype, param_dtype=self.param_dtype,
                                name=name)(h)
        if self.norm == "group":
            # gcd: small widths (ndf < 16, in tests) have fewer channels than groups.
            num_groups = math.gcd(GROUP_NORM_GROUPS, h.shape[-1])
            return nn.GroupNorm(num_groups=num_groups, epsilon=NORM_EPSILON, scale_init=_norm_scale_init,
                                dtype=self.dtype, param_dtype=self.param_dtype, name=name)(h)
        return h

    @nn.compact
    def __call__(self, x_BHWC: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        """`train` matters only for norm="batch": batch statistics (and their running averages) or the averages."""
        if self.norm not in ("batch", "group", "none"):
            raise ValueError(f"norm must be 'batch', 'group' or 'none', got {self.norm!r}")
        # A conv followed by a norm needs no bias of its own: the norm's shift takes its place (taming drops it for
        # BatchNorm; GroupNorm likewise).
        conv_bias = self.norm == "none"

        h = self._conv(self.ndf, strides=2, use_bias=True, name="conv_0")(x_BHWC.astype(self.dtype))
        h = nn.leaky_relu(h, LEAKY_RELU_SLOPE)
        for n in range(1, self.n_layers + 1):
            # The last of these keeps the resolution (stride 1); the channel count doubles up to 8 * ndf.
            strides = 2 if n < self.n_layers else 1
            h = self._conv(self.ndf * min(2 ** n, 8), strides=strides, use_bias=conv_bias, name=f"conv_{n}")(h)
            h = self._normalize(h, train, name=f"norm_{n}")
            h = nn.leaky_relu(h, LEAKY_RELU_SLOPE)
        logits = self._conv(1, strides=1, use_bias=True, name=f"conv_{self.n_layers + 1}")(h)
        return logits.astype(jnp.float32)


def hinge_d_loss(logits_real: jnp.ndarray, logits_fake: jnp.ndarray) -> jnp.ndarray:
    """taming's hinge discriminator loss: pushes real logits above 1 and fake logits below -1."""
    loss_real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
    loss_fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
    return 0.5 * (loss_real + loss_fake)


def vanilla_d_loss(logits_real: jnp.ndarray, logits_fake: jnp.ndarray) -> jnp.ndarray:
    """taming's "vanilla" loss: binary cross-entropy on logits, real = 1 and fake = 0."""
    loss_real = jnp.mean(jax.nn.softplus(-logits_real.astype(jnp.float32)))
    loss_fake = jnp.mean(jax.nn.softplus(logits_fake.astype(jnp.float32)))
    return 0.5 * (loss_real + loss_fake)


def discriminator_loss(logits_real: jnp.ndarray, logits_fake: jnp.ndarray, kind: GanLossKind) -> jnp.ndarray:
    """`hinge_d_loss` or `vanilla_d_loss`, chosen by name as in a config."""
    if kind == "hinge":
        return hinge_d_loss(logits_real, logits_fake)
    if kind == "vanilla":
        return vanilla_d_loss(logits_real, logits_fake)
    raise ValueError(f"GAN loss kind must be 'hinge' or 'vanilla', got {kind!r}")


def generator_loss(logits_fake: jnp.ndarray, kind: GanLossKind) -> jnp.ndarray:
    """The generator's adversarial loss on the discriminator's logits for its reconstructions.

    "hinge" is taming's -mean(logits_fake) (which taming uses whatever its discriminator loss); "vanilla" is the
    non-saturating mean(softplus(-logits_fake)), i.e. -log(sigmoid(logits_fake)).
    """
    logits_fake = logits_fake.astype(jnp.float32)
    if kind == "hinge":
        return -jnp.mean(logits_fake)
    if kind == "vanilla":
        return jnp.mean(jax.nn.softplus(-logits_fake))
    raise ValueError(f"GAN loss kind must be 'hinge' or 'vanilla', got {kind!r}")


def adaptive_gan_weight(rec_grad_norm: jnp.ndarray, gan_grad_norm: jnp.ndarray,
                        max_weight: float = 1e4) -> jnp.ndarray:
    """taming's adaptive GAN weight: scales the GAN loss so its gradient at the decoder's last layer matches the
    reconstruction loss's, clamped to [0, max_weight]. Treated as a constant: no gradient flows through it.

    Multiply by the configured discriminator weight, as taming does.
    """
    weight = jnp.clip(rec_grad_norm / (gan_grad_norm + ADAPTIVE_WEIGHT_EPSILON), 0.0, max_weight)
    return jax.lax.stop_gradient(weight)
