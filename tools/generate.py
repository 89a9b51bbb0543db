"""Generates images with a trained prior (or the VQGAN+CLIP baseline): text prompts, a prompts file, or variations of
images.

  python tools/generate.py --text "a small red circle in the top left on a black background" [--text ...]
  python tools/generate.py --prompts FILE        (one prompt per line; a final newline is fine, empty lines are not)
  python tools/generate.py --image PATH [--image ...]   (variations: conditioned on the image's CLIP embedding)
      [--prior DIR (a prior training workdir, an exported bundle or a packaged name; default runs/shapes/prior
       when it exists, else the packaged Shapes prior 'shapes')]
      [--vqgan DIR --clip NAME_OR_DIR (default: the prior's own, from its metadata)]
      [--num_candidates 16 --keep 1 --temperature 1 --top_k K --top_p P --guidance_scale 1 --seed 0]
      [--preset official (the paper's code: temperature 1, top_k 500, top_p 0.95, 64 candidates, keep 8)]
      [--out generated]
  python tools/generate.py --method vqgan_clip --vqgan DIR --clip NAME_OR_DIR (--text ... | --prompts ... | --image ...)
      [--steps 30 --learning_rate 0.1 --cutouts 2 --num_candidates 4 --keep 1 --seed 0] [--out generated]
      (no prior: each candidate optimises the VQGAN's latents towards the prompt's CLIP embedding;
      clipgen_jax/vqgan_clip.py)

For each prompt it draws num_candidates images, ranks them by CLIP similarity to the prompt (to the image for
--image) and keeps the best `keep`, writing OUT/{prompt_index:04d}_{rank:02d}.png at the model's native resolution
(rank 0 = best), OUT/grid.png and OUT/samples.json (prompt, seed, file and CLIP score of each image). OUT is written
whole or not at all; an earlier output there is replaced.

Candidate n of the p-th prompt (or image) is drawn from the key fold_in(fold_in(PRNGKey(seed), p), n), so an image
depends on the seed, the prompt's position in the list and its candidate index, not on --batch_size, --num_candidates
or the other prompts (up to a floating-point near tie; clipgen_jax/sampling.py).
"""

import os
import sys

import numpy as np
from absl import app, flags
from PIL import Image

import clipgen_jax  # noqa: F401  (registers the Shapes TFDS builder)
from clipgen_jax import host_memory, pipeline, vqgan_clip
from clipgen_jax.training import writer

DEFAULT_PRIOR = "runs/shapes/prior"  # where tools/demo.py leaves the Shapes prior (docs/SHAPES.md)
PACKAGED_PRIOR = "shapes"  # the Shapes prior shipped in the package, when there is no DEFAULT_PRIOR
# Candidates per prompt when --num_candidates is not given: a VQGAN+CLIP candidate is a whole optimisation, so it
# draws fewer.
DEFAULT_CANDIDATES = {"prior": 16, "vqgan_clip": 4}

_METHOD = flags.DEFINE_string("method", "prior", f"How images are made: one of {sorted(DEFAULT_CANDIDATES)}.")

_TEXT = flags.DEFINE_multi_string("text", None, "A prompt; repeat for several.")
_PROMPTS = flags.DEFINE_string("prompts", None, "A UTF-8 file with one prompt per line.")
_IMAGE = flags.DEFINE_multi_string("image", None, "An image to make variations of; repeat for several.")
_PRIOR = flags.DEFINE_string("prior", None, "Prior training workdir, exported bundle or packaged name (default: "
                             f"{DEFAULT_PRIOR} when it exists, else {PACKAGED_PRIOR!r}).")
_VQGAN = flags.DEFINE_string("vqgan", None, "VQGAN workdir or bundle (default: the prior's).")
_CLIP = flags.DEFINE_string("clip", None, "CLIP Hub id, directory or packaged name (default: the prior's).")
_NUM_CANDIDATES = flags.DEFINE_integer("num_candidates", None, "Images drawn per prompt before re-ranking "
                                       f"(default {DEFAULT_CANDIDATES}).")
_KEEP = flags.DEFINE_integer("keep", 1, "Best images kept per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens only.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling: the smallest token set with this probability mass.")
_GUIDANCE_SCALE = flags.DEFINE_float("guidance_scale", 1.0, "Classifier-free guidance scale (1 = none; needs a "
                                     "prior trained with cond.dropout > 0).")
_PRESET = flags.DEFINE_enum("preset", None, list(pipeline.SAMPLING_PRESETS),
                            "Named sampling settings; flags given explicitly override them. official: the paper's "
                            "code's (temperature 1, top_k 500 (at most the vocabulary), top_p 0.95, 64 candidates, "
                            "keep 8).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images sampled (or optimised) per device call.")
_STEPS = flags.DEFINE_integer("steps", vqgan_clip.Settings.steps, "vqgan_clip: optimisation steps per image.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", vqgan_clip.Settings.learning_rate,
                                    "vqgan_clip: Adam learning rate on the latents.")
_CUTOUTS = flags.DEFINE_integer("cutouts", vqgan_clip.Settings.cutouts,
                                "vqgan_clip: augmented views CLIP scores per image and step.")
# The flags that only one method reads: given with the other method, they are refused rather than ignored.
METHOD_FLAGS = {"prior": (_PRIOR, _TEMPERATURE, _TOP_K, _TOP_P, _GUIDANCE_SCALE, _PRESET),
                "vqgan_clip": (_STEPS, _LEARNING_RATE, _CUTOUTS)}
_OUT = flags.DEFINE_string("out", "generated", "Output directory.")


def _read_image(path: str) -> np.ndarray:
    """An image file -> [-1, 1] float32 [H, W, 3] (CLIP's preprocessing then resizes and crops it)."""
    try:
        with Image.open(path) as image:
            return pipeline.image_pixels(image)
    except (OSError, ValueError) as error:
        raise pipeline.PromptError(f"cannot read the image {path}: {error}") from None


def _flag_or_preset(flag):
    """The flag's value when given, else --preset's value for it, else the flag's default."""
    preset = pipeline.SAMPLING_PRESETS.get(_PRESET.value, {})
    return preset[flag.name] if flag.name in preset and not flag.present else flag.value


def _clip_preset_top_k(settings: dict, vocab_size: int) -> None:
    """--preset's top_k beyond the prior's vocabulary becomes the vocabulary size (an explicit --top_k is refused)."""
    if not _TOP_K.present and settings["top_k"] is not None and settings["top_k"] > vocab_size:
        print(f"note: --preset={_PRESET.value} top_k {settings['top_k']} clipped to the prior's vocabulary size "
              f"{vocab_size}", file=sys.stderr)
        settings["top_k"] = vocab_size


def _method_settings(method: str) -> dict:
    """The keyword arguments of the method's `generate` beyond the shared ones, checked before any model loads."""
    if method not in METHOD_FLAGS:
        raise ValueError(f"--method={method!r} is not one of {', '.join(METHOD_FLAGS)}")
    for other, other_flags in METHOD_FLAGS.items():
        for flag in other_flags:
            if other != method and flag.present:
                raise ValueError(f"--{flag.name} applies to --method {other} only, not {method}")
    if method == "prior":
        settings = {flag.name: _flag_or_preset(flag) for flag in (_TEMPERATURE, _TOP_K, _TOP_P, _GUIDANCE_SCALE)}
        pipeline.check_sampling_settings(**settings)  # top_k's upper bound, the prior's vocabulary, once it loads
        return settings
    if not (_VQGAN.value and _CLIP.value):
        raise ValueError("--method vqgan_clip needs --vqgan DIR and --clip NAME_OR_DIR (there is no prior to take "
                         "them from)")
    return dict(settings=vqgan_clip.Settings(steps=_STEPS.value, learning_rate=_LEARNING_RATE.value,
                                             cutouts=_CUTOUTS.value))


def run() -> str:
    given = [name for name, flag in (("--text", _TEXT), ("--prompts", _PROMPTS), ("--image", _IMAGE))
             if flag.value]
    if len(given) != 1:
        raise pipeline.PromptError("give exactly one of --text, --prompts and --image"
                                   + (f" (got {' and '.join(given)})" if given else ""))
    method = _METHOD.value
    options = _method_settings(method)
    num_candidates = _flag_or_preset(_NUM_CANDIDATES)
    num_candidates = DEFAULT_CANDIDATES[method] if num_candidates is None else num_candidates
    keep = _flag_or_preset(_KEEP)
    pipeline.check_candidates(num_candidates, keep, _BATCH_SIZE.value)
    prompts = sources = None
    if _PROMPTS.value:
        prompts = pipeline.read_prompts_file(_PROMPTS.value)
    elif _TEXT.value:
        prompts = list(_TEXT.value)
        empty = [i for i, text in enumerate(prompts) if not text.strip()]
        if empty:  # before the models load: the message comes at once
            raise pipeline.PromptError(f"--text number {empty[0] + 1} is empty")
    else:
        sources = list(_IMAGE.value)
        pixels = [_read_image(path) for path in sources]
    if method == "prior":
        prior = _PRIOR.value or (DEFAULT_PRIOR if os.path.exists(DEFAULT_PRIOR) else PACKAGED_PRIOR)
        generator = pipeline.Pipeline.load(prior, vqgan=_VQGAN.value, clip=_CLIP.value)
        _clip_preset_top_k(options, generator.prior.vocab_size)
    else:
        generator = vqgan_clip.VQGANCLIP.load(_VQGAN.value, _CLIP.value)
    settings = dict(num_candidates=num_candidates, keep=keep, seed=_SEED.value, batch_size=_BATCH_SIZE.value,
                    **options)
    if prompts is not None:
        images, scores = generator.generate(texts=prompts, **settings)
    else:
        embeddings = np.concatenate([generator.clip.embed_images(image[None]) for image in pixels])
        images, scores = generator.generate(image_embeddings=embeddings, **settings)
    out = pipeline.save_samples(_OUT.value, images, scores, seed=_SEED.value, prompts=prompts, sources=sources)
    return f"wrote {images.shape[0] * images.shape[1]} images ({images.shape[2]} px) to {out}"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    writer.configure_console_logging()
    host_memory.keep_freed_memory()
    try:
        print(run())
    except (OSError, ValueError) as error:  # bad prompts, paths or settings: the message says what to do
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
