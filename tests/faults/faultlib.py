"""What the fault suite's tests share (its fixtures are in conftest.py): the logged seed that draws kill points,
tools run as a user runs them (optionally through inject.py), the one-line-error check, the tiny VQGAN run that
interrupted runs must reproduce, and tiny precompute configs. A module of its own rather than conftest.py, because
`from conftest import ...` gets whichever conftest.py pytest loaded last (tests/training has one too)."""

import json
import os
import pathlib
import re
import secrets
import subprocess
import sys

import jax
import numpy as np

from clipgen_jax import checkpointing, parallel, training

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
INJECT = str(pathlib.Path(__file__).with_name("inject.py"))

# Drawn once per session unless set, so that many CI runs cover many kill points; a failure names it (and the
# terminal summary prints it) so that `CLIPGEN_FAULT_SEED=<seed> python -m pytest -m faults` replays the same points.
SEED_ENV_VAR = "CLIPGEN_FAULT_SEED"
FAULT_SEED = int(os.environ.get(SEED_ENV_VAR) or secrets.randbelow(2**31))

# The stage run that the kill and corruption tests interrupt: the tiny VQGAN (GAN, EMA, code usage: every kind of
# state a stage has), 8 steps with a checkpoint every 2 (of which the newest 3 are kept).
VQGAN_CONFIG = "configs/vqgan.py:tiny"
VQGAN_STEPS = 8
VQGAN_OVERRIDES = dict(steps=VQGAN_STEPS, checkpoint_every=2, eval_every=0)


def tool_command(tool: str, *args: str, fault: dict | None = None) -> list[str]:
    """`python TOOL ARGS`, or the same through inject.py with `fault` injected."""
    tool = str(REPO_ROOT / tool)
    return [sys.executable, tool, *args] if fault is None else [sys.executable, INJECT, json.dumps(fault), tool, *args]


def run_tool(tool: str, *args: str, fault: dict | None = None, timeout: float = 300,
             cwd: pathlib.Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(tool_command(tool, *args, fault=fault), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str, *, quiet: bool = True) -> str:
    """Exit status 1 and, as the last line of stderr, `error: ...` matching `pattern` (an uncaught exception would
    end with its own line instead); with `quiet`, no traceback at all (`quiet=False` where a library logs one)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, f"exit status {result.returncode}; stderr:\n{result.stderr[-3000:]}"
    assert lines and lines[-1].startswith("error: "), result.stderr[-3000:]
    assert re.search(pattern, lines[-1]), lines[-1]
    assert not quiet or "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[-1]


def train_args(workdir: pathlib.Path, data_dir: pathlib.Path, config: str = VQGAN_CONFIG, **overrides) -> list[str]:
    overrides = {**(VQGAN_OVERRIDES if config == VQGAN_CONFIG else {}), **overrides}
    return [f"--config={config}", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            *(f"--config.train.{key}={value}" for key, value in overrides.items())]


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    """The steps of the complete checkpoints in a training workdir."""
    checkpointer = checkpointing.Checkpointer(workdir / "checkpoints")
    try:
        return checkpointer.all_steps()
    finally:
        checkpointer.close()


def final_state(workdir: pathlib.Path, step: int) -> list[np.ndarray]:
    """Every leaf of the tiny VQGAN's train state saved at `step` (params, both optimizers, EMA, code usage, ...)."""
    from clipgen_jax.training import vqgan

    stage = vqgan.VQGANStage(training.load_config(VQGAN_CONFIG))
    abstract = jax.eval_shape(stage.init_state, jax.random.PRNGKey(stage.config.seed))
    abstract = checkpointing.abstract_with_shardings(abstract, parallel.state_shardings(abstract, parallel.make_mesh()))
    checkpointer = checkpointing.Checkpointer(workdir / "checkpoints")
    try:
        state, _ = checkpointer.restore(step, abstract)
    finally:
        checkpointer.close()
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state)]


def assert_bitwise_equal(leaves: list[np.ndarray], expected: list[np.ndarray], context: str = "") -> None:
    assert len(leaves) == len(expected), context
    for index, (leaf, want) in enumerate(zip(leaves, expected)):
        assert leaf.dtype == want.dtype and leaf.shape == want.shape, f"leaf {index}; {context}"
        assert leaf.tobytes() == want.tobytes(), f"leaf {index} differs; {context}"


def precompute_config(models_dir: pathlib.Path, out: pathlib.Path, data_dir: pathlib.Path | None = None,
                      folder: pathlib.Path | None = None):
    """configs/precompute.py:tiny with the tiny models, over the tiny Shapes build in `data_dir` or an image
    `folder`, writing into `out`."""
    config = training.load_config("configs/precompute.py:tiny")
    config.update(vqgan=str(models_dir / "vqgan"), clip=str(models_dir / "clip"))
    config.output.data_dir = str(out)
    if folder is not None:
        config.data.update(source="folder", folder=str(folder))
        config.update(splits=("train",), batch_size=8, shard_size=8)
    else:
        config.data.data_dir = str(data_dir)
    return config


def precompute_args(config) -> list[str]:
    """tools/precompute.py flags giving `config` (a folder config from precompute_config)."""
    assert config.data.source == "folder"
    return ["--config=configs/precompute.py:tiny", f"--config.vqgan={config.vqgan}", f"--config.clip={config.clip}",
            f"--config.output.data_dir={config.output.data_dir}", "--config.data.source=folder",
            f"--config.data.folder={config.data.folder}", "--config.splits=('train',)",
            f"--config.batch_size={config.batch_size}", f"--config.shard_size={config.shard_size}"]
