"""kill -9 of `tools/train.py` (the tiny VQGAN) during a step and during each phase of an asynchronous checkpoint
save, then the same command again: the rerun is not blocked by the dead run's lock, resumes from the newest complete
checkpoint (never from a half-written one), and ends with bitwise the train state of an uninterrupted run.

Each CI run draws two kill points from the logged seed (faultlib.FAULT_SEED): one during a step, then, in the run
that resumes from it, one during a save; `-m faults_exhaustive` kills at every step and in every phase of every save.
"""

import re
import signal

import pytest

from clipgen_jax import checkpointing, training
from faultlib import (FAULT_SEED, SEED_ENV_VAR, VQGAN_OVERRIDES, VQGAN_STEPS, assert_bitwise_equal, checkpoint_steps,
                      final_state, run_tool, train_args)

pytestmark = [pytest.mark.faults, pytest.mark.slow]  # subprocess training runs: not in the fast tier

CHECKPOINT_EVERY = VQGAN_OVERRIDES["checkpoint_every"]
SAVE_STEPS = list(range(CHECKPOINT_EVERY, VQGAN_STEPS + 1, CHECKPOINT_EVERY))
# The phases of a save (see inject.py): files being written, all written but no manifest, manifest but not committed.
SAVE_KILLS = ("save_started", "save_unhashed", "save_uncommitted")


def _resume_message(stderr: str) -> int | None:
    found = re.findall(r"resumed from \S+ at step (\d+)", stderr)
    return int(found[-1]) if found else None


def _run_killed(workdir, data_dir, fault: dict, resumes_from: int | None, context: str) -> int | None:
    """Runs tools/train.py with `fault` (a kill) in `workdir`; checks that it resumed from `resumes_from` and what the
    kill left behind; returns the newest complete checkpoint's step."""
    killed = run_tool("tools/train.py", *train_args(workdir, data_dir), fault=fault)
    assert killed.returncode == -signal.SIGKILL, f"{context}: exit {killed.returncode}\n{killed.stderr[-3000:]}"
    assert _resume_message(killed.stderr) == resumes_from, f"{context}\n{killed.stderr[-3000:]}"
    assert (workdir / training.LOCK_FILE).is_file()  # the dead process's lock file stays; its lock does not
    latest = max(checkpoint_steps(workdir), default=None)
    kind, step = fault["kill"], fault["step"]
    previous = step - CHECKPOINT_EVERY or None
    if kind in ("save_unhashed", "save_uncommitted"):
        assert latest == previous, f"{context}: a save killed before its commit left step {latest} as the newest"
    elif kind == "save_started":  # the background write may finish before the kill lands
        assert latest in (previous, step), f"{context}: newest complete checkpoint {latest}"
    return latest


def _resume_to_the_end(workdir, data_dir, resumes_from: int | None, expected, context: str) -> None:
    resumed = run_tool("tools/train.py", *train_args(workdir, data_dir))
    assert resumed.returncode == 0, f"{context}\n{resumed.stderr[-3000:]}"
    assert _resume_message(resumed.stderr) == resumes_from, f"{context}\n{resumed.stderr[-3000:]}"
    assert_bitwise_equal(final_state(workdir, VQGAN_STEPS), expected, context)
    assert checkpointing.is_bundle(workdir / checkpointing.EXPORT_DIR), context


def test_kill_9_in_a_step_then_in_a_save_and_resume_gives_the_uninterrupted_state(vqgan_reference, shapes_data_dir,
                                                                                  tmp_path, fault_rng):
    _, expected = vqgan_reference
    workdir = tmp_path / "run"
    in_step = {"kill": "step", "step": int(fault_rng.integers(1, VQGAN_STEPS - 2)),
               "delay": round(float(fault_rng.uniform(0.0, 0.5)), 3)}
    context = f"{SEED_ENV_VAR}={FAULT_SEED}: kill {in_step}"
    print(context)
    latest = _run_killed(workdir, shapes_data_dir, in_step, None, context)

    later_saves = [step for step in SAVE_STEPS if step > (latest or 0)]
    if later_saves:  # the run that resumes is killed too, this time while it saves
        in_save = {"kill": str(fault_rng.choice(SAVE_KILLS)), "step": int(fault_rng.choice(later_saves))}
        context += f", then {in_save}"
        print(context)
        latest = _run_killed(workdir, shapes_data_dir, in_save, latest, context)
    _resume_to_the_end(workdir, shapes_data_dir, latest, expected, context)


@pytest.mark.faults_exhaustive
@pytest.mark.parametrize("fault", [{"kill": "step", "step": step, "delay": 0.0} for step in range(1, VQGAN_STEPS)]
                         + [{"kill": kind, "step": step} for kind in SAVE_KILLS for step in SAVE_STEPS],
                         ids=lambda fault: f"{fault['kill']}-{fault['step']}")
def test_every_kill_point(vqgan_reference, shapes_data_dir, tmp_path, fault):
    _, expected = vqgan_reference
    context = f"kill {fault}"
    latest = _run_killed(tmp_path, shapes_data_dir, fault, None, context)
    _resume_to_the_end(tmp_path, shapes_data_dir, latest, expected, context)
