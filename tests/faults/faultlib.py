"""What the fault suite's tests share (its fixtures are in conftest.py): the logged seed that draws kill points,
tools run as a user runs them (optionally through inject.py), the one-line-error check, the tiny stage runs that
interrupted runs must reproduce, and tiny precompute configs. A module of its own rather than conftest.py, because
`from conftest import ...` gets whichever conftest.py pytest loaded last (tests/ has one too)."""

import dataclasses
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

# Drawn once per pytest run unless set, so that many CI runs cover many kill points; a failure names it (and the
# terminal summary prints it) so that `CLIPGEN_FAULT_SEED=<seed> python -m pytest -m faults` replays the same points.
SEED_ENV_VAR = "CLIPGEN_FAULT_SEED"
FAULT_SEED = int(os.environ.get(SEED_ENV_VAR) or secrets.randbelow(2**31))


@dataclasses.dataclass(frozen=True)
class StageRun:
    """A stage's run that the kill and corruption tests interrupt, and that the interrupted runs must reproduce."""

    config: str
    train: dict  # --config.train.* settings: steps, checkpoint_every, ...
    # The longest a kill "during a step" waits after the step's batch is requested: well within the time the rest of
    # the run takes, so that the kill lands before the run ends.
    max_kill_delay: float

    @property
    def steps(self) -> int:
        return self.train["steps"]

    @property
    def save_steps(self) -> list[int]:
        return list(range(self.train["checkpoint_every"], self.steps + 1, self.train["checkpoint_every"]))


# The tiny VQGAN (GAN, EMA, code usage: every kind of state a stage has), 8 steps; the tiny prior (a precomputed
# dataset and two frozen models, a stage of another kind), 6 steps of a few milliseconds each. A checkpoint every 2
# steps (of which the newest 3 are kept), no evaluation.
RUNS = {
    "vqgan": StageRun("configs/vqgan.py:tiny", dict(steps=8, checkpoint_every=2, eval_every=0), max_kill_delay=0.5),
    "prior": StageRun("configs/prior.py:tiny", dict(steps=6, checkpoint_every=2, eval_every=0), max_kill_delay=0.05),
}


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


def train_args(workdir: pathlib.Path, data_dir: pathlib.Path, config: str | StageRun = RUNS["vqgan"], *,
               vqgan: pathlib.Path | None = None, clip: pathlib.Path | None = None, **overrides) -> list[str]:
    """tools/train.py flags: `config` a StageRun (with its train settings) or a config file spec; `vqgan` and `clip`
    the frozen models a prior's precomputed dataset (`data_dir`) was made with; `overrides` more train settings."""
    if isinstance(config, StageRun):
        config, overrides = config.config, {**config.train, **overrides}
    frozen = {name: path for name, path in (("vqgan", vqgan), ("clip", clip)) if path is not None}
    return [f"--config={config}", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            *(f"--config.{name}={path}" for name, path in frozen.items()),
            *(f"--config.train.{key}={value}" for key, value in overrides.items())]


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    """The steps of the complete checkpoints in a training workdir."""
    checkpointer = checkpointing.Checkpointer(workdir / "checkpoints")
    try:
        return checkpointer.all_steps()
    finally:
        checkpointer.close()


def final_state(workdir: pathlib.Path, run: StageRun = RUNS["vqgan"]) -> list[np.ndarray]:
    """Every leaf of `run`'s train state saved at its last step (params, optimizer states, EMA, code usage, ...)."""
    from clipgen_jax.training import prior, vqgan

    config = training.load_config(run.config)
    config.train.update(run.train)
    # The state's structure from the config alone: PriorSteps reads neither the prior's dataset nor its models.
    stage = prior.PriorSteps(config) if config.stage == "prior" else vqgan.VQGANStage(config)
    abstract = jax.eval_shape(stage.init_state, jax.random.PRNGKey(config.seed))
    abstract = checkpointing.abstract_with_shardings(abstract, parallel.state_shardings(abstract, parallel.make_mesh()))
    checkpointer = checkpointing.Checkpointer(workdir / "checkpoints")
    try:
        state, _ = checkpointer.restore(run.steps, abstract)
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
        config.data.update(source="folder", folder=str(folder), validation_fraction=0.0)
        config.update(splits=("train",), batch_size=8, shard_size=8)
    else:
        config.data.data_dir = str(data_dir)
    return config


def precompute_args(config) -> list[str]:
    """tools/precompute.py flags giving `config` (one from precompute_config)."""
    if config.data.source == "folder":
        source = ["--config.data.source=folder", f"--config.data.folder={config.data.folder}",
                  "--config.data.validation_fraction=0",
                  "--config.splits=('train',)", f"--config.batch_size={config.batch_size}",
                  f"--config.shard_size={config.shard_size}"]
    else:
        source = [f"--config.data.data_dir={config.data.data_dir}"]
    return ["--config=configs/precompute.py:tiny", f"--config.vqgan={config.vqgan}", f"--config.clip={config.clip}",
            f"--config.output.data_dir={config.output.data_dir}", *source]
