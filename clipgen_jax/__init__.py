"""clipgen_jax: a JAX/Flax implementation of CLIP-GEN (Wang et al. 2022).

Importing the package registers the `clipgen_shapes` TFDS builder (the offline Shapes world).
"""

from clipgen_jax.data import shapes_tfds as _shapes_tfds  # noqa: F401  (registers the TFDS builder)

__version__ = "0.1.0"
