"""The Shapes demo behind `make demo`: builds the Shapes world and trains and evaluates every stage that exists.

Today that is the foundation's minimal stage (a convolutional autoencoder on the shared training loop); the VQGAN,
the CLIP, precompute and the prior join as they land. Finished artifacts are reused when the demo is run again.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax

from clipgen_jax import training
from clipgen_jax.data import images, shapes_tfds
from clipgen_jax.evaluation import reconstruction
from clipgen_jax.training import autoencoder


def _timed(results: dict, name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    results["seconds"][name] = round(time.perf_counter() - start, 1)
    return value


def run(out: str | pathlib.Path = "runs/shapes", quick: bool = False) -> dict:
    """Runs the demo into `out` and returns its results (also written to `out/results.json` and `results.md`)."""
    out = pathlib.Path(out)
    data_dir = out / "data"
    shapes_config = "tiny" if quick else "s32"
    results: dict = {"quick": quick, "backend": jax.default_backend(), "seconds": {}}

    _timed(results, "build_shapes", shapes_tfds.prepare, shapes_config, data_dir=str(data_dir))

    config = training.load_config("configs/autoencoder.py:" + ("tiny" if quick else "shapes"))
    config.data.data_dir = str(data_dir)
    state = _timed(results, "train_autoencoder", training.train, config, out / "autoencoder")

    stage = autoencoder.AutoencoderStage(config)
    apply = jax.jit(lambda x: stage.model.apply({"params": state.params}, x))

    def reconstruct(images_BHWC):
        return apply(images_BHWC), None

    eval_data = config.data.copy_and_resolve_references()
    heldout = images.make_batch_iterator(eval_data, split="heldout", batch_size=config.train.eval_batch_size,
                                         seed=config.seed, shuffle=False, num_epochs=1)
    results["autoencoder_heldout"] = _timed(results, "evaluate_autoencoder", reconstruction.evaluate,
                                            reconstruct, heldout, shapes_oracle=True)

    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    return results


def markdown(results: dict) -> str:
    heldout = results["autoencoder_heldout"]
    lines = [
        "# Shapes demo results" + (" (quick smoke run)" if results["quick"] else ""), "",
        f"Backend: {results['backend']}.", "",
        "## Minimal stage: convolutional autoencoder, held-out combinations", "",
        "| images | PSNR (dB) | oracle agreement: all | shape | colour | size | position | background |",
        "|---|---|---|---|---|---|---|---|",
        "| {} | {:.2f} | {:.1%} | {:.1%} | {:.1%} | {:.1%} | {:.1%} | {:.1%} |".format(
            heldout["num_images"], heldout["psnr"], heldout["oracle_agreement/all"],
            *(heldout[f"oracle_agreement/{name}"] for name in ("shape", "colour", "size", "position", "background"))),
        "", "## Time (seconds)", "", "| step | seconds |", "|---|---|",
        *(f"| {name} | {seconds} |" for name, seconds in results["seconds"].items()), "",
    ]
    return "\n".join(lines)
