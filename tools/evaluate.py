"""Evaluates a trained stage.

  python tools/evaluate.py vqgan --vqgan=runs/vqgan [--split=heldout] [--lpips] [--out=FILE]
      PSNR, SSIM, LPIPS (by default off Shapes when the weights file exists), codebook usage and perplexity of the
      tokens, and on Shapes the oracle agreement between each input and its reconstruction. The data defaults to the
      VQGAN's training data (from its bundle); override it with --source/--name/--data_dir/--folder. An image folder
      has a "train" and a "validation" part (--validation_fraction, default the recorded one).
  python tools/evaluate.py clip --clip=shapes-clip [--split=validation] [--out=FILE]
      On Shapes (the default data): zero-shot accuracy per attribute on the held-out images and text -> image
      retrieval of the held-out combinations' canonical captions among every validation + heldout image. On other
      captioned data (--source tfds|folder ...): image <-> text retrieval top-1/top-5 on --split.
  python tools/evaluate.py prior --prior=runs/shapes/prior [--eval_clip=shapes-clip-eval] [--prompts=FILE]
      Generates with the prior (its VQGAN and CLIP, re-ranking by that CLIP) and scores the images with another CLIP:
      CLIP score and FD-CLIP against the --split images, and on Shapes the oracle's accuracies on the held-out
      canonical captions (docs/SHAPES.md "Scores": strict and lenient reading, shape margins), each as mean and std
      over --seeds (default 100,101,102), with re-ranking (best of --num_candidates) and without. The held-out
      prompts' test half is the headline, the tuning half beside it (--half samples one); --wordings adds a
      re-ranked row per other caption template the CLIP was trained on.
      Prompts: the Shapes held-out captions, a --prompts file, or the captions of --split (then also the split's own
      images, with their captions and with other ones, as the scale). Also writes a markdown table beside the JSON.
  python tools/evaluate.py fid --generated=DIR --reference=DIR [--fid_mode=clean] [--device=cpu]
      FID between two image folders through clean-fid (an optional install that needs the Inception weights; see
      clipgen_jax/evaluation/fid.py); a tools/generate.py output folder contributes its numbered samples only.
Results are printed as JSON and written to --out (default: <bundle>/eval_<split>.json for a VQGAN; stdout only for
a CLIP unless --out is given; <prior>/eval_generation.json for a prior; stdout only for FID unless --out is given).
"""

import json
import logging
import pathlib
import sys

from absl import app, flags

import clipgen_jax  # noqa: F401  (registers the Shapes TFDS builder)
from clipgen_jax import checkpointing, cli, host_memory, pipeline
from clipgen_jax.data import images, shapes
from clipgen_jax.evaluation import clip_scores, fid, generation, image_metrics, reconstruction
from clipgen_jax.models import clip, lpips
from clipgen_jax.training import writer

_VQGAN = flags.DEFINE_string("vqgan", None, "VQGAN training workdir or bundle.")
_CLIP = flags.DEFINE_string("clip", None, "CLIP: Hub id, directory (e.g. a CLIP workdir's export/) or "
                            "packaged name (clip: default shapes-clip; prior: default the prior's own).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "clip: side of the images read from the data.")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate on (default: heldout on Shapes, else validation; an "
                             "image folder's parts are train and validation).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 100, "Images per batch.")
_LPIPS = flags.DEFINE_bool("lpips", None, "vqgan: report LPIPS (needs the LPIPS weights file; default: on for data "
                           "other than Shapes when the weights file exists).")
_LPIPS_WEIGHTS = flags.DEFINE_string("lpips_weights", None, "LPIPS weights .npz (default location if unset).")
_OUT = flags.DEFINE_string("out", None, "JSON output file.")
_PRIOR = flags.DEFINE_string("prior", None, "prior: training workdir or bundle.")
_EVAL_CLIP = flags.DEFINE_string("eval_clip", None, "prior: the CLIP that scores (default: shapes-clip-eval on "
                                 "Shapes); never the one that conditions and re-ranks.")
_PROMPTS = flags.DEFINE_string("prompts", None, "prior: prompts file (one per line); default: the Shapes held-out "
                               "canonical captions, or the captions of --split.")
_COMBINATIONS = flags.DEFINE_enum(
    "combinations", "heldout", ["heldout", "training"],
    "prior, on Shapes without --prompts: score the canonical captions of the 96 held-out combinations (docs/SHAPES.md "
    "\"Scores\") or of 96 training combinations (every ninth of the 876), which tells composition errors apart.")
_MAX_PROMPTS = flags.DEFINE_integer("max_prompts", 1000, "prior: at most this many prompts from --split's captions.")
_NUM_CANDIDATES = flags.DEFINE_integer("num_candidates", 16, "prior: candidates per image for the re-ranked row.")
_SEEDS = flags.DEFINE_list("seeds", None, "prior: sampling seeds (mean and std over them); default the test seeds "
                           "100,101,102, or with --half=tuning the tuning seeds 0,1,2 (docs/SHAPES.md).")
_HALF = flags.DEFINE_enum("half", "both", ["both", *shapes.HELDOUT_HALVES],
                          "prior, on the held-out combinations: sample both halves of the 96 prompts (each scored "
                          "alone: the test half, odd positions, is the reported figure; settings are chosen on the "
                          "tuning half, even positions) or only one.")
_WORDINGS = flags.DEFINE_bool("wordings", False, "prior, on Shapes: also score the captions in each other template "
                              "the CLIP was trained on (canonical words), re-ranked, one labelled row each.")
_IMAGES_PER_PROMPT = flags.DEFINE_integer("images_per_prompt", 21, "prior: images per prompt for CLIP score and "
                                          "FD-CLIP (21 x 96 Shapes prompts = 2016 >= 2000).")
_GUIDANCE_SCALE = flags.DEFINE_float("guidance_scale", 1.0, "prior: classifier-free guidance scale.")
_DATA_FIELDS = {name: flags.DEFINE_string(name, None, f"Data source field `{name}` (default: the training data's).")
                for name in ("source", "name", "data_dir", "folder")}
_VALIDATION_FRACTION = flags.DEFINE_float("validation_fraction", None, "Image folders: the share of images in the "
                                          "validation part (default: the recorded one, else 0.1).")

_GENERATED = flags.DEFINE_string("generated", None, "fid: folder of generated images (e.g. tools/generate.py --out).")
_REFERENCE = flags.DEFINE_string("reference", None, "fid: folder of reference images.")
_FID_MODE = flags.DEFINE_enum("fid_mode", "clean", fid.MODES, "fid: clean-fid's resizing mode.")
_DEVICE = flags.DEFINE_string("device", "cpu", "fid: torch device for clean-fid's Inception (cpu, cuda).")

SUBCOMMANDS = ("vqgan", "clip", "prior", "fid")


def _data_config(metadata: dict):
    config = images.default_data_config()
    if "data" in metadata:
        config.update(metadata["data"])
        config.validation_fraction = images.recorded_validation_fraction(metadata["data"])
    config.image_size = metadata["model"]["resolution"]
    for name, flag in _DATA_FIELDS.items():
        if flag.value is not None:
            config[name] = flag.value
    if _VALIDATION_FRACTION.value is not None:
        config.validation_fraction = _VALIDATION_FRACTION.value
    return config


def _split(data_config) -> str:
    return _SPLIT.value or ("heldout" if images.is_shapes(data_config) else "validation")


def _with_lpips(data_config) -> bool:
    """--lpips when given, else whether the data is real images (not Shapes) and the weights file exists."""
    if _LPIPS.value is not None:
        return _LPIPS.value
    if images.is_shapes(data_config):
        return False
    path = pathlib.Path(_LPIPS_WEIGHTS.value) if _LPIPS_WEIGHTS.value else lpips.default_weights_path()
    if not path.is_file():
        logging.warning("no LPIPS: no weights file %s (%s)", path, lpips.FETCH_COMMAND)
    return path.is_file()


def _evaluate_vqgan() -> tuple[dict, pathlib.Path]:
    if not _VQGAN.value:
        raise app.UsageError("--vqgan is required: a VQGAN training workdir or bundle")
    bundle = checkpointing.bundle_path(_VQGAN.value, "vqgan")
    data_config = _data_config(checkpointing.load_bundle_metadata(bundle))
    split = _split(data_config)
    results = reconstruction.evaluate_vqgan(
        str(bundle), data_config, split=split, batch_size=_BATCH_SIZE.value, with_lpips=_with_lpips(data_config),
        lpips_weights=_LPIPS_WEIGHTS.value)
    return ({"vqgan": str(bundle), "split": split, "data": images.describe(data_config, split), **results},
            bundle / f"eval_{split}.json")


def _evaluate_clip() -> tuple[dict, pathlib.Path | None]:
    data_config = _data_config({"model": {"resolution": _IMAGE_SIZE.value}})
    name = _CLIP.value or "shapes-clip"
    split = _split(data_config)
    results = clip_scores.evaluate_clip(clip.load(name), data_config, split=split, batch_size=_BATCH_SIZE.value)
    if not images.is_shapes(data_config):
        results["data"] = images.describe(data_config, split)
    return {"clip": name, **results}, None


def _evaluate_prior() -> tuple[dict, pathlib.Path]:
    if not _PRIOR.value:
        raise app.UsageError("--prior is required: a prior training workdir or bundle")
    pipe = pipeline.Pipeline.load(_PRIOR.value, _VQGAN.value, _CLIP.value)
    data_config = _data_config(checkpointing.load_bundle_metadata(
        checkpointing.bundle_path(pipe.metadata["vqgan"], "vqgan")))
    data_config.update(crop="center", flip=False)
    on_shapes = images.is_shapes(data_config)
    split = _split(data_config)
    if _WORDINGS.value and (_PROMPTS.value or not on_shapes):
        raise app.UsageError("--wordings writes the Shapes combinations in other templates: drop --prompts, use "
                             "Shapes data")
    eval_clip_name = _EVAL_CLIP.value or ("shapes-clip-eval" if on_shapes else None)
    if eval_clip_name is None:
        raise app.UsageError("--eval_clip is required off the Shapes world: a CLIP other than the prior's")
    eval_clip = clip.load(eval_clip_name)
    if eval_clip.weights_hash() == pipe.clip.weights_hash():
        raise app.UsageError(f"--eval_clip={eval_clip_name} is the CLIP that conditions and re-ranks the prior; "
                             "scores must come from another one")
    attributes, groups, seeds, prompt_indices = None, None, _seeds(), None
    if _PROMPTS.value:
        prompts = pipeline.read_prompts_file(_PROMPTS.value)
        reference = clip_scores.read_split(data_config, split, _BATCH_SIZE.value)["image"]
    elif on_shapes:
        attributes, groups = _shapes_prompts()
        prompts = [shapes.canonical_caption(a) for a in attributes]
        if _COMBINATIONS.value == "heldout":  # the sampler's prompt index: the combination's, whichever half runs
            prompt_indices = [shapes.heldout_combinations().index(a) for a in attributes]
        reference = clip_scores.read_split(data_config, split, _BATCH_SIZE.value)["image"]
    else:
        reference, captions = clip_scores.read_captioned_split(data_config, split, _BATCH_SIZE.value)
        prompts = captions[:_MAX_PROMPTS.value]
    method = generation.pipeline_method(pipe, guidance_scale=_GUIDANCE_SCALE.value, prompt_indices=prompt_indices)
    methods = {f"CLIP-GEN, re-ranked (best of {_NUM_CANDIDATES.value})": (method, _NUM_CANDIDATES.value),
               "CLIP-GEN, no re-ranking": (method, 1)}
    if not (_PROMPTS.value or on_shapes):  # the split's own images as the scale: its captions' and other captions'
        methods["real images of the prompts (reference)"] = (_real_images(reference, prompts, 0), 1)
        methods["real images of other prompts (mismatched)"] = (_real_images(reference, prompts, 1), 1)
    summaries = generation.evaluate_methods(
        methods, prompts, eval_clip=eval_clip, reference_features_ND=eval_clip.embed_images(reference),
        seeds=seeds, images_per_prompt=_IMAGES_PER_PROMPT.value, attributes=attributes, groups=groups)
    if _WORDINGS.value:
        summaries.update(generation.evaluate_wordings(method, list(methods)[0], attributes,
                                                      num_candidates=_NUM_CANDIDATES.value, seeds=seeds,
                                                      groups=groups))
    results = {"prior": str(_PRIOR.value), "eval_clip": eval_clip_name, "reference_split": split,
               "reference": images.describe(data_config, split),
               "num_reference_images": len(reference), "guidance_scale": _GUIDANCE_SCALE.value, "methods": summaries}
    out = pathlib.Path(_OUT.value) if _OUT.value else pathlib.Path(_PRIOR.value) / "eval_generation.json"
    tables = [f"{half} half:\n\n" + generation.markdown_table(summaries, eval_clip_name, group=half, features=not i)
              for i, half in enumerate(groups or [])] or [generation.markdown_table(summaries, eval_clip_name)]
    out.with_suffix(".md").write_text("\n\n".join(tables) + "\n")
    print("\n\n".join(tables), file=sys.stderr)
    return results, out


def _real_images(reference_NHWC, prompts: list[str], shift: int) -> generation.GenerateFn:
    """A method that returns, for each prompt, the split's image `shift` places after the prompt's own."""
    images_u8_NHWC = image_metrics.to_uint8(reference_NHWC[:len(prompts)])
    index = {prompt: i for i, prompt in enumerate(prompts)}
    return lambda texts, num_candidates, seed: images_u8_NHWC[[(index[t] + shift) % len(prompts) for t in texts]]


def _seeds() -> list[int]:
    if _SEEDS.value:
        return [int(seed) for seed in _SEEDS.value]
    return list(shapes.TUNING_SEEDS if _HALF.value == "tuning" else shapes.TEST_SEEDS)


def _shapes_prompts() -> tuple[list[shapes.Attributes], dict[str, list[int]] | None]:
    """The Shapes combinations to prompt with (--combinations, --half) and the held-out halves' positions among
    them, each scored alone."""
    if _COMBINATIONS.value == "training":
        return shapes.training_combinations()[::9][:96], None
    halves = list(shapes.HELDOUT_HALVES) if _HALF.value == "both" else [_HALF.value]
    positions = sorted(position for half in halves for position in shapes.heldout_half(half))
    heldout = shapes.heldout_combinations()
    return ([heldout[p] for p in positions],
            {half: [positions.index(p) for p in shapes.heldout_half(half)] for half in halves})


def _evaluate_fid() -> tuple[dict, None]:
    if not (_GENERATED.value and _REFERENCE.value):
        cli.fail("fid needs --generated=DIR and --reference=DIR")
    try:
        return fid.compute_fid(_GENERATED.value, _REFERENCE.value, mode=_FID_MODE.value, device=_DEVICE.value), None
    except (fid.FidUnavailable, FileNotFoundError, ValueError) as error:
        cli.fail(str(error))


def main(argv):
    writer.configure_console_logging()
    host_memory.keep_freed_memory()
    if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
        raise app.UsageError(f"usage: evaluate.py {{{'|'.join(SUBCOMMANDS)}}} [flags]")
    evaluate = {"vqgan": _evaluate_vqgan, "clip": _evaluate_clip, "prior": _evaluate_prior,
                "fid": _evaluate_fid}[argv[1]]
    results, default_out = evaluate()
    out = _OUT.value or default_out
    if out is not None:
        pathlib.Path(out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main)
