"""`tools/train.py` as a user runs it: killed with SIGKILL and resumed, preempted with SIGTERM, and on 4 devices."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from clipgen_jax import checkpointing, training
from clipgen_jax.training import autoencoder

import helpers

pytestmark = pytest.mark.slow
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def train_command(workdir, data_dir, **overrides):
    command = [sys.executable, str(REPO_ROOT / "tools" / "train.py"), "--config=configs/autoencoder.py:tiny",
               f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"]
    return command + [f"--config.train.{k}={v}" for k, v in overrides.items()]


def run_train(workdir, data_dir, env=None, **overrides):
    result = subprocess.run(train_command(workdir, data_dir, **overrides), cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def final_params(workdir, steps):
    stage = autoencoder.AutoencoderStage(training.load_config("configs/autoencoder.py:tiny"))
    return [np.asarray(x) for x in jax.tree.leaves(helpers.checkpointed_state(workdir, steps, stage).params)]


LONG_RUN = dict(steps=300, checkpoint_every=20, log_every=10, eval_every=0)


@pytest.mark.faults
def test_sigkill_mid_run_then_resume_gives_bitwise_identical_parameters(shapes_data_dir, tmp_path):
    run_train(tmp_path / "uninterrupted", shapes_data_dir, **LONG_RUN)

    workdir = tmp_path / "killed"
    process = subprocess.Popen(train_command(workdir, shapes_data_dir, **LONG_RUN), cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "60").exists():  # a step directory appears only once complete
        assert process.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    steps_at_kill = checkpointing.Checkpointer(workdir / "checkpoints").all_steps()
    assert 60 in steps_at_kill and 300 not in steps_at_kill

    resumed = run_train(workdir, shapes_data_dir, **LONG_RUN)
    assert "resumed from" in resumed.stderr
    for a, b in zip(final_params(tmp_path / "uninterrupted", 300), final_params(workdir, 300), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.faults
def test_sigterm_exits_143_after_saving(shapes_data_dir, tmp_path):
    process = subprocess.Popen(train_command(tmp_path, shapes_data_dir, **LONG_RUN), cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "checkpoints" / "20").exists():
        assert process.poll() is None
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    assert "checkpoint saved" in stderr
    latest = checkpointing.Checkpointer(tmp_path / "checkpoints").latest_step()
    assert 20 <= latest < 300


def test_four_devices_follow_the_one_device_loss_trajectory(shapes_data_dir, tmp_path):
    losses = {}
    for devices in (1, 4):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        run_train(tmp_path / str(devices), shapes_data_dir, env=env, log_every=1, eval_every=0)
        (provenance_file,) = (tmp_path / str(devices) / "provenance").glob("*.json")
        assert len(json.loads(provenance_file.read_text())["devices"]) == devices
        rows = [json.loads(line) for line in (tmp_path / str(devices) / "metrics.jsonl").read_text().splitlines()]
        losses[devices] = np.array([r["train/loss"] for r in rows])
    assert len(losses[1]) == 20
    np.testing.assert_allclose(losses[4], losses[1], rtol=1e-5)
    for a, b in zip(final_params(tmp_path / "1", 20), final_params(tmp_path / "4", 20), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
