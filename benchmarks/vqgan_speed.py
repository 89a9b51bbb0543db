"""VQGAN speed: training images/s (generator + discriminator step), encode and decode images/s, and MFU.

  python benchmarks/vqgan_speed.py --preset=shapes                       # CPU: the Shapes preset
  python benchmarks/vqgan_speed.py --preset=imagenet_f16_16384 --batch_size=16 --compute_dtype=bfloat16
      (accelerator: the paper's f16 tokenizer at 256 px; LPIPS needs `python -m clipgen_jax.models.lpips --fetch`,
      or --random_lpips: random VGG16 + head weights of the same shapes, for machines that cannot fetch them)

FLOPs per step come from XLA's cost analysis of the compiled step; MFU is against --peak_tflops (default 989, dense
bf16 of an H100 SXM / H200), and is reported only on accelerators. Random images, random initial weights: speed does
not depend on them. Results are appended as one JSON line to --out with the device and date.
"""

import datetime
import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from clipgen_jax import parallel, training
from clipgen_jax.models import lpips
from clipgen_jax.training import vqgan as vqgan_training

import results_file  # benchmarks/results_file.py (this script's folder is on sys.path)

_PRESET = flags.DEFINE_string("preset", "shapes", "configs/vqgan.py preset.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Batch size (default: the preset's).")
_COMPUTE_DTYPE = flags.DEFINE_string("compute_dtype", "auto", "Compute dtype.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 989.0, "Peak dense TFLOP/s of one device for MFU.")
_OVERRIDES = flags.DEFINE_multi_string("set", [], "Config overrides, e.g. --set=model.ch=32.")
_RANDOM_LPIPS = flags.DEFINE_bool("random_lpips", False, "Time the perceptual loss with random LPIPS weights "
                                   "(speed does not depend on them) instead of the fetched ones.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 1, "On the CPU: present it as this many devices and split the batch "
                                    "over them (tools/train.py --cpu_devices).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/vqgan_speed.jsonl", "JSON-lines results file.")


def _apply_override(config, assignment: str) -> None:
    key, _, value = assignment.partition("=")
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[leaf] = json.loads(value) if value[:1] in "[{0123456789-tf" else value


def _time(fn, *args, steps: int) -> tuple[float, object]:
    out = jax.block_until_ready(fn(*args))  # warm-up (compiled already)
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps, out


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def main(argv):
    del argv
    parallel.split_cpu(_CPU_DEVICES.value)
    host_setting = results_file.set_up_host()
    config = training.load_config(f"configs/vqgan.py:{_PRESET.value}")
    config.train.compute_dtype = _COMPUTE_DTYPE.value
    for assignment in _OVERRIDES.value:
        _apply_override(config, assignment)
    batch_size = _BATCH_SIZE.value or config.train.batch_size
    config.loss.disc_start = 0  # the GAN branch runs from disc_start on: time the full step, as taming after it
    if _RANDOM_LPIPS.value:
        image = jnp.zeros((1, lpips.MIN_IMAGE_SIZE, lpips.MIN_IMAGE_SIZE, 3))
        random_params = lpips.LPIPS().init(jax.random.PRNGKey(0), image, image)["params"]
        config.loss.lpips_weights = str(lpips.save_params(
            random_params, pathlib.Path(tempfile.mkdtemp()) / "random_lpips.npz"))
    stage = vqgan_training.VQGANStage(config)
    size = config.model.resolution
    mesh = parallel.make_mesh()
    images = jax.device_put(jax.random.uniform(jax.random.PRNGKey(0), (batch_size, size, size, 3), minval=-1.0,
                                               maxval=1.0), parallel.batch_sharding(mesh))
    state = jax.jit(stage.init_state, out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(0))

    compile_start = time.perf_counter()
    step = jax.jit(stage.train_step, donate_argnums=0).lower(state, {"image": images}).compile()
    compile_seconds = time.perf_counter() - compile_start
    step_flops = _flops(step)
    state, _ = jax.block_until_ready(step(state, {"image": images}))
    start = time.perf_counter()
    for _ in range(_STEPS.value):
        state, metrics = step(state, {"image": images})
        if parallel.must_block_each_step():  # as the training loop does
            jax.block_until_ready(metrics)
    jax.block_until_ready(metrics)
    step_seconds = (time.perf_counter() - start) / _STEPS.value

    model, params = stage.model, state.params
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
    decode = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.decode))
    encode_seconds, tokens = _time(encode, params, images, steps=_STEPS.value)
    decode_seconds, _ = _time(decode, params, tokens, steps=_STEPS.value)

    on_accelerator = jax.default_backend() != "cpu"
    result = {
        "date": datetime.date.today().isoformat(),
        "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "preset": _PRESET.value, "overrides": _OVERRIDES.value, "batch_size": batch_size,
        "compute_dtype": jnp.dtype(stage.model.dtype).name, **host_setting,
        "perceptual": stage.use_perceptual, "random_lpips": _RANDOM_LPIPS.value, "gan": stage.use_gan,
        "train_images_per_second": batch_size / step_seconds,
        "encode_images_per_second": batch_size / encode_seconds,
        "decode_images_per_second": batch_size / decode_seconds,
        "train_step_compile_seconds": compile_seconds,
        # XLA counts one device's share of the step.
        "train_tflop_per_image": step_flops * jax.device_count() / batch_size / 1e12 if step_flops else None,
        "mfu": (step_flops / step_seconds / (_PEAK_TFLOPS.value * 1e12)) if (step_flops and on_accelerator) else None,
    }
    results_file.append(_OUT.value, result)


if __name__ == "__main__":
    app.run(main)
