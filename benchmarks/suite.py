"""The benchmark suite: every speed benchmark for this machine's backend, one command, JSON lines + a markdown table.

  python benchmarks/suite.py                      # CPU: the Shapes presets (a few minutes on 2 cores)
  python benchmarks/suite.py                      # GPU / TPU: the paper's shapes (gpt2_medium prior, f16 VQGAN at
                                                  # 256 px in bfloat16, 256 px precompute with ViT-B/32); ~6 minutes
  python benchmarks/suite.py --only=prior --results_dir=/tmp/bench

Each benchmark runs in its own process (one's failure or --timeout does not stop the others; each gets the whole
accelerator memory) and appends one JSON line with device and date to `<results_dir>/<name>.jsonl`. The suite then
rewrites `<results_dir>/RESULTS.md` from every line there: the one place the project keeps speed figures.
Random weights throughout: speed does not depend on them (the VQGAN's LPIPS too, when its weights are not fetched).
"""

import json
import os
import pathlib
import subprocess
import sys
import time

from absl import app, flags

from clipgen_jax.models import lpips

_RESULTS_DIR = flags.DEFINE_string("results_dir", "benchmarks/results", "Where the JSON lines and RESULTS.md go.")
_ONLY = flags.DEFINE_list("only", None, "Run only these benchmarks (prior, vqgan, vqgan_2cpu, precompute, "
                           "prior_batch128).")
_TIMEOUT = flags.DEFINE_integer("timeout", 900, "Seconds each benchmark may run.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rewrite RESULTS.md from the JSON lines.")

_HERE = pathlib.Path(__file__).resolve().parent


def _backend() -> str:
    """Asked in a child process: initialising JAX here would hold accelerator memory the benchmarks need."""
    return subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]


def _plan(backend: str) -> dict[str, list[str]]:
    """name -> the benchmark's command-line arguments (script first)."""
    if backend == "cpu":
        # The presets' batch sizes (16, 8), and enough steps that the 2 cores' jitter averages out.
        return {"prior": ["prior_speed.py", "--preset=shapes", "--batch_size=16", "--steps=300"],
                "vqgan": ["vqgan_speed.py", "--preset=shapes", "--steps=100"],
                "vqgan_2cpu": ["vqgan_speed.py", "--preset=shapes", "--steps=100", "--cpu_devices=2"],
                "precompute": ["precompute_speed.py", "--preset=shapes"]}
    vqgan_lpips = [] if lpips.default_weights_path().is_file() else ["--random_lpips"]
    return {"prior": ["prior_speed.py", "--preset=gpt2_medium", "--batch_size=64"],
            "vqgan": ["vqgan_speed.py", "--preset=imagenet_f16_16384", "--batch_size=16",
                      "--compute_dtype=bfloat16", *vqgan_lpips],
            "precompute": ["precompute_speed.py", "--preset=imagenet", "--compute_dtype=bfloat16"],
            "prior_batch128": ["prior_speed.py", "--preset=gpt2_medium", "--batch_size=128", "--nosample"]}


def _run(name: str, arguments: list[str], results_dir: pathlib.Path) -> str:
    script, *flags_ = arguments
    out = results_dir / (script.removesuffix(".py") + ".jsonl")
    command = [sys.executable, str(_HERE / script), *flags_, f"--out={out}"]
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    try:
        completed = subprocess.run(command, timeout=_TIMEOUT.value, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        status = "ok" if completed.returncode == 0 else f"failed (exit {completed.returncode})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {_TIMEOUT.value} s"
    print(f"== {name}: {status} in {time.perf_counter() - start:.0f} s", flush=True)
    return status


def _read(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _number(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _yes_no(flag) -> str:
    """A setting that lines written before it existed lack: "-"."""
    return "-" if flag is None else ("yes" if flag else "no")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def write_report(results_dir: pathlib.Path) -> pathlib.Path:
    """RESULTS.md: one row per measurement (newest last) of each benchmark's JSON lines."""
    lines = ["# Benchmark results", "",
             "Written by `python benchmarks/suite.py` from the JSON lines beside this file; MFU is against 989 TFLOP/s "
             "(dense bf16, H100 SXM / H200) and only on accelerators.", ""]
    prior_rows = [[r["date"], r["device"], r["preset"], r["compute_dtype"], str(r["train_batch_size"]),
                   _number(r["train_tokens_per_second"], 0), _percent(r.get("mfu")),
                   _number(r.get("sample_cached_seconds"), 3), _number(r.get("sample_cached_guided_seconds"), 3),
                   _number(r.get("sample_naive_seconds"), 3), _yes_no(r.get("malloc_keeps_freed_memory")),
                   " ".join(r.get("overrides", []))]
                  for r in _read(results_dir / "prior_speed.jsonl")]
    lines += ["## Prior (training step; sampling 16 images)", ""] + _table(
        ["date", "device", "preset", "dtype", "batch", "train tokens/s", "MFU", "sample s (cached)",
         "sample s (cached, guided)", "sample s (naive)", "malloc keeps freed memory", "overrides"],
        prior_rows) + [""]
    vqgan_rows = [[r["date"], r["device"], str(r.get("device_count", 1)), r["preset"], r["compute_dtype"],
                   str(r["batch_size"]),
                   "yes" if r["perceptual"] else "no", "yes" if r["gan"] else "no",
                   _number(r["train_images_per_second"]), _number(r.get("train_tflop_per_image"), 3),
                   _percent(r.get("mfu")), _number(r["encode_images_per_second"]),
                   _number(r["decode_images_per_second"]), _yes_no(r.get("malloc_keeps_freed_memory"))]
                  for r in _read(results_dir / "vqgan_speed.jsonl")]
    lines += ["## VQGAN (generator + discriminator step)", ""] + _table(
        ["date", "device", "devices", "preset", "dtype", "batch", "LPIPS", "GAN", "train images/s", "TFLOP/image",
         "MFU", "encode images/s", "decode images/s", "malloc keeps freed memory"], vqgan_rows) + [""]
    precompute_rows = [[r["date"], r["device"], r["preset"], r["compute_dtype"], str(r["num_images"]),
                        _number(r["end_to_end_seconds"]), _number(r["end_to_end_images_per_second"]),
                        ", ".join(f"{k} {v}" for k, v in r["part_images_per_second"].items()), r["bound_by"],
                        _yes_no(r.get("malloc_keeps_freed_memory"))]
                       for r in _read(results_dir / "precompute_speed.jsonl")]
    lines += ["## Precompute (VQGAN tokens + CLIP embeddings to TFDS)", ""] + _table(
        ["date", "device", "preset", "dtype", "images", "seconds", "images/s", "parts alone (images/s)", "bound by",
         "malloc keeps freed memory"],
        precompute_rows) + [""]
    official_rows = [[r["date"], r["device"], r["shape"], str(r["images"]), str(r["tokens"]),
                      _number(r["official_seconds"], 2), _number(r["ours_seconds"], 2),
                      _number(r["ours_first_call_seconds"], 1), f"{r['speedup']:.1f}x", str(r["torch_threads"]),
                      _yes_no(r.get("malloc_keeps_freed_memory"))]
                     for r in _read(results_dir / "official_sampler_speed.jsonl")]
    lines += ["## Sampling: the official CLIP-GEN GPT's sample() (PyTorch) vs this project's sampler, same weights",
              "", "benchmarks/official_sampler_speed.py (needs a checkout of the official code; not in the suite's "
              "plan). Top-k 500, top-p 0.95; this project's time excludes its first call (compilation), shown apart.",
              ""] + _table(
        ["date", "device", "shape", "images", "tokens", "official s", "this project s", "first call s (compiles)",
         "speedup", "torch threads", "malloc keeps freed memory"], official_rows) + [""]
    serve_rows = [[r["date"], r["device"], r["prior"], f"{r['num_candidates']} / {r['keep']}",
                   _number(r["ready_seconds"]), _number(r["repeated_setting_seconds"]["p50"], 2),
                   _number(r["repeated_setting_seconds"]["p95"], 2), _number(r["unseen_setting_seconds"]["p50"], 2),
                   _number(r["unseen_setting_seconds"]["p95"], 2), f"{r['clients']} x {r['requests_per_client']}",
                   f"{r['answered_correctly']} / {r['dropped']}", _number(r["concurrent_latency_seconds"]["p50"], 2),
                   _number(r["concurrent_latency_seconds"]["p95"], 2), _number(r["concurrent_requests_per_second"], 2),
                   _number(r["server_peak_rss_mb"], 0)]
                  for r in _read(results_dir / "serve_load.jsonl")]
    lines += ["## Web app (tools/serve.py under load)", "",
              "benchmarks/serve_load.py (not in the suite's plan): gradio_client requests on loopback. One client alone "
              "at a repeated sampling setting and at an unseen one (new temperature, top-k, top-p: no recompilation), "
              "then concurrent clients, whose latency includes the queue (one request runs at a time).", ""] + _table(
        ["date", "device", "prior", "candidates / kept", "ready s", "repeated p50 s", "repeated p95 s",
         "unseen p50 s", "unseen p95 s", "clients x requests", "answered / dropped", "concurrent p50 s",
         "concurrent p95 s", "requests/s", "server peak RSS MB"], serve_rows) + [""]
    path = results_dir / "RESULTS.md"
    path.write_text("\n".join(lines))
    return path


def main(argv):
    del argv
    results_dir = pathlib.Path(_RESULTS_DIR.value)
    results_dir.mkdir(parents=True, exist_ok=True)
    statuses = {}
    if not _REPORT_ONLY.value:
        plan = _plan(_backend())
        unknown = set(_ONLY.value or ()) - set(plan)
        if unknown:
            raise app.UsageError(f"--only names unknown benchmarks {sorted(unknown)}; this backend has {list(plan)}")
        statuses = {name: _run(name, arguments, results_dir) for name, arguments in plan.items()
                    if not _ONLY.value or name in _ONLY.value}
    print(write_report(results_dir).read_text())
    for name, status in statuses.items():
        print(f"{name}: {status}")
    if any(status != "ok" for status in statuses.values()):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
