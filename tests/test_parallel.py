"""Mesh and sharding rules (on the single CPU device, plus the pure parameter-spec logic), and splitting the CPU."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from clipgen_jax import parallel


def test_mesh_over_all_devices_with_data_and_fsdp_axes():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data", "fsdp")
    assert mesh.shape == {"data": jax.device_count(), "fsdp": 1}


def test_fsdp_must_divide_the_device_count():
    with pytest.raises(ValueError, match="mesh.fsdp=3 must be a positive divisor of the device count 1"):
        parallel.make_mesh(fsdp=3)


@pytest.mark.parametrize("shape, fsdp, expected", [
    ((1024, 4096), 4, P(None, "fsdp")),          # largest divisible dimension
    ((4096, 1024), 4, P("fsdp", None)),
    ((3, 3, 512, 1024), 8, P(None, None, None, "fsdp")),
    ((4097, 1023), 4, P()),                      # nothing divisible: replicated
    ((128,), 4, P()),                            # small: replicated
    ((1024, 4096), 1, P()),                      # no fsdp axis: replicated
])
def test_fsdp_parameter_spec(shape, fsdp, expected):
    assert parallel._param_spec(shape, fsdp) == expected


def test_put_batch_shards_numeric_features_and_keeps_strings_on_host():
    mesh = parallel.make_mesh()
    batch = {"image": np.ones((4, 2, 2, 3), np.float32), "shape": np.arange(4), "caption": np.array(["a"] * 4)}
    on_device = parallel.put_batch(batch, mesh)
    assert sorted(on_device) == ["image", "shape"]
    assert on_device["image"].sharding == parallel.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(on_device["shape"]), np.arange(4))


def test_global_batch_must_split_over_devices():
    assert parallel.global_batch_to_process_batch(8) == 8
    with pytest.raises(ValueError, match="global batch size 0 must be a positive multiple of the device count 1"):
        parallel.global_batch_to_process_batch(0)


def test_compute_dtype():
    assert parallel.compute_dtype("auto") == jnp.float32  # this suite runs on CPU
    assert parallel.compute_dtype("bfloat16") == jnp.bfloat16
    with pytest.raises(ValueError, match="compute dtype 'fp8'"):
        parallel.compute_dtype("fp8")


def test_fsdp_min_size_sets_what_stays_replicated():
    assert parallel._param_spec((64, 32), 4, min_size=1024) == P("fsdp", None)
    assert parallel._param_spec((16, 32), 4, min_size=1024) == P()


@pytest.mark.parametrize("env, message", [
    ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two' is not an integer"),
    ({"JAX_NUM_PROCESSES": "2"}, "set both JAX_NUM_PROCESSES and JAX_PROCESS_ID, or neither"),
])
def test_multihost_launch_variables_are_checked_before_initializing(monkeypatch, env, message):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        parallel.initialize_multihost()
    assert not jax.distributed.is_initialized()


def test_single_process_needs_no_initialization(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    parallel.initialize_multihost()
    assert not jax.distributed.is_initialized()


def test_to_host_gives_numpy_copies():
    tree = {"a": jnp.arange(3.0), "b": [jnp.ones((2, 2), jnp.int32)]}
    host = parallel.to_host(tree)
    assert isinstance(host["a"], np.ndarray) and isinstance(host["b"][0], np.ndarray)
    np.testing.assert_array_equal(host["a"], [0.0, 1.0, 2.0])


def test_split_cpu_presents_the_cores_as_devices_before_jax_starts():
    """In a fresh process (this one's backend already exists): two CPU devices, refused once devices exist."""
    script = """
import jax
from clipgen_jax import parallel
parallel.split_cpu(2)
print(len(jax.devices("cpu")))
try:
    parallel.split_cpu(3)
except RuntimeError as error:
    print("refused:", error)
"""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    count, refusal = result.stdout.splitlines()
    assert count == "2" and refusal.startswith("refused: split_cpu(3) must run before JAX initialises its devices")
    with pytest.raises(ValueError, match="cpu_devices=0 must be at least 1"):
        parallel.split_cpu(0)
