"""The web app under load: `tools/serve.py` on loopback, requests through gradio_client.

  python benchmarks/serve_load.py [--prior shapes --clients 8 --requests 3 --num_candidates 16 --keep 4]

Starts the server (timing load + warm-up until it prints "ready"), then
  1. one client, one request after another, at the default sampling settings: the latency of a repeated setting, and
     the reference answer for each (prompt, seed) that phase 3 asks again;
  2. one client, each request at a temperature / top-k / top-p never used before: the latency of an unseen setting
     (they are traced arguments of the compiled sampler: no recompilation);
  3. --clients clients at once, --requests each: every answer must equal its phase-1 reference (images and scores),
     none may be refused or lost; latency here includes waiting in the queue (one request runs at a time).
Reports p50/p95 latency of each phase, phase 3's wall time and requests/s, and the server's peak RSS (VmHWM), as one
JSON line appended to --out.
"""

import concurrent.futures
import datetime
import logging
import pathlib
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app, flags
from PIL import Image

import results_file  # benchmarks/results_file.py (this script's folder is on sys.path)

_PRIOR = flags.DEFINE_string("prior", "shapes", "The prior tools/serve.py serves.")
_CLIENTS = flags.DEFINE_integer("clients", 8, "Concurrent clients in phase 3.")
_REQUESTS = flags.DEFINE_integer("requests", 3, "Requests per client in phase 3.")
_NUM_CANDIDATES = flags.DEFINE_integer("num_candidates", 16, "Candidates per request.")
_KEEP = flags.DEFINE_integer("keep", 4, "Images kept per request.")
_UNSEEN = flags.DEFINE_integer("unseen", 8, "Requests at a new sampling setting each (phase 2).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/serve_load.jsonl", "JSON-lines results file.")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _start_server(port: int) -> tuple[subprocess.Popen, float]:
    """tools/serve.py on 127.0.0.1:port, and the seconds until it printed "ready"."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "tools/serve.py", f"--prior={_PRIOR.value}", f"--port={port}"],
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith("ready: "):
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()  # keep draining
            return process, time.perf_counter() - start
    raise RuntimeError(f"tools/serve.py exited with {process.wait()} before it was ready")


def _peak_rss_mb(pid: int) -> float:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def _controls(seed: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> list:
    return [_NUM_CANDIDATES.value, _KEEP.value, temperature, top_k, top_p, 1.0, seed]


def _request(client, prompt: str, controls: list) -> tuple[float, list[np.ndarray], list[float]]:
    """(seconds, kept images, their scores) of one request, checked: `keep` images, best first, the seed echoed."""
    start = time.perf_counter()
    gallery, _, record, _ = client.predict(prompt, *controls, api_name="/generate")
    seconds = time.perf_counter() - start
    images = [np.asarray(Image.open(item["image"])) for item in gallery]
    scores = record["clip_scores"]
    if len(images) != _KEEP.value or scores != sorted(scores, reverse=True) or record["seed"] != controls[-1]:
        raise AssertionError(f"wrong answer for {prompt!r} seed {controls[-1]}: {len(images)} images, {record}")
    return seconds, images, scores


def _percentiles(seconds: list[float]) -> dict:
    return {"p50": round(float(np.percentile(seconds, 50)), 4), "p95": round(float(np.percentile(seconds, 95)), 4)}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from gradio_client import Client

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per HTTP request otherwise

    from clipgen_jax import app as app_lib

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server, ready_seconds = _start_server(port)
    url = f"http://127.0.0.1:{port}/"
    try:
        prompts = app_lib.shapes_examples()
        jobs = [(prompts[i % len(prompts)], i) for i in range(_CLIENTS.value * _REQUESTS.value)]
        client = Client(url, verbose=False)
        references, repeated = {}, []
        for prompt, seed in jobs:
            seconds, images, scores = _request(client, prompt, _controls(seed))
            references[prompt, seed] = (images, scores)
            repeated.append(seconds)
        rng = np.random.default_rng(0)
        unseen = [_request(client, prompts[0], _controls(0, float(rng.uniform(0.5, 1.5)), int(rng.integers(2, 64)),
                                                         float(rng.uniform(0.5, 0.99))))[0]
                  for _ in range(_UNSEEN.value)]

        def one_client(index: int) -> tuple[list[float], list[str]]:
            """Latencies of the requests answered as the lone request was, and what went wrong with the others."""
            own = Client(url, verbose=False)
            latencies, failures = [], []
            for prompt, seed in jobs[index * _REQUESTS.value:(index + 1) * _REQUESTS.value]:
                try:
                    seconds, images, scores = _request(own, prompt, _controls(seed))
                except Exception as error:  # noqa: BLE001 (refused, dropped or failed: counted, not fatal)
                    failures.append(f"{prompt!r} seed {seed}: {error}")
                    continue
                expected_images, expected_scores = references[prompt, seed]
                if scores != expected_scores or any(not np.array_equal(a, b)
                                                    for a, b in zip(images, expected_images)):
                    failures.append(f"{prompt!r} seed {seed}: the answer differs from the lone request's")
                    continue
                latencies.append(seconds)
            return latencies, failures

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(_CLIENTS.value) as pool:
            outcomes = list(pool.map(one_client, range(_CLIENTS.value)))
        wall = time.perf_counter() - start
        concurrent_latencies = sum((latencies for latencies, _ in outcomes), [])
        failures = sum((failed for _, failed in outcomes), [])
        for failure in failures:
            print(f"not answered correctly: {failure}", file=sys.stderr)
        peak_rss = _peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(60)
    result = {
        "benchmark": "serve_load", "date": datetime.date.today().isoformat(), "device": "cpu",
        "prior": _PRIOR.value, "num_candidates": _NUM_CANDIDATES.value, "keep": _KEEP.value,
        "clients": _CLIENTS.value, "requests_per_client": _REQUESTS.value,
        "answered_correctly": len(concurrent_latencies), "dropped": len(failures),  # refused, failed or different
        "ready_seconds": round(ready_seconds, 1),
        "repeated_setting_seconds": _percentiles(repeated), "unseen_setting_seconds": _percentiles(unseen),
        "concurrent_latency_seconds": _percentiles(concurrent_latencies),
        "concurrent_wall_seconds": round(wall, 2), "concurrent_requests_per_second": round(len(jobs) / wall, 2),
        "server_peak_rss_mb": round(peak_rss, 1),
    }
    results_file.append(_OUT.value, result)


if __name__ == "__main__":
    app.run(main)
