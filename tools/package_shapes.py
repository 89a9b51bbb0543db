"""Copies a finished Shapes demo's VQGAN and prior into the package (clipgen_jax/assets/shapes/), so that
`Pipeline.load("shapes")` and `tools/generate.py --prior shapes` work right after `pip install`.

  python tools/package_shapes.py --run runs/shapes [--out clipgen_jax/assets/shapes]

The prior is stored in float16 (loading casts it back to float32); the VQGAN stays float32, because the prior's
metadata identifies it by the hash of its exact weights (the ones its training tokens were made with). Paths under
--run are rewritten as the demo's own layout (runs/shapes/...), and the prior finds its VQGAN beside it. Before
writing, both priors sample the 96 held-out Shapes prompts (16 candidates re-ranked, seed 0) and the oracle scores
them: the float16 one is packaged only if it keeps the float32 one's all-attribute accuracy within --tolerance.
"""

import dataclasses
import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from clipgen_jax import checkpointing, cli, host_memory, pipeline
from clipgen_jax.data import shapes
from clipgen_jax.models import clip as clip_lib
from clipgen_jax.training import writer

_RUN = flags.DEFINE_string("run", "runs/shapes", "A finished tools/demo.py output directory.")
_OUT = flags.DEFINE_string("out", "clipgen_jax/assets/shapes", "Where the packaged vqgan/ and prior/ go.")
_TOLERANCE = flags.DEFINE_float("tolerance", 0.02, "Largest drop in held-out all-attribute accuracy float16 may cost.")
DEMO_LAYOUT = "runs/shapes"  # how the packaged metadata names the run's directory


def _relayout(value, run: str):
    """Metadata with every path under the run directory rewritten as the demo's layout."""
    if isinstance(value, dict):
        return {k: _relayout(v, run) for k, v in value.items()}
    if isinstance(value, list):
        return [_relayout(v, run) for v in value]
    if isinstance(value, str) and value.startswith(run):
        return DEMO_LAYOUT + value[len(run):]
    return value


def heldout_accuracy(pipe: pipeline.Pipeline) -> dict:
    """Oracle scores of the best of 16 candidates for each of the 96 held-out prompts (seed 0)."""
    combinations = shapes.heldout_combinations()
    images_PKHWC, _ = pipe.generate([shapes.canonical_caption(c) for c in combinations], num_candidates=16, keep=1)
    return shapes.score_images(images_PKHWC[:, 0], combinations)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    writer.configure_console_logging()
    host_memory.keep_freed_memory()
    run = pathlib.Path(_RUN.value).absolute()
    vqgan_bundle = checkpointing.bundle_path(run / "vqgan", "vqgan")
    prior_bundle = checkpointing.bundle_path(run / "prior", "prior")
    out = pathlib.Path(_OUT.value).absolute()

    full = pipeline.Pipeline.load(prior_bundle)
    if full.metadata["clip"] not in clip_lib.PACKAGED:
        cli.fail(f"the prior's CLIP {full.metadata['clip']} is not shipped with the package, so the packaged prior "
                 f"could not find it; package a prior trained with one of {sorted(clip_lib.PACKAGED)}")
    half_params = jax.tree.map(lambda x: x.astype(jnp.float16), full.prior_params)
    half = dataclasses.replace(full, prior_params=jax.tree.map(lambda x: x.astype(jnp.float32), half_params))
    scores = {"float32": heldout_accuracy(full), "float16": heldout_accuracy(half)}
    report = {dtype: {k: round(scores[dtype][k], 4) for k in ("all", *shapes.ATTRIBUTE_NAMES)} for dtype in scores}
    print(json.dumps(report, indent=2))
    if scores["float16"]["all"] < scores["float32"]["all"] - _TOLERANCE.value:
        print(f"error: the float16 prior loses more than {_TOLERANCE.value} all-attribute accuracy; not packaged",
              file=sys.stderr)
        sys.exit(1)

    for bundle in ("vqgan", "prior"):  # only the bundles: the folder's README stays
        shutil.rmtree(out / bundle, ignore_errors=True)
    vqgan_metadata = _relayout(checkpointing.load_bundle_metadata(vqgan_bundle), str(run))
    checkpointing.save_bundle(out / "vqgan", full.vqgan_params, vqgan_metadata)
    prior_metadata = _relayout(dict(full.metadata), str(run))
    # Run from the repository, the VQGAN is found at its path there; anywhere else, beside the prior.
    vqgan_path = out / "vqgan"
    if vqgan_path.is_relative_to(pathlib.Path.cwd()):
        vqgan_path = vqgan_path.relative_to(pathlib.Path.cwd())
    prior_metadata.update(vqgan=str(vqgan_path), vqgan_relative="../vqgan", packaged_dtype="float16",
                          heldout_oracle=report)
    prior_metadata["identities"]["vqgan"]["path"] = str(vqgan_path)
    checkpointing.save_bundle(out / "prior", half_params, prior_metadata)
    pipeline.Pipeline.load(out / "prior")  # finds its VQGAN, whose weights match the identity the prior records
    print(f"packaged {out}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
