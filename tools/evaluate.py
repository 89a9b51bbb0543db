"""Evaluates a trained stage.

  python tools/evaluate.py vqgan --vqgan=runs/vqgan [--split=heldout] [--lpips] [--out=FILE]
      PSNR, SSIM (and LPIPS with --lpips), codebook usage and perplexity of the tokens, and on Shapes the oracle
      agreement between each input and its reconstruction. The data defaults to the VQGAN's training data (from its
      bundle); override it with --source/--name/--data_dir/--folder.
  python tools/evaluate.py clip --clip=shapes-clip [--split=validation] [--out=FILE]
      On Shapes (the default data): zero-shot accuracy per attribute on the held-out images and text -> image
      retrieval of the held-out combinations' canonical captions among every validation + heldout image. On other
      captioned data (--source tfds|folder ...): image <-> text retrieval top-1/top-5 on --split.
Results are printed as JSON and written to --out (default: <bundle>/eval_<split>.json for a VQGAN; stdout only for
a CLIP unless --out is given).
"""

import json
import pathlib

from absl import app, flags

import clipgen_jax  # noqa: F401  (registers the Shapes TFDS builder)
from clipgen_jax import checkpointing
from clipgen_jax.data import images
from clipgen_jax.evaluation import clip_scores, reconstruction
from clipgen_jax.models import clip
from clipgen_jax.training import writer

_VQGAN = flags.DEFINE_string("vqgan", None, "VQGAN training workdir or bundle.")
_CLIP = flags.DEFINE_string("clip", "shapes-clip", "CLIP: Hub id, directory (e.g. a CLIP workdir's export/) or "
                            "packaged name.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "clip: side of the images read from the data.")
_SPLIT = flags.DEFINE_string("split", "heldout", "Split to evaluate on.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 100, "Images per batch.")
_LPIPS = flags.DEFINE_bool("lpips", False, "Also report LPIPS (needs the LPIPS weights file).")
_LPIPS_WEIGHTS = flags.DEFINE_string("lpips_weights", None, "LPIPS weights .npz (default location if unset).")
_OUT = flags.DEFINE_string("out", None, "JSON output file.")
_DATA_FIELDS = {name: flags.DEFINE_string(name, None, f"Data source field `{name}` (default: the training data's).")
                for name in ("source", "name", "data_dir", "folder")}

SUBCOMMANDS = ("vqgan", "clip")


def _data_config(metadata: dict):
    config = images.default_data_config()
    config.update(metadata.get("data", {}))
    config.image_size = metadata["model"]["resolution"]
    for name, flag in _DATA_FIELDS.items():
        if flag.value is not None:
            config[name] = flag.value
    return config


def _evaluate_vqgan() -> tuple[dict, pathlib.Path]:
    if not _VQGAN.value:
        raise app.UsageError("--vqgan is required: a VQGAN training workdir or bundle")
    bundle = checkpointing.bundle_path(_VQGAN.value, "vqgan")
    results = reconstruction.evaluate_vqgan(
        str(bundle), _data_config(checkpointing.load_bundle_metadata(bundle)), split=_SPLIT.value,
        batch_size=_BATCH_SIZE.value, with_lpips=_LPIPS.value, lpips_weights=_LPIPS_WEIGHTS.value)
    return {"vqgan": str(bundle), "split": _SPLIT.value, **results}, bundle / f"eval_{_SPLIT.value}.json"


def _evaluate_clip() -> tuple[dict, pathlib.Path | None]:
    data_config = _data_config({"model": {"resolution": _IMAGE_SIZE.value}})
    loaded = clip.load(_CLIP.value)
    results = clip_scores.evaluate_clip(loaded, data_config, split=_SPLIT.value, batch_size=_BATCH_SIZE.value)
    return {"clip": _CLIP.value, **results}, None


def main(argv):
    writer.configure_console_logging()
    if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
        raise app.UsageError(f"usage: evaluate.py {{{'|'.join(SUBCOMMANDS)}}} [flags]")
    results, default_out = _evaluate_vqgan() if argv[1] == "vqgan" else _evaluate_clip()
    out = _OUT.value or default_out
    if out is not None:
        pathlib.Path(out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main)
