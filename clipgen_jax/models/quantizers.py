"""Vector quantizers for the VQGAN bottleneck.

Two kinds, selected by `kind`:
- "vq": taming-transformers' nearest-neighbour quantizer (VectorQuantizer2): codes in the latent's own space,
  straight-through gradient, codebook term + beta * commitment term. `legacy=True` puts beta on the codebook term
  instead, as taming's released checkpoints were trained (needed to reproduce their losses, not their outputs).
- "l2": l2-normalised, low-dimensional (factorised) codes as in ViT-VQGAN / LlamaGen: the nearest code by cosine,
  which keeps codebook usage high even for large codebooks.
Both return code indices and the quantized vectors; the nearest-neighbour search is chunked over rows, so it never
holds more than a [chunk, codebook_size] distance block (never a rows x codes x dim tensor).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

QUANTIZER_KINDS = ("vq", "l2")
# Rows per distance block in the nearest-code search: 4096 x 16384 float32 distances are 256 MiB.
SEARCH_CHUNK_ROWS = 4096


def _l2_normalize(x: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
    # Not numerics.l2_normalise: VQGAN training and encoding have used this rsqrt form; the other differs in last bits.
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=True), 1e-12))


def nearest_code(z_ND: jnp.ndarray, codebook_KD: jnp.ndarray) -> jnp.ndarray:
    """Index of the codebook row nearest (squared L2) to each row of z, computed in row chunks."""
    num_rows = z_ND.shape[0]
    codebook_KD = codebook_KD.astype(jnp.float32)
    codebook_sq_K = jnp.sum(jnp.square(codebook_KD), axis=-1)

    def chunk_argmin(z_cD):
        # |z|^2 is the same for every code of a row, so it does not change the argmin.
        distances_cK = codebook_sq_K[None, :] - 2.0 * z_cD.astype(jnp.float32) @ codebook_KD.T
        return jnp.argmin(distances_cK, axis=-1).astype(jnp.int32)

    if num_rows <= SEARCH_CHUNK_ROWS:
        return chunk_argmin(z_ND)
    num_chunks = -(-num_rows // SEARCH_CHUNK_ROWS)
    padded = jnp.pad(z_ND, ((0, num_chunks * SEARCH_CHUNK_ROWS - num_rows), (0, 0)))
    indices = jax.lax.map(chunk_argmin, padded.reshape(num_chunks, SEARCH_CHUNK_ROWS, -1))
    return indices.reshape(-1)[:num_rows]


class VectorQuantizer(nn.Module):
    """Quantizes the last axis of its input to the nearest of `codebook_size` codes of width `code_dim`.

    Returns (quantized with a straight-through gradient, int32 indices, loss terms). The loss terms are
    `codebook` (moves codes to the encoder outputs), `commitment` (moves encoder outputs to their codes) and
    `total` = codebook + beta * commitment (or beta * codebook + commitment when `legacy`).
    """
    codebook_size: int
    code_dim: int
    kind: str = "vq"
    beta: float = 0.25
    legacy: bool = False
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        if self.kind not in QUANTIZER_KINDS:
            raise ValueError(f"quantizer kind {self.kind!r} is not one of {QUANTIZER_KINDS}")
        # taming initialises its codebook uniformly in +-1/K.
        self.codebook = self.param(
            "codebook", nn.initializers.uniform(scale=2.0 / self.codebook_size), (self.codebook_size, self.code_dim),
            self.param_dtype)

    def code_vectors(self) -> jnp.ndarray:
        """The codebook as used for lookup ([K, D]); l2-normalised for the "l2" kind."""
        codebook = self.codebook.astype(jnp.float32)
        return _l2_normalize(codebook) if self.kind == "l2" else codebook

    def lookup(self, indices: jnp.ndarray) -> jnp.ndarray:
        """Code vectors for integer indices of any shape: [..., D]."""
        return jnp.take(self.code_vectors(), indices, axis=0)

    def __call__(self, z: jnp.ndarray, bypass: bool | jax.Array = False
                 ) -> tuple[jnp.ndarray, jnp.ndarray, dict[str, jnp.ndarray]]:
        """`bypass` (a traced bool is fine) passes z through unquantized, for a continuous warm-up; indices and loss
        terms are computed either way, so the codebook keeps tracking the latents."""
        z = z.astype(jnp.float32)
        if self.kind == "l2":
            z = _l2_normalize(z)
        codebook = self.code_vectors()
        indices = nearest_code(z.reshape(-1, self.code_dim), codebook).reshape(z.shape[:-1])
        quantized = jnp.take(codebook, indices, axis=0)
        codebook_term = jnp.mean(jnp.square(quantized - jax.lax.stop_gradient(z)))
        commitment_term = jnp.mean(jnp.square(jax.lax.stop_gradient(quantized) - z))
        if self.legacy:
            total = self.beta * codebook_term + commitment_term
        else:
            total = codebook_term + self.beta * commitment_term
        quantized = z + jax.lax.stop_gradient(quantized - z) * (1.0 - jnp.asarray(bypass, jnp.float32))
        return quantized, indices, {"codebook": codebook_term, "commitment": commitment_term, "total": total}


def code_usage_counts(indices: jnp.ndarray, codebook_size: int) -> jnp.ndarray:
    """How often each code was chosen: [K] float32."""
    return jnp.zeros((codebook_size,), jnp.float32).at[indices.reshape(-1)].add(1.0)


def restart_dead_codes(codebook_KD: jnp.ndarray, usage_K: jnp.ndarray, z_ND: jnp.ndarray, rng: jax.Array,
                       threshold: float) -> jnp.ndarray:
    """Codes whose usage is below `threshold` are re-seeded with randomly chosen encoder outputs (rows of z, in the
    codebook's own parameterisation), so that they can win nearest-neighbour searches again."""
    picks = jax.random.randint(rng, (codebook_KD.shape[0],), 0, z_ND.shape[0])
    dead = (usage_K < threshold)[:, None]
    return jnp.where(dead, z_ND[picks].astype(codebook_KD.dtype), codebook_KD)
