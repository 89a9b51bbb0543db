"""The shared training loop, driven in-process by the minimal autoencoder stage on the `tiny` Shapes build."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipgen_jax import checkpointing, training
from clipgen_jax.data import images
from clipgen_jax.training import autoencoder, loop


def tiny_config(data_dir, **train_overrides):
    config = training.load_config("configs/autoencoder.py:tiny")
    config.data.data_dir = str(data_dir)
    config.train.update(train_overrides)
    return config


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_bitwise_equal(tree_a, tree_b):
    a, b = leaves(tree_a), leaves(tree_b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_run_writes_logs_images_checkpoints_and_provenance(shapes_data_dir, tmp_path):
    config = tiny_config(shapes_data_dir)
    state = training.train(config, tmp_path)
    assert int(state.step) == 20

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
    assert all(r["data/skipped_images"] == 0 for r in train_rows)
    assert [r["step"] for r in rows if "eval/psnr" in r] == [10, 20]

    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "inputs_vs_reconstructions_00000010.png", "inputs_vs_reconstructions_00000020.png"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert checkpointing.Checkpointer(tmp_path / "checkpoints").all_steps() == [10, 15, 20]  # max_to_keep=3

    (provenance_file,) = (tmp_path / "provenance").glob("*.json")
    provenance = json.loads(provenance_file.read_text())
    assert provenance["config"]["train"]["steps"] == 20
    assert provenance["seed"] == 0
    assert provenance["packages"]["jax"] == jax.__version__
    assert "git_commit" in provenance
    assert json.loads((tmp_path / "config.json").read_text())["stage"] == "autoencoder"


class SigtermOnBatch:
    """Delegates to a batch iterator and sends this process SIGTERM while reading batch `at` (1-based)."""

    def __init__(self, inner, at):
        self.inner, self.at, self.calls = inner, at, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.faults
def test_sigterm_saves_and_resume_is_bitwise_identical(shapes_data_dir, tmp_path, monkeypatch):
    uninterrupted = training.train(tiny_config(shapes_data_dir), tmp_path / "a")

    # Deliver SIGTERM while the 8th batch is being read: the loop finishes that step, saves it, and stops.
    make_iterator = images.make_batch_iterator

    def iterator_that_preempts(*args, **kwargs):
        iterator = make_iterator(*args, **kwargs)
        return iterator if kwargs.get("num_epochs") == 1 else SigtermOnBatch(iterator, 8)

    monkeypatch.setattr(images, "make_batch_iterator", iterator_that_preempts)
    with pytest.raises(loop.Preempted, match="SIGTERM at step 8"):
        training.train(tiny_config(shapes_data_dir), tmp_path / "b")
    monkeypatch.setattr(images, "make_batch_iterator", make_iterator)
    assert checkpointing.Checkpointer(tmp_path / "b" / "checkpoints").latest_step() == 8

    resumed = training.train(tiny_config(shapes_data_dir), tmp_path / "b")
    assert int(resumed.step) == 20
    assert_bitwise_equal(resumed, uninterrupted)


class NaNAfterSevenSteps(autoencoder.AutoencoderStage):
    def train_step(self, state, batch):
        state, metrics = super().train_step(state, batch)
        metrics["loss"] = jnp.where(state.step >= 8, jnp.nan, metrics["loss"])
        return state, metrics


@pytest.mark.faults
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(shapes_data_dir, tmp_path):
    config = tiny_config(shapes_data_dir, log_every=10)
    with pytest.raises(loop.NonFiniteError, match=r"at step 8: .*last good checkpoint \(step 5\)"):
        loop.run(config, tmp_path, NaNAfterSevenSteps(config))
    checkpointer = checkpointing.Checkpointer(tmp_path / "checkpoints")
    assert checkpointer.all_steps() == [5]
    stage = autoencoder.AutoencoderStage(config)
    abstract = jax.eval_shape(stage.init_state, jax.random.PRNGKey(0))
    state, data_state = checkpointer.restore(5, abstract)
    assert int(state.step) == 5
    assert all(np.isfinite(x).all() for x in leaves(state.params))


def test_unknown_stage_is_a_clear_error(tmp_path):
    config = training.load_config("configs/autoencoder.py:tiny")
    config.stage = "nonsense"
    with pytest.raises(ValueError, match=r"config.stage='nonsense' is not a known stage; use one of"):
        training.train(config, tmp_path)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        training.load_config("configs/autoencoder.py:huge")
