"""The fault suite's fixtures and hooks (its helpers are in faultlib.py).

`python -m pytest -m faults` runs the suite (`make test` includes it); `-m faults_exhaustive` kills at every step and
in every phase of every save instead of at two drawn points (minutes; deselected unless -m names it).
"""

import pathlib

import numpy as np
import pytest

from faultlib import FAULT_SEED, SEED_ENV_VAR, VQGAN_STEPS, final_state, run_tool, train_args


def pytest_collection_modifyitems(config, items):
    if "faults_exhaustive" in (config.option.markexpr or ""):
        return
    exhaustive = [item for item in items if item.get_closest_marker("faults_exhaustive")]
    if exhaustive:
        config.hook.pytest_deselected(items=exhaustive)
        items[:] = [item for item in items if not item.get_closest_marker("faults_exhaustive")]


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"fault suite: {SEED_ENV_VAR}={FAULT_SEED} (set it to replay the same kill points)")


@pytest.fixture
def fault_rng():
    return np.random.default_rng(FAULT_SEED)


@pytest.fixture(scope="session")
def vqgan_reference(tmp_path_factory, shapes_data_dir):
    """An uninterrupted tiny VQGAN run through tools/train.py: (workdir, every leaf of its final train state)."""
    workdir = tmp_path_factory.mktemp("faults") / "reference"
    result = run_tool("tools/train.py", *train_args(workdir, shapes_data_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, final_state(workdir, VQGAN_STEPS)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny random VQGAN bundle (`vqgan/`) and CLIP (`clip/`), as test_pipeline.tiny_models makes them."""
    from test_pipeline import tiny_models

    root = tmp_path_factory.mktemp("models")
    tiny_models(root)
    return root
