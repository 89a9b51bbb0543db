"""Devices, meshes and shardings: the only module that knows what hardware the program runs on.

Everything is `jax.jit` over a two-axis mesh ('data', 'fsdp'). Batches are split over both axes (FSDP is data
parallel too); parameters are replicated, or, with an fsdp axis larger than 1, each large parameter is split along
its largest dimension that the fsdp axis divides. `jax.pmap` is not used (it is in maintenance mode).
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

logger = logging.getLogger(__name__)

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

# Parameters smaller than this stay replicated under FSDP: splitting biases and norms costs more in
# collectives than it saves in memory.
FSDP_MIN_PARAM_SIZE = 2**18

_MULTIHOST_ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def initialize_multihost(enabled: bool | None = None) -> None:
    """Calls `jax.distributed.initialize()` for multi-process runs.

    `enabled=None` detects a multi-process launch: a coordinator address in the environment or a SLURM job with more
    than one task. TPU pod slices and SLURM are auto-configured by JAX; elsewhere set JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    """
    if enabled is None:
        enabled = any(os.environ.get(v) for v in _MULTIHOST_ENV_VARS) or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if enabled and not jax.distributed.is_initialized():
        jax.distributed.initialize()
        logger.info("process %d of %d, %d local devices of %d", jax.process_index(), jax.process_count(),
                     jax.local_device_count(), jax.device_count())


def make_mesh(fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over all devices; `fsdp` devices share each parameter shard group."""
    devices = jax.devices() if devices is None else devices
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must be a positive divisor of the device count {len(devices)}")
    return jax.make_mesh((len(devices) // fsdp, fsdp), BATCH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def _param_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_PARAM_SIZE:
        return P()
    candidates = [d for d in np.argsort(shape)[::-1] if shape[d] % fsdp_size == 0]
    if not candidates:
        return P()
    spec = [None] * len(shape)
    spec[candidates[0]] = FSDP_AXIS
    return P(*spec)


def state_shardings(abstract_state, mesh: Mesh):
    """Shardings for a train-state pytree (of arrays or ShapeDtypeStructs): replicated, or FSDP-split."""
    fsdp_size = mesh.shape[FSDP_AXIS]
    return jax.tree.map(lambda x: NamedSharding(mesh, _param_spec(tuple(x.shape), fsdp_size)), abstract_state)


def global_batch_to_process_batch(global_batch_size: int) -> int:
    """This process's share of a global batch, which must split evenly over every device."""
    if global_batch_size < 1 or global_batch_size % jax.device_count():
        raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the device count "
                         f"{jax.device_count()}; change train.batch_size")
    return global_batch_size // jax.process_count()


def put_batch(batch: dict, mesh: Mesh) -> dict:
    """Host numpy batch (this process's rows) -> global arrays sharded along the batch axis.

    Non-numeric features (captions) stay on the host: a jitted step never sees strings.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()
            if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}


def must_block_each_step() -> bool:
    """The multi-device CPU backend can deadlock in all-reduces when many steps are in flight on few cores."""
    return jax.default_backend() == "cpu" and jax.device_count() > 1


def compute_dtype(name: str) -> jnp.dtype:
    """'auto' is bfloat16 on GPU/TPU and float32 on CPU (where bfloat16 matmuls are slow and emulated)."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"compute dtype {name!r} is not one of 'auto', 'float32', 'bfloat16', 'float16'")
    return jnp.dtype(name)
