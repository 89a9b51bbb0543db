"""Two runs on one output directory: while a training run (or a precompute) works in it, a second one on the same
directory is refused at once (`tools/train.py`: with a one-line error naming the holder) and writes nothing; the lock
is released when its holder ends, also by kill -9."""

import os
import pathlib
import signal
import subprocess
import sys

import pytest

from clipgen_jax import locking, precompute, training
from clipgen_jax.data import images, precomputed
from faultlib import REPO_ROOT, assert_one_line_error, precompute_config, run_tool, train_args

pytestmark = pytest.mark.faults

AUTOENCODER = "configs/autoencoder.py:tiny"


def test_a_second_training_run_on_a_busy_workdir_is_refused(shapes_data_dir, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    second = {}
    make_batch_iterator = images.make_batch_iterator

    def start_a_second_run_mid_training(*args, **kwargs):
        iterator = make_batch_iterator(*args, **kwargs)
        if kwargs.get("num_epochs") is None:  # the training iterator, made inside the running (locked) run
            second["result"] = run_tool("tools/train.py", *train_args(workdir, shapes_data_dir, config=AUTOENCODER))
            second["files"] = sorted(str(path.relative_to(workdir)) for path in workdir.rglob("*"))
        return iterator

    monkeypatch.setattr(images, "make_batch_iterator", start_a_second_run_mid_training)
    config = training.load_config(AUTOENCODER)
    config.data.data_dir = str(shapes_data_dir)
    state = training.train(config, str(workdir))
    assert int(state.step) == config.train.steps  # the first run was not disturbed

    line = assert_one_line_error(second["result"], rf"training workdir {workdir} is in use by another process "
                                                   rf"\(pid {os.getpid()} on .*; lock file {workdir}/\.lock\)")
    assert "choose another --workdir" in line
    assert second["files"] == [".lock"]  # the first run writes only once its data is ready; the second wrote nothing
    with locking.exclusive(workdir / training.LOCK_FILE, "test", "none"):  # released when the run ended
        pass


def test_a_second_precompute_into_a_busy_output_is_refused(models_dir, shapes_data_dir, tmp_path):
    """The second run here is a call in the same process (flock locks belong to an open file, not to a process),
    which is refused as another process would be, before it loads any model."""
    config = precompute_config(models_dir, tmp_path / "out", data_dir=shapes_data_dir)
    directory = precomputed.dataset_dir(tmp_path / "out", config.output.name)
    refusals = []

    def start_a_second_run_after_the_first_shard(split, shard):
        if not refusals:
            before = sorted(path.name for path in directory.iterdir())
            with pytest.raises(locking.LockedError) as refused:
                precompute.precompute(config)
            refusals.append(str(refused.value))
            assert sorted(path.name for path in directory.iterdir()) == before  # the refused run wrote nothing

    precompute.precompute(config, on_shard_written=start_a_second_run_after_the_first_shard)
    assert (directory / precomputed.INFO_FILE).is_file()
    assert refusals[0].startswith(f"precompute output {directory} is in use by another process (pid {os.getpid()} ")
    assert refusals[0].endswith("wait for that run to finish (or stop it), or set another output.name or "
                                "output.data_dir")


_HOLDER = """
import sys
from clipgen_jax import locking
with locking.exclusive(sys.argv[1], "the test directory", "none"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_lock_dies_with_its_holder_even_by_kill_9(tmp_path):
    lock_file = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock_file)], cwd=REPO_ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(locking.LockedError, match=rf"the test directory is in use by another process \(pid "
                                                      rf"{holder.pid} on .*; lock file {lock_file}\): try later"):
            with locking.exclusive(lock_file, "the test directory", "try later"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert holder.returncode == -signal.SIGKILL and lock_file.is_file()
    with locking.exclusive(lock_file, "the test directory", "try later"):  # no stale lock to clean up by hand
        assert pathlib.Path(lock_file).read_text().startswith(f"pid {os.getpid()} ")
