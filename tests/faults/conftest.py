"""The fault suite's fixtures and hooks (its helpers are in faultlib.py).

`python -m pytest -m faults` runs the suite (`make test` includes it); `-m faults_exhaustive` kills at every step, in
every phase of every save and before every precompute batch write instead of at the drawn points (tens of minutes;
deselected unless -m names it).
"""

import numpy as np
import pytest

from faultlib import FAULT_SEED, RUNS, SEED_ENV_VAR, final_state, run_tool, train_args


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


def _reference(tmp_path_factory, run, data_dir, **frozen_models):
    """An uninterrupted `run` through tools/train.py: (workdir, every leaf of its final train state)."""
    workdir = tmp_path_factory.mktemp("faults") / "reference"
    result = run_tool("tools/train.py", *train_args(workdir, data_dir, run, **frozen_models))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, final_state(workdir, run)


@pytest.fixture(scope="session")
def vqgan_reference(tmp_path_factory, shapes_data_dir):
    return _reference(tmp_path_factory, RUNS["vqgan"], shapes_data_dir)


@pytest.fixture(scope="session")
def prior_reference(tmp_path_factory, prior_dataset):
    vqgan, clip, data_dir = prior_dataset
    return _reference(tmp_path_factory, RUNS["prior"], data_dir, vqgan=vqgan, clip=clip)
