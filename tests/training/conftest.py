"""Fixtures shared by the training tests."""

import pytest
from test_pipeline import tiny_models

from clipgen_jax import precompute, training


@pytest.fixture(scope="session")
def prior_dataset(tmp_path_factory, shapes_data_dir):
    """The tiny Shapes build (validation 128, heldout 96) precomputed with a tiny VQGAN and CLIP:
    (vqgan path, clip path, data_dir)."""
    root = tmp_path_factory.mktemp("prior_dataset")
    vqgan_path, clip_path = tiny_models(root)
    config = training.load_config("configs/precompute.py:tiny")
    config.vqgan, config.clip = str(vqgan_path), str(clip_path)
    config.data.data_dir = str(shapes_data_dir)
    config.output.data_dir = str(root / "precomputed")
    precompute.precompute(config)
    return vqgan_path, clip_path, root / "precomputed"
