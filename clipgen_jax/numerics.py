"""Small numerical helpers shared by the models, the stages and the pipeline."""

import jax
import jax.numpy as jnp


def l2_normalise(x: jax.Array) -> jax.Array:
    """`x` divided by its L2 norm along the last axis, in x's dtype; a zero vector stays zero."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
