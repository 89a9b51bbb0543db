"""Prior speed: training tokens/s and MFU, and sampling seconds per batch of images (KV-cached vs full recompute).

  python benchmarks/prior_speed.py --preset=shapes                 # CPU: the Shapes preset, float32
  python benchmarks/prior_speed.py --preset=gpt2_medium            # accelerator: the paper's prior, bfloat16

Training is a jitted AdamW step (cross entropy over all image tokens) on random tokens and embeddings at
--batch_size; compute is bfloat16 on accelerators and float32 on CPU unless --compute_dtype says otherwise.
MFU = tokens/s * F / peak, F = prior.training_flops_per_token (6 * matmul weights per position + PaLM's attention
term, see its docstring), peak = --peak_tflops (default 989: dense bf16 of an H100 SXM / H200); reported only on
accelerators. XLA's own count of the compiled step's FLOPs per token is reported beside it as a cross-check.
Sampling draws --sample_batch images (temperature 1, no filtering) with `sampling.sample` (cached; also with
classifier-free guidance, which doubles the rows; also with top-k and nucleus filtering, at one setting and at a new
setting per call: the settings are traced, so neither compiles) and `sampling.sample_naive`, with parameters cast to
the compute dtype. Random weights: speed does not depend on them. One JSON line is appended to --out with the device
and date.
"""

import datetime
import json
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from clipgen_jax import sampling, training
from clipgen_jax.models import prior

import results_file  # benchmarks/results_file.py (this script's folder is on sys.path)

_PRESET = flags.DEFINE_enum("preset", "shapes", ["shapes", *prior.PRESETS],
                            "configs/prior.py preset whose model is timed.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Training batch size.")
_COMPUTE_DTYPE = flags.DEFINE_string("compute_dtype", "auto", "auto: bfloat16 on accelerators, float32 on CPU.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed training steps (after one warm-up step).")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 16, "Images per sampling call.")
_SAMPLE_REPEATS = flags.DEFINE_integer("sample_repeats", 3, "Timed sampling calls (after one warm-up call).")
_SAMPLE = flags.DEFINE_bool("sample", True, "Also time sampling (--nosample: training only).")
_GUIDANCE_SCALE = flags.DEFINE_float("guidance_scale", 3.0, "Guidance scale of the guided cached timing.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 989.0, "Peak dense TFLOP/s of one device for MFU.")
_OVERRIDES = flags.DEFINE_multi_string("set", [], "Model field overrides, e.g. --set=depth=2 --set=scan_layers=true.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/prior_speed.jsonl", "JSON-lines results file.")


def _model_fields() -> dict:
    fields = training.load_config(f"configs/prior.py:{_PRESET.value}").model.to_dict()
    for assignment in _OVERRIDES.value:
        key, _, value = assignment.partition("=")
        if key not in fields:
            raise ValueError(f"unknown model field {key!r}; known: {sorted(fields)}")
        fields[key] = json.loads(value)
    return fields


def _compute_dtype():
    if _COMPUTE_DTYPE.value == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(_COMPUTE_DTYPE.value)


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def _time_calls(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compiles
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def _benchmark_training(model: prior.Prior, params, batch_size: int) -> dict:
    optimizer = optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1)
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    cond_BD = jax.random.normal(keys[0], (batch_size, model.cond_dim))
    tokens_BL = jax.random.randint(keys[1], (batch_size, model.num_tokens), 0, model.vocab_size)

    def train_step(state, cond_BD, tokens_BL, rng):
        params, opt_state = state

        def loss_fn(params):
            logits = model.apply({"params": params}, cond_BD, tokens_BL, deterministic=False, rngs={"dropout": rng})
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BL).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    params = jax.tree.map(jnp.copy, params)  # the step donates its state; sampling still needs the originals
    state = (params, optimizer.init(params))
    args = (cond_BD, tokens_BL, jax.random.PRNGKey(2))
    compile_start = time.perf_counter()
    step = jax.jit(train_step, donate_argnums=0).lower(state, *args).compile()
    compile_seconds = time.perf_counter() - compile_start
    state, loss = jax.block_until_ready(step(state, *args))
    start = time.perf_counter()
    for _ in range(_STEPS.value):
        state, loss = step(state, *args)
    jax.block_until_ready(loss)
    step_seconds = (time.perf_counter() - start) / _STEPS.value

    tokens_per_second = batch_size * model.num_tokens / step_seconds
    xla_flops = _flops(step)
    flops_per_token = prior.training_flops_per_token(model)
    on_accelerator = jax.default_backend() != "cpu"
    return {
        "train_batch_size": batch_size,
        "train_steps_per_second": 1.0 / step_seconds,
        "train_tokens_per_second": tokens_per_second,
        "train_step_compile_seconds": compile_seconds,
        "train_flops_per_token": flops_per_token,
        "xla_train_flops_per_token": xla_flops / (batch_size * model.num_tokens) if xla_flops else None,
        "mfu": tokens_per_second * flops_per_token / (_PEAK_TFLOPS.value * 1e12) if on_accelerator else None,
    }


def _benchmark_sampling(model: prior.Prior, params) -> dict:
    params = jax.tree.map(lambda p: p.astype(model.dtype), params)  # what inference reads: compute-dtype weights
    cond_BD = jax.random.normal(jax.random.PRNGKey(3), (_SAMPLE_BATCH.value, model.cond_dim))
    rng = sampling.row_keys(4, jnp.zeros(_SAMPLE_BATCH.value), jnp.arange(_SAMPLE_BATCH.value))
    repeats = _SAMPLE_REPEATS.value
    new_settings = (dict(temperature=1.0 + 0.01 * i, top_k=10 + i, top_p=0.5 + 0.4 * i / (repeats + 1))
                    for i in range(repeats + 1))
    compile_start = time.perf_counter()
    jax.block_until_ready(sampling.sample(model, params, cond_BD, rng))
    return {
        "sample_batch": _SAMPLE_BATCH.value,
        "sample_cached_first_call_seconds": time.perf_counter() - compile_start,
        "sample_cached_seconds": _time_calls(lambda: sampling.sample(model, params, cond_BD, rng), repeats),
        "sample_cached_guided_seconds": _time_calls(
            lambda: sampling.sample(model, params, cond_BD, rng, guidance_scale=_GUIDANCE_SCALE.value), repeats),
        "sample_naive_seconds": _time_calls(lambda: sampling.sample_naive(model, params, cond_BD, rng), repeats),
        "sample_filtered_seconds": _time_calls(
            lambda: sampling.sample(model, params, cond_BD, rng, temperature=0.9, top_k=50, top_p=0.9), repeats),
        "sample_filtered_new_setting_seconds": _time_calls(
            lambda: sampling.sample(model, params, cond_BD, rng, **next(new_settings)), repeats),
    }


def main(argv):
    del argv
    host_setting = results_file.set_up_host()
    fields = _model_fields()
    model = prior.Prior(**fields, dtype=_compute_dtype(), param_dtype=jnp.float32)
    params = jax.jit(prior.init_params, static_argnums=0)(model, jax.random.PRNGKey(0))
    result = {
        "date": datetime.date.today().isoformat(),
        "device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "device_count": 1,
        "preset": _PRESET.value, "overrides": _OVERRIDES.value, "compute_dtype": jnp.dtype(model.dtype).name,
        "params": sum(p.size for p in jax.tree.leaves(params)), **host_setting,
        **_benchmark_training(model, params, _BATCH_SIZE.value),
        **(_benchmark_sampling(model, params) if _SAMPLE.value else {}),
    }
    results_file.append(_OUT.value, result)


if __name__ == "__main__":
    app.run(main)
