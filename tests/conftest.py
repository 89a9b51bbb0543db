"""Shared test setup: a persistent JAX compilation cache (also inherited by subprocesses), malloc keeping freed
memory (as the tools set it) and seeded fixtures."""

import os
import pathlib

_CACHE_DIR = pathlib.Path(__file__).resolve().parents[1] / ".cache" / "jax_test_compilation"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE_DIR))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

import pathlib as _pathlib  # noqa: E402

import pytest  # noqa: E402

from clipgen_jax import host_memory  # noqa: E402

host_memory.keep_freed_memory()  # as the tools do; subprocesses they start set it themselves

REPO_ROOT = _pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory) -> _pathlib.Path:
    """A TFDS data_dir holding the `tiny` Shapes build, made once per test session."""
    from clipgen_jax.data import shapes_tfds

    data_dir = tmp_path_factory.mktemp("tfds")
    shapes_tfds.prepare("tiny", data_dir=str(data_dir))
    return data_dir


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> _pathlib.Path:
    """A tiny random VQGAN bundle (`vqgan/`: 32 px, 16 x 16 tokens of 64 codes) and CLIP (`clip/`: 16-d), as
    helpers.tiny_models makes them."""
    from helpers import tiny_models

    root = tmp_path_factory.mktemp("models")
    tiny_models(root)
    return root


@pytest.fixture(scope="session")
def prior_dataset(tmp_path_factory, models_dir, shapes_data_dir):
    """The tiny Shapes build (validation 128, heldout 96) precomputed with models_dir's VQGAN and CLIP:
    (vqgan path, clip path, data_dir)."""
    from clipgen_jax import precompute, training

    config = training.load_config("configs/precompute.py:tiny")
    config.vqgan, config.clip = str(models_dir / "vqgan"), str(models_dir / "clip")
    config.data.data_dir = str(shapes_data_dir)
    config.output.data_dir = str(tmp_path_factory.mktemp("prior_dataset") / "precomputed")
    precompute.precompute(config)
    return models_dir / "vqgan", models_dir / "clip", _pathlib.Path(config.output.data_dir)


class _RunsShellCommand:
    """Unpickling this calls os.system(command): the payload of a malicious weights file."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def malicious_pickle():
    """`malicious_pickle(wrap)` -> pickle bytes of `wrap(payload)` whose payload would `touch` a marker file, and the
    marker's path (which must never exist)."""

    def make(wrap, marker: _pathlib.Path, protocol: int = 3) -> bytes:
        import pickle

        return pickle.dumps(wrap(_RunsShellCommand(f"touch {marker}")), protocol=protocol)

    return make
