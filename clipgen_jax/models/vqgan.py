"""The VQGAN image tokenizer: taming-transformers' convolutional encoder/decoder around a vector quantizer.

Submodule names follow taming's state-dict layout (`down_{level}_block_{i}` for `encoder.down.{level}.block.{i}`, ...),
so that `convert_taming` maps a taming checkpoint onto these parameters one to one. Convolutions are NHWC.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipgen_jax.models import quantizers

# taming's Normalize(): GroupNorm with 32 groups and eps 1e-6 (CLIP-GEN's official VQGAN keeps torch's 1e-5).
TAMING_NORM_GROUPS = 32
NORM_EPSILON = 1e-6
LAST_LAYER_INPUT = "last_layer_input"


class _Layers(nn.Module):
    """Base of the tokenizer's blocks: one dtype policy and taming's conv and norm settings."""
    # Narrow models want fewer groups: with as many groups as channels, GroupNorm normalises each channel alone
    # and removes every per-channel offset (e.g. a background colour) at each block.
    norm_groups: int = TAMING_NORM_GROUPS
    norm_epsilon: float = NORM_EPSILON
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def conv(self, features: int, kernel: int = 3, strides: int = 1, padding="SAME", name: str | None = None):
        return nn.Conv(features, (kernel, kernel), strides=strides, padding=padding, dtype=self.dtype,
                       param_dtype=self.param_dtype, name=name)

    def norm(self, name: str):
        return nn.GroupNorm(num_groups=self.norm_groups, epsilon=self.norm_epsilon, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=name)


class ResnetBlock(_Layers):
    features: int = 128

    @nn.compact
    def __call__(self, x):
        h = self.conv(self.features, name="conv1")(nn.swish(self.norm("norm1")(x)))
        h = self.conv(self.features, name="conv2")(nn.swish(self.norm("norm2")(h)))
        if x.shape[-1] != self.features:
            x = self.conv(self.features, kernel=1, name="nin_shortcut")(x)
        return x + h


class AttnBlock(_Layers):
    """Single-head self-attention over all spatial positions, with a residual connection."""

    @nn.compact
    def __call__(self, x_BHWC):
        batch, height, width, channels = x_BHWC.shape
        h = self.norm("norm")(x_BHWC)
        q, k, v = (self.conv(channels, kernel=1, name=n)(h).reshape(batch, height * width, 1, channels)
                   for n in ("q", "k", "v"))
        attended = jax.nn.dot_product_attention(q, k, v).reshape(batch, height, width, channels)
        return x_BHWC + self.conv(channels, kernel=1, name="proj_out")(attended)


class _Tower(_Layers):
    """What the encoder and the decoder share: taming's level structure and its middle (block, attention, block)."""
    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    resolution: int = 256
    use_attention: bool = True  # False: no attention blocks anywhere in this tower (a purely convolutional one)

    def block(self, features: int, name: str) -> ResnetBlock:
        return ResnetBlock(features=features, name=name, norm_groups=self.norm_groups, norm_epsilon=self.norm_epsilon,
                           dtype=self.dtype, param_dtype=self.param_dtype)

    def attention(self, name: str) -> AttnBlock:
        return AttnBlock(name=name, norm_groups=self.norm_groups, norm_epsilon=self.norm_epsilon, dtype=self.dtype,
                         param_dtype=self.param_dtype)

    def middle(self, h):
        h = self.block(h.shape[-1], "mid_block_1")(h)
        if self.use_attention:
            h = self.attention("mid_attn_1")(h)
        return self.block(h.shape[-1], "mid_block_2")(h)


class Encoder(_Tower):
    z_channels: int = 256

    @nn.compact
    def __call__(self, x_BHWC):
        h = self.conv(self.ch, name="conv_in")(x_BHWC.astype(self.dtype))
        resolution = self.resolution
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = self.block(self.ch * mult, f"down_{level}_block_{i}")(h)
                if self.use_attention and resolution in self.attn_resolutions:
                    h = self.attention(f"down_{level}_attn_{i}")(h)
            if level != len(self.ch_mult) - 1:
                # taming pads right and bottom by one, then convolves with stride 2 and no padding.
                h = self.conv(h.shape[-1], strides=2, padding=((0, 1), (0, 1)), name=f"down_{level}_downsample")(h)
                resolution //= 2
        h = self.middle(h)
        return self.conv(self.z_channels, name="conv_out")(nn.swish(self.norm("norm_out")(h)))


class Decoder(_Tower):
    out_channels: int = 3

    @nn.compact
    def __call__(self, z_BhwC):
        h = self.conv(self.ch * self.ch_mult[-1], name="conv_in")(z_BhwC.astype(self.dtype))
        h = self.middle(h)
        resolution = self.resolution // 2 ** (len(self.ch_mult) - 1)
        for level in reversed(range(len(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                h = self.block(self.ch * self.ch_mult[level], f"up_{level}_block_{i}")(h)
                if resolution in self.attn_resolutions:
                    h = self.attention(f"up_{level}_attn_{i}")(h)
            if level != 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour 2x
                h = self.conv(h.shape[-1], name=f"up_{level}_upsample")(h)
                resolution *= 2
        h = nn.swish(self.norm("norm_out")(h))
        # The trainer's adaptive GAN weight needs the gradients at this last layer; its input is all that takes.
        self.sow("intermediates", LAST_LAYER_INPUT, h)
        return self.conv(self.out_channels, name="conv_out")(h).astype(jnp.float32)


class VQGAN(nn.Module):
    """Image [B, H, W, 3] in [-1, 1] <-> int32 code grid [B, H/f, W/f], f = 2 ** (len(ch_mult) - 1)."""
    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    z_channels: int = 256
    resolution: int = 256
    codebook_size: int = 16384
    code_dim: int = 256
    quantizer: str = "vq"
    beta: float = 0.25
    legacy_beta: bool = False
    norm_groups: int = TAMING_NORM_GROUPS
    norm_epsilon: float = NORM_EPSILON
    # False: a convolutional encoder (no attention blocks; the decoder keeps its own), whose codes see the rest of the
    # image only through its convolutions' reach and its GroupNorm statistics.
    encoder_attention: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        arch = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                    attn_resolutions=tuple(self.attn_resolutions), resolution=self.resolution,
                    norm_groups=self.norm_groups, norm_epsilon=self.norm_epsilon)
        self.encoder = Encoder(z_channels=self.z_channels, use_attention=self.encoder_attention, **arch, **kw)
        self.decoder = Decoder(**arch, **kw)
        self.quant_conv = nn.Conv(self.code_dim, (1, 1), **kw)
        self.post_quant_conv = nn.Conv(self.z_channels, (1, 1), **kw)
        self.quantize = quantizers.VectorQuantizer(self.codebook_size, self.code_dim, kind=self.quantizer,
                                                   beta=self.beta, legacy=self.legacy_beta,
                                                   param_dtype=self.param_dtype)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def encode_latents(self, images_BHWC):
        """Pre-quantization latents [B, h, w, code_dim] (float32)."""
        return self.quant_conv(self.encoder(images_BHWC)).astype(jnp.float32)

    def quantize_latents(self, latents_BhwD):
        return self.quantize(latents_BhwD)

    def encode(self, images_BHWC):
        """int32 code grid [B, h, w]."""
        return self.quantize(self.encode_latents(images_BHWC))[1]

    def decode_codes(self, codes_BhwD):
        """Code vectors (or any mixture of them, e.g. soft one-hots @ codebook) -> images; differentiable."""
        return self.decoder(self.post_quant_conv(codes_BhwD.astype(self.dtype)))

    def decode(self, tokens_Bhw):
        """int32 code grid -> images [B, H, W, 3] (float32, nominally in [-1, 1])."""
        return self.decode_codes(self.quantize.lookup(tokens_Bhw))

    def codebook(self):
        """The lookup codebook [K, code_dim], e.g. for decoding soft one-hots: `decode_codes(p @ codebook())`."""
        return self.quantize.code_vectors()

    def __call__(self, images_BHWC, bypass_quantizer: bool | jax.Array = False):
        """(reconstruction, indices, quantizer loss terms, pre-quantization latents). `bypass_quantizer` decodes the
        continuous latents instead of their codes (a training warm-up)."""
        latents = self.encode_latents(images_BHWC)
        quantized, indices, losses = self.quantize(latents, bypass_quantizer)
        return self.decode_codes(quantized), indices, losses, latents


CONFIG_FIELDS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution", "codebook_size",
                 "code_dim", "quantizer", "beta", "legacy_beta", "norm_groups", "norm_epsilon", "encoder_attention")


def from_config(model_config, dtype=jnp.float32) -> VQGAN:
    """A VQGAN from a config mapping with the fields in CONFIG_FIELDS (lists are accepted for tuples, as JSON has)."""
    fields = dict(model_config)
    unknown = set(fields) - set(CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"unknown VQGAN model fields {sorted(unknown)}; known: {CONFIG_FIELDS}")
    return VQGAN(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}, dtype=dtype,
                 param_dtype=jnp.float32)


def init_params(model: VQGAN, rng: jax.Array):
    """Fresh parameters for `model` (at its own resolution); under `jax.eval_shape`, their shapes."""
    return model.init(rng, jnp.zeros((1, model.resolution, model.resolution, 3)))["params"]
