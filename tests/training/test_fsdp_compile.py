"""Ahead-of-time compilation of the gpt2_large prior's training step (the loop's jitted step around
PriorSteps.train_step) for the preset's 8-device FSDP mesh, on abstract inputs: the 751M parameters and their Adam
moments are never materialised. Checks where XLA put the train state, that the state is donated, and the per-device
memory estimate.

The suite's process has one CPU device, so the compilation runs in a subprocess with 8 virtual CPU devices (this file
run as a script), which reports JSON back."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

PRESET = "gpt2_large"
DEVICES = 8
# XLA's CPU estimate for the preset (bfloat16 compute, 2 micro-batches of 16 rows per device, no rematerialisation):
# 34.4 GB per device, of which 33.2 GB temporaries; a 40 GB accelerator holds it. Before activations were constrained
# to the batch axes (parallel.ACTIVATION_AXIS_RULES) it was 96.8 GB: every device computed every row's attention.
MAX_BYTES_PER_DEVICE = 40e9


def compile_report() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from clipgen_jax import checkpointing, parallel, training
    from clipgen_jax.data import precomputed
    from clipgen_jax.training import loop
    from clipgen_jax.training import prior as prior_training

    config = training.load_config(f"configs/prior.py:{PRESET}")
    config.train.compute_dtype = "bfloat16"  # what "auto" picks on the GPUs and TPUs the preset is for
    steps = prior_training.PriorSteps(config)
    mesh = parallel.make_mesh(config.mesh.fsdp)
    abstract = jax.eval_shape(steps.init_state, jax.random.PRNGKey(config.seed))
    shardings = parallel.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
    rows, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    batch_size, model = config.train.batch_size, config.model
    # The dtypes tools/precompute.py writes for a 16384-code VQGAN and float16 embeddings.
    batch = {precomputed.TOKENS: jax.ShapeDtypeStruct((batch_size, model.num_tokens), jnp.int16, sharding=rows),
             steps.cond_key: jax.ShapeDtypeStruct((batch_size, model.cond_dim), jnp.float16, sharding=rows)}
    state = checkpointing.abstract_with_shardings(abstract, shardings)
    metric_sums = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, jnp.float32, sharding=replicated),
                               jax.eval_shape(steps.train_step, state, batch)[1])
    first_bad_step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)

    start = time.perf_counter()
    lowered = loop.jit_train_step(steps, shardings, mesh).lower(state, batch, metric_sums, first_bad_step)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()

    memory = compiled.memory_analysis()
    leaves = []
    for (path, leaf), given, returned in zip(jax.tree_util.tree_leaves_with_path(abstract),
                                             jax.tree.leaves(compiled.input_shardings[0][0]),
                                             jax.tree.leaves(compiled.output_shardings[0]), strict=True):
        leaves.append({"path": jax.tree_util.keystr(path), "size": int(leaf.size),
                       "bytes": int(leaf.size * leaf.dtype.itemsize),
                       "device_bytes": int(np.prod(given.shard_shape(leaf.shape)) * leaf.dtype.itemsize),
                       "in_spec": str(given.spec), "out_spec": str(returned.spec)})
    batch_device_bytes = sum(int(np.prod(rows.shard_shape(x.shape))) * x.dtype.itemsize for x in batch.values())
    return {"devices": jax.device_count(), "mesh": dict(mesh.shape),
            "lower_seconds": lowered_at - start, "compile_seconds": compiled_at - lowered_at,
            "memory": {k: int(getattr(memory, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")},
            "batch_device_bytes": batch_device_bytes, "leaves": leaves,
            "all_gathers": compiled.as_text().count(" all-gather(")}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    # Without the suite's persistent compilation cache: this test is about compiling.
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
               PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[2]), JAX_ENABLE_COMPILATION_CACHE="false")
    out = tmp_path_factory.mktemp("fsdp_compile") / "report.json"
    result = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    print(f"{PRESET} on {DEVICES} CPU devices: lowered in {report['lower_seconds']:.1f} s, compiled in "
          f"{report['compile_seconds']:.1f} s; memory per device {report['memory']}")
    return report


def test_large_parameters_and_their_adam_moments_are_split_over_the_fsdp_axis(report):
    from clipgen_jax import parallel

    assert report["devices"] == DEVICES and report["mesh"] == {"data": 1, "fsdp": DEVICES}
    large = [leaf for leaf in report["leaves"] if leaf["size"] >= parallel.FSDP_MIN_PARAM_SIZE]
    for leaf in large:
        assert "fsdp" in leaf["in_spec"], leaf
        assert leaf["out_spec"] == leaf["in_spec"], leaf  # the updated state comes back where it was
        assert leaf["device_bytes"] * DEVICES == leaf["bytes"], leaf
    # Per layer: qkv, attention_out, mlp_in, mlp_out kernels; plus the embeddings, prefix and head. Each as the
    # parameter, Adam's mu and Adam's nu.
    split_params = [leaf["path"] for leaf in large if leaf["path"].startswith(".params")]
    assert len(split_params) == 4 * 36 + 4
    for moment in ("mu", "nu"):
        assert len([leaf for leaf in large if f".{moment}" in leaf["path"]]) == len(split_params)

    total = sum(leaf["bytes"] for leaf in report["leaves"])
    per_device = sum(leaf["device_bytes"] for leaf in report["leaves"])
    assert total > 9e9 and per_device < 1.01 * total / DEVICES  # 9.0 GB of state, 1.13 GB of it on each device
    assert report["all_gathers"] > 0  # weights are gathered for use, not stored whole


def test_the_state_is_donated_and_a_device_needs_under_40_gb(report):
    memory = report["memory"]
    state_per_device = sum(leaf["device_bytes"] for leaf in report["leaves"])
    assert memory["argument"] == pytest.approx(state_per_device + report["batch_device_bytes"], rel=1e-3)
    # The state's buffers are reused for the updated state: no second copy of params and optimizer state.
    assert memory["alias"] >= 0.999 * state_per_device
    peak = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    assert peak < MAX_BYTES_PER_DEVICE, f"{peak / 1e9:.1f} GB per device"


if __name__ == "__main__":
    pathlib.Path(sys.argv[1]).write_text(json.dumps(compile_report()))
