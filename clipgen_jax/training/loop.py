"""The training loop every stage shares: mesh, data, resume, the jitted step, evaluation, logging, checkpoints.

A stage supplies three pure functions (see `Stage`); the loop owns everything with side effects. A run resumes from
the newest complete checkpoint in `workdir/checkpoints` (train state and data iterator position), so an interrupted
run that is started again ends with bitwise the parameters of an uninterrupted one on the same hardware.
"""

from __future__ import annotations

import json
import logging
import pathlib
import signal
import time
from typing import Any, Protocol

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from clipgen_jax import checkpointing, parallel
from clipgen_jax.data import images
from clipgen_jax.training import provenance, writer as writer_lib

logger = logging.getLogger(__name__)

Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """State of a single-optimizer stage. `rng` is a fixed key: steps derive theirs with `fold_in(rng, step)`."""
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


class Stage(Protocol):
    """What a stage gives the loop. All three are pure functions, jitted by the loop with its shardings."""

    def init_state(self, rng: jax.Array) -> Any:
        """A fresh train state (any pytree with an integer `step` field)."""

    def train_step(self, state: Any, batch: dict[str, jax.Array]) -> tuple[Any, Metrics]:
        """One optimisation step. Metrics are scalars, `loss` among them; all must be finite. The loop logs their
        means over each logging interval."""

    def eval_step(self, state: Any, batch: dict[str, jax.Array]) -> tuple[Metrics, dict[str, jax.Array]]:
        """Scalars and image batches ([N, H, W, 3] in [-1, 1]) for a fixed evaluation batch."""

    # Optional hooks (looked up with getattr):
    #   make_batch_iterator(data_config, **kwargs): the stage's own input pipeline (default images.make_batch_iterator)
    #   initial_params(): params to start from instead of the init (fine-tuning); None for the init
    #   host_eval(state) -> dict of floats: evaluation that needs the host (whole splits, tokenizers), run at each
    #       evaluation point and logged under eval/


class NonFiniteError(RuntimeError):
    """A step produced a NaN/inf metric; nothing from that step on was saved."""


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint of the last finished step was written."""


def default_train_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        steps=1000,
        batch_size=32,  # global, over all devices and processes
        eval_batch_size=32,
        log_every=50,
        eval_every=500,
        checkpoint_every=500,
        max_to_keep=3,
        async_checkpoint=True,
        compute_dtype="auto",  # bfloat16 on GPU/TPU, float32 on CPU
        # False reads the training records in order: runs on different process counts then see the same records
        # in each global batch (in another row order), as the multi-host test needs.
        shuffle=True,
        train_split="train",
        eval_split="validation",
    ))


def default_mesh_config() -> ml_collections.ConfigDict:
    # fsdp_min_size: parameters (and their optimizer moments) smaller than this stay replicated under FSDP.
    return ml_collections.ConfigDict(dict(fsdp=1, fsdp_min_size=parallel.FSDP_MIN_PARAM_SIZE))


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks between steps, so a preempted run saves before it exits."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def _handle(self, signum, frame):
        del signum, frame
        self.raised = True

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)


def _accumulating_step(stage: Stage):
    """The stage's step, also summing its metrics since the last log point and remembering the first step whose
    metrics were not finite (-1 while all are). Both stay on device, so logging and the finiteness check cost one
    transfer at log and save points, not a host sync every step."""

    def step(state, batch, metric_sums, first_bad_step):
        new_state, metrics = stage.train_step(state, batch)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(m)) for m in jax.tree.leaves(metrics)]))
        first_bad_step = jnp.where((first_bad_step < 0) & ~finite, state.step, first_bad_step)
        metric_sums = jax.tree.map(lambda total, m: total + m.astype(jnp.float32), metric_sums, metrics)
        return new_state, metric_sums, first_bad_step

    return step


def jit_train_step(stage: Stage, state_shardings, mesh) -> Any:
    """The step the loop runs: the stage's train_step with metric sums and the first non-finite step (see
    `_accumulating_step`), the state sharded as `state_shardings`, the batch split over every device, and the state
    and metric sums donated (updated in place). Called as step(state, batch, metric_sums, first_bad_step)."""
    replicated = parallel.replicated(mesh)
    return jax.jit(parallel.traced_with_activation_sharding(_accumulating_step(stage), mesh),
                   in_shardings=(state_shardings, parallel.batch_sharding(mesh), replicated, replicated),
                   out_shardings=(state_shardings, replicated, replicated), donate_argnums=(0, 2))


def _zero_metrics(stage: Stage, state, batch) -> dict[str, np.ndarray]:
    shapes = jax.eval_shape(stage.train_step, state, batch)[1]
    return jax.tree.map(lambda m: np.zeros(m.shape, np.float32), shapes)


def _batch_iterator_factory(stage: Stage):
    return getattr(stage, "make_batch_iterator", images.make_batch_iterator)


def eval_split(config: ml_collections.ConfigDict) -> str:
    """The split of the fixed evaluation batch: `train.eval_split`, except for an image folder without a validation
    part (data.validation_fraction=0), which has only its training images to show."""
    data = config.data
    if data.get("source") == "folder" and data.validation_fraction == 0:
        return "train"
    return config.train.eval_split


def _fixed_eval_batch(config: ml_collections.ConfigDict, mesh, stage: Stage) -> dict:
    eval_data = config.data.copy_and_resolve_references()
    if "crop" in eval_data:  # image sources: evaluate on the center crop, unflipped
        eval_data.crop, eval_data.flip = "center", False
    split = eval_split(config)
    if "source" in eval_data:
        logger.info("evaluating on %s", images.describe(eval_data, split))
    iterator = _batch_iterator_factory(stage)(
        eval_data, split=split,
        batch_size=parallel.global_batch_to_process_batch(config.train.eval_batch_size),
        seed=config.seed, shuffle=False, num_epochs=1)
    batch = next(iter(iterator))
    iterator.close()  # stops its reader threads or worker processes now, not at garbage collection
    return parallel.put_batch(batch, mesh)


def check_recorded_folder_part(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Refuses to resume an image-folder run with another `data.validation_fraction` than it recorded (its training
    part would change under the saved data position)."""
    recorded_path = workdir / "config.json"
    if (config.data.get("source") != "folder" or not recorded_path.is_file()
            or not any((workdir / "checkpoints").glob("*"))):
        return
    recorded = json.loads(recorded_path.read_text()).get("data", {})
    if recorded.get("source") != "folder":
        return
    fraction = images.recorded_validation_fraction(recorded)
    if fraction != config.data.validation_fraction:
        raise ValueError(f"{workdir} trained on the image folder with data.validation_fraction={fraction} (0 when it "
                         "records none: made before folders had a validation part); resume it with "
                         f"--config.data.validation_fraction={fraction}, or train into a new --workdir")


def check_train_config(train_cfg: ml_collections.ConfigDict) -> None:
    """Refuses loop settings that cannot run; needs nothing loaded (tools/train.py checks them before it writes)."""
    for name in ("steps", "log_every", "checkpoint_every", "max_to_keep"):
        if train_cfg[name] < 1:
            raise ValueError(f"train.{name}={train_cfg[name]} must be at least 1")
    if train_cfg.eval_every < 0:
        raise ValueError(f"train.eval_every={train_cfg.eval_every} must be >= 0 (0 turns evaluation off)")


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, stage: Stage) -> Any:
    """Trains `stage` to `config.train.steps`, resuming from `workdir` if it holds checkpoints; returns the state."""
    train_cfg = config.train
    check_train_config(train_cfg)
    workdir = pathlib.Path(workdir)
    mesh = parallel.make_mesh(config.mesh.fsdp)
    check_recorded_folder_part(config, workdir)
    # The data (whose source, split and settings the iterators check) before anything is written: a config the data
    # pipeline refuses leaves no provenance, config.json or checkpoints/ behind.
    train_iter = _batch_iterator_factory(stage)(
        config.data, split=train_cfg.train_split,
        batch_size=parallel.global_batch_to_process_batch(train_cfg.batch_size), seed=config.seed,
        shuffle=train_cfg.shuffle)
    eval_batch = _fixed_eval_batch(config, mesh, stage) if train_cfg.eval_every else None
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        provenance.record(workdir, config.to_dict())

    rng = jax.random.PRNGKey(config.seed)
    abstract_state = jax.eval_shape(stage.init_state, rng)
    state_shardings = parallel.state_shardings(abstract_state, mesh, config.mesh.fsdp_min_size)
    checkpointer = checkpointing.Checkpointer(workdir / "checkpoints", max_to_keep=train_cfg.max_to_keep,
                                              save_interval_steps=1, async_save=train_cfg.async_checkpoint)
    restored = checkpointer.restore_latest(checkpointing.abstract_with_shardings(abstract_state, state_shardings))
    if restored is None:
        state = jax.jit(stage.init_state, out_shardings=state_shardings)(rng)
        initial_params = getattr(stage, "initial_params", lambda: None)()
        if initial_params is not None:
            state = state.replace(params=jax.device_put(initial_params, state_shardings.params))
    else:
        state, data_state = restored
        train_iter.set_state(data_state)
    step = int(state.step)
    if restored is not None:
        logger.info("resumed from %s at step %d", checkpointer.directory, step)

    replicated = parallel.replicated(mesh)
    train_step = jit_train_step(stage, state_shardings, mesh)
    eval_step = jax.jit(parallel.traced_with_activation_sharding(stage.eval_step, mesh), out_shardings=replicated)
    first_bad_step = jax.device_put(jnp.asarray(-1, jnp.int32), replicated)
    zero_metrics = metric_sums = None  # shaped like the stage's metrics, known once the first batch is read
    block_each_step = parallel.must_block_each_step()
    metric_writer = writer_lib.MetricWriter(workdir)
    saved_step = step if restored is not None else None

    def check_finite():
        bad = int(first_bad_step)
        if bad >= 0:
            checkpointer.wait()
            raise NonFiniteError(
                f"non-finite loss or gradient at step {bad + 1}: training stopped; the last good checkpoint "
                f"(step {checkpointer.latest_step()}) in {checkpointer.directory} is intact. Lower the learning "
                f"rate or check the data")

    def save(force_step: int):
        nonlocal saved_step
        check_finite()
        checkpointer.save(force_step, state, train_iter.get_state(), force=True)
        saved_step = force_step

    progress = tqdm.tqdm(total=train_cfg.steps, initial=step, desc=f"train {config.stage}", unit="step",
                         disable=jax.process_index() != 0, dynamic_ncols=True)
    last_log_time, last_log_step = time.perf_counter(), step
    try:
        with _SigtermFlag() as sigterm:
            while step < train_cfg.steps:
                batch = parallel.put_batch(next(train_iter), mesh)
                if zero_metrics is None:
                    zero_metrics = _zero_metrics(stage, state, batch)
                    metric_sums = jax.device_put(zero_metrics, replicated)
                state, metric_sums, first_bad_step = train_step(state, batch, metric_sums, first_bad_step)
                step += 1
                progress.update(1)
                if block_each_step:
                    jax.block_until_ready(first_bad_step)
                if step % train_cfg.log_every == 0 or step == train_cfg.steps:
                    check_finite()
                    now = time.perf_counter()
                    scalars = {f"train/{k}": v / (step - last_log_step) for k, v in jax.device_get(metric_sums).items()}
                    metric_sums = jax.device_put(zero_metrics, replicated)
                    scalars["train/steps_per_second"] = (step - last_log_step) / (now - last_log_time)
                    scalars["data/skipped_images"] = train_iter.num_skipped
                    metric_writer.write_scalars(step, scalars)
                    progress.set_postfix(loss=f"{float(scalars['train/loss']):.4g}")
                    last_log_time, last_log_step = now, step
                if eval_batch is not None and (step % train_cfg.eval_every == 0 or step == train_cfg.steps):
                    eval_scalars, eval_images = jax.device_get(eval_step(state, eval_batch))
                    metric_writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_scalars.items()})
                    metric_writer.write_images(step, eval_images)
                    if hasattr(stage, "host_eval"):
                        metric_writer.write_scalars(step, {f"eval/{k}": v for k, v in stage.host_eval(state).items()})
                if step % train_cfg.checkpoint_every == 0 or step == train_cfg.steps:
                    save(step)
                if sigterm.raised:
                    if saved_step != step:
                        save(step)
                    checkpointer.wait()
                    raise Preempted(f"SIGTERM at step {step}: checkpoint saved in {checkpointer.directory}; "
                                    f"run the same command again to resume")
        checkpointer.wait()
    finally:
        progress.close()
        train_iter.close()
        metric_writer.close()
        checkpointer.close()
    return state
