"""The Shapes demo behind `make demo`: builds the Shapes world, then trains and evaluates every stage that exists.

Today that is stage 1, the VQGAN tokenizer (`configs/vqgan.py:shapes`), evaluated on the held-out combinations;
CLIP, precompute and the prior join as they land. Finished stages are reused when the demo is run again (a training
run resumes from, or returns at, its newest checkpoint).
"""

from __future__ import annotations

import json
import pathlib
import time

import jax

from clipgen_jax import training
from clipgen_jax.data import shapes, shapes_tfds
from clipgen_jax.evaluation import reconstruction


def _timed(results: dict, name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    results["seconds"][name] = round(time.perf_counter() - start, 1)
    return value


def run(out: str | pathlib.Path = "runs/shapes", quick: bool = False) -> dict:
    """Runs the demo into `out` and returns its results (also written to `out/results.json` and `results.md`)."""
    out = pathlib.Path(out)
    data_dir = out / "data"
    results: dict = {"quick": quick, "backend": jax.default_backend(), "seconds": {}}

    _timed(results, "build_shapes", shapes_tfds.prepare, "tiny" if quick else "s32", data_dir=str(data_dir))

    config = training.load_config("configs/vqgan.py:" + ("tiny" if quick else "shapes"))
    config.data.data_dir = str(data_dir)
    _timed(results, "train_vqgan", training.train, config, out / "vqgan")
    results["vqgan_heldout"] = _timed(
        results, "evaluate_vqgan", reconstruction.evaluate_vqgan, str(out / "vqgan"), config.data,
        split="heldout")

    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    return results


def markdown(results: dict) -> str:
    heldout = results["vqgan_heldout"]
    lines = [
        "# Shapes demo results" + (" (quick smoke run)" if results["quick"] else ""), "",
        f"Backend: {results['backend']}.", "",
        "## Stage 1: VQGAN, held-out combinations", "",
        "| images | PSNR (dB) | SSIM | codebook usage | perplexity | oracle agreement: all | "
        + " | ".join(shapes.ATTRIBUTE_NAMES) + " |",
        "|---" * (6 + len(shapes.ATTRIBUTE_NAMES)) + "|",
        "| {} | {:.2f} | {:.3f} | {:.1%} | {:.0f} | {:.1%} | ".format(
            heldout["num_images"], heldout["psnr"], heldout["ssim"], heldout["codebook_usage"],
            heldout["perplexity"], heldout["oracle_agreement/all"])
        + " | ".join(f"{heldout[f'oracle_agreement/{name}']:.1%}" for name in shapes.ATTRIBUTE_NAMES) + " |",
        "", "## Time (seconds, compilation included)", "", "| step | seconds |", "|---|---|",
        *(f"| {name} | {seconds} |" for name, seconds in results["seconds"].items()), "",
    ]
    return "\n".join(lines)
