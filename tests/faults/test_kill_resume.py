"""kill -9 of `tools/train.py` during a step and during each phase of an asynchronous checkpoint save, for the tiny
VQGAN and the tiny prior, then the same command again: the rerun is not blocked by the dead run's lock, resumes from
the newest complete checkpoint (never from a half-written one), and ends with bitwise the train state of an
uninterrupted run. And kill -9 of `tools/precompute.py` while it writes a shard: until the rerun completes it, the
dataset is never presented as complete, and the rerun ends with the uninterrupted run's dataset, byte for byte.

Each CI run draws its kill points from the logged seed (faultlib.FAULT_SEED): for the VQGAN one during a step, then,
in the run that resumes from it, one during a save; for the prior one during a step; for precompute one batch write;
`-m faults_exhaustive` kills at every step, in every phase of every save and at every batch write.
"""

import re
import signal

import pytest
from helpers import assert_same_dataset

from clipgen_jax import checkpointing, precompute, training
from clipgen_jax.data import precomputed
from faultlib import (FAULT_SEED, RUNS, SEED_ENV_VAR, assert_bitwise_equal, checkpoint_steps, final_state,
                      precompute_args, precompute_config, run_tool, train_args)

pytestmark = [pytest.mark.faults, pytest.mark.slow]  # subprocess training runs: not in the fast tier

# The phases of a save (see inject.py): files being written, all written but no manifest, manifest but not committed.
SAVE_KILLS = ("save_started", "save_unhashed", "save_uncommitted")
# The tiny precompute preset's batch writes (batches of 32 never cross a shard of 40 images): validation's 128 images
# in shards of 40 + 40 + 40 + 8 make 2 + 2 + 2 + 1 batches, heldout's 96 in 40 + 40 + 16 make 2 + 2 + 1.
PRECOMPUTE_BATCHES = 12


def _resume_message(stderr: str) -> int | None:
    found = re.findall(r"resumed from \S+ at step (\d+)", stderr)
    return int(found[-1]) if found else None


def _stage_run(stage: str, request, workdir) -> tuple:
    """RUNS[stage], its tools/train.py flags in `workdir` and the final train state of its uninterrupted run (the
    fixtures by name: the prior's dataset and reference run are made only when a prior test runs)."""
    _, expected = request.getfixturevalue(f"{stage}_reference")
    if stage == "prior":
        vqgan, clip, data_dir = request.getfixturevalue("prior_dataset")
        args = train_args(workdir, data_dir, RUNS[stage], vqgan=vqgan, clip=clip)
    else:
        args = train_args(workdir, request.getfixturevalue("shapes_data_dir"), RUNS[stage])
    return RUNS[stage], args, expected


def _run_killed(run, workdir, args, fault: dict, resumes_from: int | None, context: str) -> int | None:
    """Runs tools/train.py `args` (training `run` in `workdir`) with `fault` (a kill); checks that it resumed from
    `resumes_from` and what the kill left behind; returns the newest complete checkpoint's step."""
    killed = run_tool("tools/train.py", *args, fault=fault)
    assert killed.returncode == -signal.SIGKILL, f"{context}: exit {killed.returncode}\n{killed.stderr[-3000:]}"
    assert _resume_message(killed.stderr) == resumes_from, f"{context}\n{killed.stderr[-3000:]}"
    assert (workdir / training.LOCK_FILE).is_file()  # the dead process's lock file stays; its lock does not
    latest = max(checkpoint_steps(workdir), default=None)
    kind, step = fault["kill"], fault["step"]
    previous = step - run.train["checkpoint_every"] or None
    if kind in ("save_unhashed", "save_uncommitted"):
        assert latest == previous, f"{context}: a save killed before its commit left step {latest} as the newest"
    elif kind == "save_started":  # the background write may finish before the kill lands
        assert latest in (previous, step), f"{context}: newest complete checkpoint {latest}"
    return latest


def _resume_to_the_end(run, workdir, args, resumes_from: int | None, expected, context: str) -> None:
    resumed = run_tool("tools/train.py", *args)
    assert resumed.returncode == 0, f"{context}\n{resumed.stderr[-3000:]}"
    assert _resume_message(resumed.stderr) == resumes_from, f"{context}\n{resumed.stderr[-3000:]}"
    assert_bitwise_equal(final_state(workdir, run), expected, context)
    assert checkpointing.is_bundle(workdir / checkpointing.EXPORT_DIR), context


@pytest.mark.parametrize("stage", ["vqgan", "prior"])
def test_kill_9_and_resume_gives_the_uninterrupted_state(stage, request, tmp_path, fault_rng):
    """A kill while a step early enough to leave saves after it computes (or soon after); for the VQGAN, the run that
    resumes is killed too, this time while it saves (the prior's saves are the same code: one kill keeps CI short)."""
    run, args, expected = _stage_run(stage, request, tmp_path)
    in_step = {"kill": "step", "step": int(fault_rng.integers(1, run.steps - 2)),
               "delay": round(float(fault_rng.uniform(0.0, run.max_kill_delay)), 3)}
    context = f"{SEED_ENV_VAR}={FAULT_SEED}: {stage}, kill {in_step}"
    print(context)
    latest = _run_killed(run, tmp_path, args, in_step, None, context)

    later_saves = [step for step in run.save_steps if step > (latest or 0)] if stage == "vqgan" else []
    if later_saves:
        in_save = {"kill": str(fault_rng.choice(SAVE_KILLS)), "step": int(fault_rng.choice(later_saves))}
        context += f", then {in_save}"
        print(context)
        latest = _run_killed(run, tmp_path, args, in_save, latest, context)
    _resume_to_the_end(run, tmp_path, args, latest, expected, context)


@pytest.mark.faults_exhaustive
@pytest.mark.parametrize("stage, fault", [
    (stage, fault) for stage, run in RUNS.items()
    for fault in [{"kill": "step", "step": step, "delay": 0.0} for step in range(1, run.steps)]
    + [{"kill": kind, "step": step} for kind in SAVE_KILLS for step in run.save_steps]],
    ids=lambda value: value if isinstance(value, str) else f"{value['kill']}-{value['step']}")
def test_every_kill_point(stage, fault, request, tmp_path):
    run, args, expected = _stage_run(stage, request, tmp_path)
    context = f"{stage}: kill {fault}"
    latest = _run_killed(run, tmp_path, args, fault, None, context)
    _resume_to_the_end(run, tmp_path, args, latest, expected, context)


def _kill_precompute_while_writing_then_rerun(models_dir, prior_dataset, shapes_data_dir, out, after: int,
                                              context: str) -> None:
    """tools/precompute.py killed just before its (after + 1)-th batch write, then run again (in this process: a
    third process would cost CI another model load for what test_precompute.py shows already); the uninterrupted
    dataset to equal is prior_dataset's (the same preset, models and images)."""
    expected = precomputed.dataset_dir(prior_dataset[2], "tiny")
    config = precompute_config(models_dir, out, data_dir=shapes_data_dir)
    directory = precomputed.dataset_dir(out, config.output.name)
    killed = run_tool("tools/precompute.py", *precompute_args(config),
                      fault={"kill": "call", "target": "clipgen_jax.precompute:_write_batch", "after": after})
    assert killed.returncode == -signal.SIGKILL, f"{context}: exit {killed.returncode}\n{killed.stderr[-3000:]}"

    # In between, the dataset is unfinished: no dataset_info.json, a reader refuses it, the shard that was being
    # written has only its temporary name, and every shard under its final name is complete.
    assert not (directory / precomputed.INFO_FILE).exists(), context
    with pytest.raises(FileNotFoundError, match="is unfinished"):
        precomputed.load_builder(out, config.output.name)
    assert len(list(directory.glob(".*.incomplete"))) == 1, context
    for shard in directory.glob("[!.]*.array_record-*"):
        assert shard.read_bytes() == (expected / shard.name).read_bytes(), f"{context}: {shard.name}"

    precompute.precompute(config)
    assert_same_dataset(directory, expected)
    assert not list(directory.glob(".*")), context  # the dead run's temporary file was written over and renamed


def test_kill_9_while_precompute_writes_a_shard_then_rerun_gives_the_uninterrupted_dataset(
        models_dir, prior_dataset, shapes_data_dir, tmp_path, fault_rng):
    after = int(fault_rng.integers(0, PRECOMPUTE_BATCHES))
    context = f"{SEED_ENV_VAR}={FAULT_SEED}: precompute killed before batch write {after + 1}"
    print(context)
    _kill_precompute_while_writing_then_rerun(models_dir, prior_dataset, shapes_data_dir, tmp_path, after, context)


@pytest.mark.faults_exhaustive
@pytest.mark.parametrize("after", range(PRECOMPUTE_BATCHES))
def test_precompute_killed_at_every_batch_write(after, models_dir, prior_dataset, shapes_data_dir, tmp_path):
    _kill_precompute_while_writing_then_rerun(models_dir, prior_dataset, shapes_data_dir, tmp_path, after,
                                              f"precompute killed before batch write {after + 1}")
