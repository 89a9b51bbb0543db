"""Models shipped inside the package (clipgen_jax/assets/, README.md there), found by name, so that they work right
after `pip install`: the Shapes CLIPs (`clip.PACKAGED`) and the Shapes prior with its VQGAN (`PRIORS`)."""

import pathlib

import importlib_resources

# A packaged prior's bundle records its VQGAN beside it (metadata `vqgan_relative`) and its CLIP by packaged name.
PRIORS = {"shapes": "assets/shapes/prior"}


def path(relative: str) -> pathlib.Path:
    """Where a file or directory shipped in the package (a path relative to clipgen_jax/) is installed."""
    return pathlib.Path(str(importlib_resources.files("clipgen_jax").joinpath(relative)))
