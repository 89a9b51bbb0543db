"""Devices, meshes and shardings: the only module that knows what hardware the program runs on.

Everything is `jax.jit` over a two-axis mesh ('data', 'fsdp'). Batches are split over both axes (FSDP is data
parallel too); parameters are replicated, or, with an fsdp axis larger than 1, each large parameter is split along
its largest dimension that the fsdp axis divides. `jax.pmap` is not used (it is in maintenance mode).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

logger = logging.getLogger(__name__)

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

# Parameters smaller than this stay replicated under FSDP: splitting biases and norms costs more in
# collectives than it saves in memory.
FSDP_MIN_PARAM_SIZE = 2**18

# Logical activation axes (models mark them with flax.linen.with_logical_constraint) -> mesh axes; names not listed
# ("length", "embed", ...) stay unsplit. Without these constraints XLA's sharding propagation follows the FSDP-split
# weights and splits activations along their features, so that every device holds the whole batch: for gpt2_large
# on 8 devices each one computed every micro-batch row's attention, with 96 GB of temporaries instead of 33 GB
# (XLA's CPU estimate; tests/training/test_fsdp_compile.py).
ACTIVATION_AXIS_RULES = (("batch", BATCH_AXES),)

# JAX reads the coordinator address from the environment itself, but not the process count and index: those it
# auto-detects on Cloud TPU, SLURM, Open MPI and Kubernetes only, so an explicit launch passes them through these.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
# Cross-process collectives of the CPU backend. Without them every computation spanning two processes fails with
# "Multiprocess computations aren't implemented on the CPU backend"; JAX releases before gloo became the default
# left them off. The environment variable, when set, wins (e.g. "mpi").
CPU_COLLECTIVES_ENV = "JAX_CPU_COLLECTIVES_IMPLEMENTATION"


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def initialize_multihost(enabled: bool | None = None) -> None:
    """Calls `jax.distributed.initialize()` for multi-process runs, before anything touches a device.

    `enabled=None` detects a multi-process launch: JAX_COORDINATOR_ADDRESS in the environment or a SLURM job with
    more than one task. Cloud TPU pod slices (pass `--multihost`), SLURM and Open MPI are auto-configured by JAX;
    elsewhere set JAX_COORDINATOR_ADDRESS=host:port (process 0's host, a free port), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID on every process. The CPU backend gets gloo collectives (see CPU_COLLECTIVES_ENV).
    """
    if enabled is None:
        enabled = bool(os.environ.get(COORDINATOR_ENV)) or (_int_env("SLURM_NTASKS") or 1) > 1
    if not enabled or jax.distributed.is_initialized():
        return
    num_processes, process_id = _int_env(NUM_PROCESSES_ENV), _int_env(PROCESS_ID_ENV)
    if (num_processes is None) != (process_id is None):
        raise ValueError(f"set both {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV}, or neither (auto-detection)")
    if not os.environ.get(CPU_COLLECTIVES_ENV):
        # Only the CPU client reads it: harmless on GPU/TPU hosts, whose CPU client then also spans processes.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(num_processes=num_processes, process_id=process_id)
    logger.info("process %d of %d, %d local devices of %d", jax.process_index(), jax.process_count(),
                jax.local_device_count(), jax.device_count())


def split_cpu(devices: int) -> None:
    """Presents the host CPU as `devices` JAX devices, so that the mesh's data axis splits each batch over the cores.

    XLA:CPU spreads one small convolution poorly over cores: on 2 cores the Shapes VQGAN trains 1.5x faster as 2
    devices, the Shapes prior as fast (docs/experiments.md, "Performance history"). Call it before anything touches
    a device; GPUs and TPUs are unaffected. The loss trajectory matches one device's within float rounding."""
    if devices < 1:
        raise ValueError(f"cpu_devices={devices} must be at least 1")
    try:
        jax.config.update("jax_num_cpu_devices", devices)
    except RuntimeError as error:  # the backend already exists
        raise RuntimeError(f"split_cpu({devices}) must run before JAX initialises its devices ({error})") from None


def make_mesh(fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over all devices; `fsdp` devices share each parameter shard group."""
    devices = jax.devices() if devices is None else devices
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must be a positive divisor of the device count {len(devices)}")
    return jax.make_mesh((len(devices) // fsdp, fsdp), BATCH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
    """While tracing inside this context, activations marked with logical axis names are split as
    ACTIVATION_AXIS_RULES say over `mesh`; outside it (sampling, tests) the marks do nothing."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(ACTIVATION_AXIS_RULES):
        yield


def traced_with_activation_sharding(fn, mesh: Mesh):
    """`fn`, traced (by jax.jit) inside `activation_sharding(mesh)`."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_sharding(mesh):
            return fn(*args, **kwargs)
    return wrapped


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def _param_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = FSDP_MIN_PARAM_SIZE) -> P:
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    candidates = [d for d in np.argsort(shape)[::-1] if shape[d] % fsdp_size == 0]
    if not candidates:
        return P()
    spec = [None] * len(shape)
    spec[candidates[0]] = FSDP_AXIS
    return P(*spec)


def state_shardings(abstract_state, mesh: Mesh, fsdp_min_size: int = FSDP_MIN_PARAM_SIZE):
    """Shardings for a train-state pytree (of arrays or ShapeDtypeStructs): replicated, or FSDP-split (leaves of at
    least `fsdp_min_size` elements)."""
    fsdp_size = mesh.shape[FSDP_AXIS]
    return jax.tree.map(lambda x: NamedSharding(mesh, _param_spec(tuple(x.shape), fsdp_size, fsdp_min_size)),
                        abstract_state)


def to_host(tree):
    """Whole numpy copies of a pytree of global arrays, on every process. Under FSDP over several processes no
    process holds every shard, so this is a collective: every process must call it (e.g. before process 0 exports)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


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
