"""The Shapes demo behind `make demo`: the whole CLIP-GEN chain on the offline Shapes world (docs/SHAPES.md).

Stages, each a library call:
  1. build the Shapes TFDS data into OUT/data (`shapes_tfds.prepare`),
  2. train the VQGAN into OUT/vqgan (`configs/vqgan.py:shapes`) and evaluate it on the held-out combinations,
  3. the CLIP: the shipped "shapes-clip" (or any CLIP `clip` names), or with `train_clip` one trained from scratch
     into OUT/clip (`configs/clip.py:shapes`), whose OUT/clip/export is then used,
  4. precompute VQGAN tokens and CLIP embeddings into OUT/data (`configs/precompute.py:shapes`; another dataset name
     than the Shapes source in the same TFDS data_dir),
  5. train the language-free prior into OUT/prior (`configs/prior.py:shapes`),
  6. generate for the 96 held-out canonical captions through `Pipeline`, with CLIP re-ranking (the best of
     NUM_CANDIDATES) and without (one sample), and score with `evaluation.generation`: the oracle's accuracies (strict
     and lenient) and shape margins of one image per prompt for each of SEEDS, for the test half of the prompts (the
     headline) and the tuning half (docs/SHAPES.md), and CLIP score and FD-CLIP (against the `heldout` images) of
     IMAGES_PER_PROMPT images per prompt for the first seed, both from the evaluation CLIP (EVAL_CLIP, never the one
     that conditions and re-ranks); a grid of the first GRID_PROMPTS prompts goes to OUT/samples_heldout.png.
Results go to OUT/results.json and OUT/results.md: stage times, the VQGAN table, the CLIP used, the generation scores
(mean and standard deviation over the seeds) and the time budget beside the measured times.

`compare` (`--compare`) then trains the ablations and the upper bound of COMPARE_PRIORS into OUT/compare/
(the same prior recipe with one conditioning switch changed) and scores each like the main prior (re-ranked), and
VQGAN+CLIP (the optimisation baseline, on the demo's VQGAN and conditioning CLIP) the same way, into one table with
the main prior's rows: results["compare"].

Training curves of every run (losses, PSNR, the prior's training-time oracle score) go to OUT/CURVES_FILE.

`quick` runs the same chain on the `tiny` Shapes build with the `tiny` presets (a short prior run, QUICK_CANDIDATES
candidates, one seed): a smoke run of a few minutes whose accuracies mean nothing.

Rerunning reuses what is finished: the Shapes build and a complete precompute are kept, a training run resumes from
(or returns at) its newest checkpoint, and generation is skipped when results.json already holds it for the same
prior weights and settings. A stage found complete keeps the time of the run that did it (from results.json) and is
listed under "reused"; a stage resumed after an interruption counts only the resuming run's time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time

import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from clipgen_jax import checkpointing, pipeline, precompute, training, vqgan_clip
from clipgen_jax.data import precomputed, shapes, shapes_tfds
from clipgen_jax.evaluation import clip_scores, curves, generation, reconstruction
from clipgen_jax.models import clip as clip_lib
from clipgen_jax.training import writer

logger = logging.getLogger(__name__)

DEFAULT_CLIP = "shapes-clip"
EVAL_CLIP = "shapes-clip-eval"  # scores generated images (CLIP score, FD-CLIP); trained with another seed
NUM_CANDIDATES = 16  # images drawn per prompt; re-ranking keeps the CLIP-best
SEEDS = shapes.TEST_SEEDS  # sampling seeds the accuracies are averaged over (settings were chosen at others)
# CLIP score and FD-CLIP see 21 images per prompt (2016 >= 2000 against the 2000 held-out images), for the first seed
# only: all three seeds would take 3 x 34k samples, over the 6-minute budget for generation + evaluation.
IMAGES_PER_PROMPT = 21
FEATURE_SEEDS = 1
SAMPLING_BATCH = 128
QUICK_CANDIDATES = 4
QUICK_SEEDS = SEEDS[:1]
QUICK_IMAGES_PER_PROMPT = 2
QUICK_PRIOR_STEPS = 20
GRID_PROMPTS = 16  # prompts (rows) in the sample grid
GRID_FILE = "samples_heldout.png"
CURVES_FILE = "training_curves.png"
METHOD_LABELS = {"reranked": "CLIP-GEN, CLIP re-ranking (best of {num_candidates})",
                 "single": "CLIP-GEN, no re-ranking"}

# --compare: (key, table label, cond.* overrides of the main prior's config, sampling guidance scale).
# The noise xi = 0.13 matches the measured modality gap of shapes-clip: its image embeddings have cosine 0.991 with
# their own canonical caption's text embedding (validation split), and normalise(e + xi n) has cosine
# 1 / sqrt(1 + xi^2) = 0.991 with e for a random unit n orthogonal to e.
COMPARE_PRIORS = (
    ("noise", "CLIP-GEN + embedding noise (LAFITE, xi 0.13)", {"noise": 0.13}, 1.0),
    ("guidance", "CLIP-GEN + classifier-free guidance (dropout 0.1, scale 3)", {"dropout": 0.1}, 3.0),
    ("text", "text-supervised prior (upper bound; trained on caption embeddings)", {"source": "text"}, 1.0),
)
# VQGAN+CLIP (vqgan_clip.py, its default Settings) optimises every image from scratch, 30 forward and backward passes
# through the VQGAN decoder and CLIP each, so it gets one start per image (no re-ranking) to fit the --compare budget.
# Settings documents the sweep that found no better setting on Shapes.
VQGAN_CLIP_CANDIDATES = 1
QUICK_VQGAN_CLIP_STEPS = 3
VQGAN_CLIP_LABEL = "VQGAN+CLIP (optimisation, {steps} steps, best of {candidates})"
COMPARE_BUDGET_MINUTES = 90

# The demo's time budget on a 2-core CPU, compilation included: (label, stages counted, minutes).
BUDGET = (
    ("VQGAN (train + evaluate)", ("train_vqgan", "evaluate_vqgan"), 12),
    ("precompute", ("precompute",), 2),
    ("prior", ("train_prior",), 10),
    ("generation + evaluation", ("generate_evaluate",), 6),
)
BUDGET_TOTAL_MINUTES = 30


class _Clock:
    """Times stages into results["seconds"]; a stage complete before it ran keeps the earlier run's time (None if
    that run recorded none)."""

    def __init__(self, results: dict, previous: dict):
        self.results = results
        self.previous_seconds = previous.get("seconds", {})

    def run(self, name: str, complete_before: bool, fn, *args, **kwargs):
        logger.info("demo stage %s%s", name, " (complete: reusing it)" if complete_before else "")
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        seconds = round(time.perf_counter() - start, 1)
        if complete_before:
            # None when the run that did the stage recorded no time (it was stopped before writing results.json).
            self.results["reused"].append(name)
            seconds = self.previous_seconds.get(name)
        self.results["seconds"][name] = seconds
        return value


def _latest_step(workdir: pathlib.Path) -> int | None:
    """The newest checkpoint step of a training workdir, or None."""
    if not (workdir / "checkpoints").is_dir():
        return None
    checkpointer = checkpointing.Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


def _train(clock: _Clock, name: str, config, workdir: pathlib.Path) -> None:
    latest = _latest_step(workdir)
    clock.run(name, latest is not None and latest >= config.train.steps, training.train, config, str(workdir))


def _previous_results(out: pathlib.Path) -> dict:
    try:
        return json.loads((out / "results.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def run(out: str | pathlib.Path = "runs/shapes", quick: bool = False, clip: str = DEFAULT_CLIP,
        train_clip: bool = False, eval_clip: str = EVAL_CLIP, compare: bool = False) -> dict:
    """Runs the demo into `out` and returns its results (also written to `out/results.json` and `results.md`).

    `clip`: the CLIP that conditions and re-ranks (packaged name, directory or Hub id); ignored with `train_clip`,
    which trains one into `out/clip` and uses its export. `eval_clip`: the CLIP that scores the generated images."""
    out = pathlib.Path(out).absolute()  # the precompute plan records paths: a rerun from elsewhere must match
    data_dir = out / "data"
    previous = _previous_results(out)
    results: dict = {"quick": quick, "backend": jax.default_backend(), "seconds": {}, "reused": []}
    clock = _Clock(results, previous)
    preset = "tiny" if quick else "shapes"
    if not train_clip:
        clip_lib.resolve(clip)  # a missing CLIP fails now, not after the VQGAN's training
    clip_lib.resolve(eval_clip)

    # 1. The Shapes world.
    shapes_name = "tiny" if quick else "s32"
    built = tfds.builder(f"clipgen_shapes/{shapes_name}", data_dir=str(data_dir)).is_prepared()
    clock.run("build_shapes", built, shapes_tfds.prepare, shapes_name, data_dir=str(data_dir))

    # 2. The VQGAN.
    vqgan_config = training.load_config(f"configs/vqgan.py:{preset}")
    vqgan_config.data.data_dir = str(data_dir)
    _train(clock, "train_vqgan", vqgan_config, out / "vqgan")
    results["vqgan_heldout"] = clock.run("evaluate_vqgan", False, reconstruction.evaluate_vqgan, str(out / "vqgan"),
                                         vqgan_config.data, split="heldout")

    # 3. The CLIP.
    if train_clip:
        clip_config = training.load_config(f"configs/clip.py:{preset}")
        clip_config.data.data_dir = str(data_dir)
        _train(clock, "train_clip", clip_config, out / "clip")
        clip = str(out / "clip" / "export")
    clip = pipeline.model_reference(clip)  # a directory as an absolute path

    # 4. Precompute.
    pre_config = training.load_config(f"configs/precompute.py:{preset}")
    pre_config.data.data_dir = str(data_dir)
    pre_config.splits = ("train", "validation", "heldout")  # the tiny preset has no train split
    pre_config.vqgan, pre_config.clip, pre_config.output.data_dir = str(out / "vqgan"), clip, str(data_dir)
    dataset = precomputed.dataset_dir(data_dir, pre_config.output.name)
    existed = dataset.is_dir()
    try:
        clock.run("precompute", (dataset / precomputed.INFO_FILE).is_file(), precompute.precompute, pre_config)
    except precompute.PrecomputeError as error:
        if not existed:
            raise
        raise precompute.PrecomputeError(
            f"{error}\n{out} was made with another VQGAN, CLIP or settings: run the demo into another --out, or "
            f"delete {dataset} and {out / 'prior'}") from None
    metadata = precomputed.load_metadata(data_dir, pre_config.output.name)
    results["clip"] = {"name": clip, "trained_by_demo": train_clip, **metadata["clip"]}

    # 5. The prior.
    prior_config = training.load_config(f"configs/prior.py:{preset}")
    prior_config.data.update(data_dir=str(data_dir), name=pre_config.output.name)
    prior_config.vqgan, prior_config.clip = str(out / "vqgan"), clip
    grid_h, grid_w = metadata["grid_shape"]
    prior_config.model.update(vocab_size=metadata["codebook_size"], num_tokens=grid_h * grid_w,
                              cond_dim=metadata["clip"]["embed_dim"])
    if quick:
        prior_config.train.update(steps=QUICK_PRIOR_STEPS, log_every=5, eval_every=10, checkpoint_every=10,
                                  train_split="train", eval_split="validation")
    _train(clock, "train_prior", prior_config, out / "prior")

    # 6. Generation and its scores.
    num_candidates, seeds, images_per_prompt = (
        (QUICK_CANDIDATES, QUICK_SEEDS, QUICK_IMAGES_PER_PROMPT) if quick else
        (NUM_CANDIDATES, SEEDS, IMAGES_PER_PROMPT))
    pipe = pipeline.Pipeline.load(out / "prior")
    scorer = clip_lib.load(eval_clip)
    settings = {"prior_weights_hash": checkpointing.params_hash(pipe.prior_params), "prior_step": pipe.metadata["step"],
                "num_prompts": len(shapes.heldout_combinations()), "num_candidates": num_candidates,
                "seeds": list(seeds), "images_per_prompt": images_per_prompt, "feature_seeds": FEATURE_SEEDS,
                "eval_clip": pipeline.model_reference(eval_clip), "eval_clip_weights_hash": scorer.weights_hash()}
    earlier = previous.get("prior")
    if earlier is not None and earlier.get("settings") == settings and (out / GRID_FILE).is_file():
        clock.run("generate_evaluate", True, lambda: None)
        results["prior"] = earlier
    else:
        results["prior"] = clock.run(
            "generate_evaluate", False, evaluate_prior, pipe, scorer, vqgan_config.data, out / GRID_FILE,
            num_candidates=num_candidates, seeds=seeds, images_per_prompt=images_per_prompt)
        results["prior"]["settings"] = settings
    results["prior"]["train_steps"] = prior_config.train.steps

    if compare:
        optimisation = vqgan_clip.Settings(steps=QUICK_VQGAN_CLIP_STEPS) if quick else vqgan_clip.Settings()
        results["compare"] = _compare(clock, out, prior_config, results["prior"], previous.get("compare", {}), scorer,
                                      vqgan_config.data, num_candidates=num_candidates, seeds=seeds,
                                      images_per_prompt=images_per_prompt, optimisation=optimisation)
    results["curves"] = CURVES_FILE
    curves.plot_curves(curve_panels(out, [key for key, *_ in COMPARE_PRIORS] if compare else []), out / CURVES_FILE)

    results["budget"] = budget(results["seconds"])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    logger.info("wrote %s and %s", out / "results.json", out / "results.md")
    return results


def _heldout_evaluation(pipe: pipeline.Pipeline, eval_clip: clip_lib.CLIP, reference_config, **kwargs):
    """`generation.evaluate_methods` on the held-out canonical captions against the `heldout` images of
    `reference_config`, scored by `eval_clip` (refused when it is the CLIP that conditions and re-ranks); the oracle
    also scores the test and the tuning half of the prompts alone."""
    if eval_clip.weights_hash() == pipe.clip.weights_hash():
        raise ValueError(f"the evaluation CLIP {eval_clip.name} is the CLIP that conditions and re-ranks the prior; "
                         "scores must come from another one")
    attributes = shapes.heldout_combinations()
    reference = clip_scores.read_split(reference_config.copy_and_resolve_references(), "heldout", batch_size=256)
    prompts = [shapes.canonical_caption(attrs) for attrs in attributes]

    def evaluate(methods: dict) -> dict:
        return generation.evaluate_methods(methods, prompts, eval_clip=eval_clip, attributes=attributes,
                                           groups={half: shapes.heldout_half(half) for half in shapes.HELDOUT_HALVES},
                                           reference_features_ND=eval_clip.embed_images(reference["image"]),
                                           **kwargs)
    return evaluate, prompts, len(reference["image"])


def evaluate_prior(pipe: pipeline.Pipeline, eval_clip: clip_lib.CLIP, reference_config, grid_path: pathlib.Path, *,
                   num_candidates: int, seeds: tuple[int, ...], images_per_prompt: int,
                   feature_seeds: int = FEATURE_SEEDS, batch_size: int = SAMPLING_BATCH) -> dict:
    """Scores of the prior on the held-out canonical captions with re-ranking ("reranked": the CLIP-best of
    `num_candidates`) and without ("single"), from `eval_clip` against the `heldout` split of `reference_config`
    (see the module docstring). The grid of the first seed's candidates (rows: the first GRID_PROMPTS prompts, best
    first) is saved to `grid_path`."""
    evaluate, prompts, num_reference = _heldout_evaluation(
        pipe, eval_clip, reference_config, seeds=seeds, images_per_prompt=images_per_prompt,
        feature_seeds=min(feature_seeds, len(seeds)))
    method = generation.pipeline_method(pipe, batch_size=batch_size)
    methods = evaluate({"reranked": (method, num_candidates), "single": (method, 1)})
    grid_images, _ = pipe.generate(prompts[:GRID_PROMPTS], num_candidates=num_candidates, keep=num_candidates,
                                   seed=seeds[0], batch_size=batch_size)
    Image.fromarray(captioned_grid(grid_images, prompts[:GRID_PROMPTS])).save(grid_path)
    return {"num_prompts": len(prompts), "num_candidates": num_candidates, "seeds": list(seeds),
            "images_per_prompt": images_per_prompt, "eval_clip": eval_clip.name,
            "num_reference_images": num_reference, "grid": grid_path.name, **methods}


def _compare(clock: _Clock, out: pathlib.Path, prior_config, main: dict, previous: dict, eval_clip: clip_lib.CLIP,
             reference_config, *, num_candidates: int, seeds: tuple[int, ...], images_per_prompt: int,
             optimisation: vqgan_clip.Settings) -> dict:
    """The --compare table: the main prior's two rows, each COMPARE_PRIORS variant (trained here) re-ranked, then
    VQGAN+CLIP with `optimisation` on the demo's VQGAN and conditioning CLIP. A row whose weights and settings match
    the previous run's keeps its scores."""
    table = {METHOD_LABELS[key].format(num_candidates=num_candidates): main[key] for key in METHOD_LABELS}

    def score(key: str, label: str, method_source, method: generation.GenerateFn, row_settings: dict,
              candidates: int) -> None:
        earlier = previous.get(label)
        if earlier is not None and earlier.get("settings") == row_settings:
            table[label] = clock.run(f"compare_evaluate_{key}", True, lambda: earlier)
            return
        evaluate, _, _ = _heldout_evaluation(method_source, eval_clip, reference_config, seeds=seeds,
                                             images_per_prompt=images_per_prompt,
                                             feature_seeds=min(FEATURE_SEEDS, len(seeds)))
        table[label] = clock.run(f"compare_evaluate_{key}", False,
                                 lambda: evaluate({label: (method, candidates)})[label])
        table[label]["settings"] = row_settings

    for key, label, cond, guidance_scale in COMPARE_PRIORS:
        config = prior_config.copy_and_resolve_references()
        config.cond.update(cond)
        config.eval.guidance_scale = guidance_scale
        _train(clock, f"compare_train_{key}", config, out / "compare" / key)
        pipe = pipeline.Pipeline.load(out / "compare" / key)
        settings = {**main["settings"], "prior_weights_hash": checkpointing.params_hash(pipe.prior_params),
                    "guidance_scale": guidance_scale}
        score(key, label, pipe,
              generation.pipeline_method(pipe, batch_size=SAMPLING_BATCH, guidance_scale=guidance_scale), settings,
              num_candidates)

    optimiser = vqgan_clip.VQGANCLIP.load(out / "vqgan", prior_config.clip)
    settings = {key: value for key, value in main["settings"].items() if not key.startswith("prior_")}
    settings.update(method="vqgan_clip", vqgan_weights_hash=checkpointing.params_hash(optimiser.vqgan_params),
                    clip_weights_hash=optimiser.clip.weights_hash(), num_candidates=VQGAN_CLIP_CANDIDATES,
                    optimisation=dataclasses.asdict(optimisation))

    def optimise(texts, candidates, seed):  # the CLIP-best of `candidates` optimised images per text
        return optimiser.generate(list(texts), num_candidates=candidates, keep=1, seed=seed,
                                  batch_size=SAMPLING_BATCH, settings=optimisation)[0][:, 0]

    score("vqgan_clip", VQGAN_CLIP_LABEL.format(steps=optimisation.steps, candidates=VQGAN_CLIP_CANDIDATES),
          optimiser, optimise, settings, VQGAN_CLIP_CANDIDATES)
    return table


def curve_panels(out: pathlib.Path, compare_keys: list[str]) -> list[curves.Panel]:
    """The demo's training curves: the VQGAN's loss and PSNR, the priors' cross-entropy and held-out oracle score
    (the main prior's train and validation lines, and each --compare variant's validation line)."""
    vqgan, prior = out / "vqgan", out / "prior"
    variants = [(key, out / "compare" / key) for key in compare_keys]
    return [
        ("VQGAN", "loss (training batches)", [("train", vqgan, "train/loss")]),
        ("VQGAN reconstruction", "PSNR (dB)", [("train", vqgan, "train/psnr"), ("validation", vqgan, "eval/psnr")]),
        ("prior", "cross-entropy (nats per token)",
         [("train", prior, "train/cross_entropy"), ("validation", prior, "eval/cross_entropy")]
         + [(f"{key}: validation", workdir, "eval/cross_entropy") for key, workdir in variants]),
        ("prior: held-out tuning half, Shapes oracle", "all-attribute accuracy (training-time evaluation)",
         [("language-free", prior, "eval/shapes/all")]
         + [(key, workdir, "eval/shapes/all") for key, workdir in variants]),
    ]


def captioned_grid(images_PKHWC: np.ndarray, prompts: list[str]) -> np.ndarray:
    """A row of images per prompt (writer.image_grid) with the prompt written under it; uint8 [H, W, 3]."""
    rows = [writer.image_grid(images_KHWC, columns=len(images_KHWC)) for images_KHWC in images_PKHWC]
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_height = 12
    width = max(max(row.shape[1] for row in rows), max(int(draw.textlength(p)) + 4 for p in prompts))
    canvas = Image.new("RGB", (width, sum(row.shape[0] + text_height for row in rows)), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for row, prompt in zip(rows, prompts):
        canvas.paste(Image.fromarray(row), (0, y))
        draw.text((2, y + row.shape[0] - 1), prompt, fill="black")
        y += row.shape[0] + text_height
    return np.asarray(canvas)


def budget(seconds: dict[str, float | None]) -> list[dict]:
    """The budget lines with the measured minutes beside them (stages absent from `seconds` count 0; a line
    with a stage whose time is None, not recorded, has measured_minutes and within None)."""

    def line(label, stages, limit):
        times = [seconds.get(stage, 0.0) for stage in stages]
        minutes = None if None in times else round(sum(times) / 60, 2)
        return {"stage": label, "stages": list(stages), "limit_minutes": limit, "measured_minutes": minutes,
                "within": None if minutes is None else minutes <= limit}

    lines = [line(label, stages, limit) for label, stages, limit in BUDGET]
    demo_stages = sorted(stage for stage in seconds if not stage.startswith("compare_"))
    lines.append(line("total", demo_stages, BUDGET_TOTAL_MINUTES))
    if len(demo_stages) < len(seconds):
        lines.append(line("total with --compare", sorted(seconds), COMPARE_BUDGET_MINUTES))
    return lines


def markdown(results: dict) -> str:
    heldout, prior, clip = results["vqgan_heldout"], results["prior"], results["clip"]
    seeds = prior["seeds"]
    rows = {METHOD_LABELS[key].format(num_candidates=prior["num_candidates"]): prior[key] for key in METHOD_LABELS}
    lines = [
        "# Shapes demo results" + (" (quick smoke run: tiny presets, the numbers mean nothing)"
                                   if results["quick"] else ""), "",
        f"Backend: {results['backend']}.", "",
        "## Stage 1: VQGAN, held-out combinations", "",
        "Oracle agreement: the oracle reads the same attribute from the reconstruction as from the input; strict: a "
        f"reconstruction whose shape margin is below {shapes.MIN_SHAPE_MARGIN:.2f} (ambiguous, docs/SHAPES.md) "
        "disagrees on shape; lenient: any shape read counts.", "",
        reconstruction.markdown_table(heldout),
        "", "## CLIP", "",
        f"{'Trained by this demo' if clip['trained_by_demo'] else 'Frozen, not trained here'}: `{clip['name']}` "
        f"({clip['embed_dim']}-d embeddings, weights {clip['weights_hash'][:12]}). It conditions the prior and "
        "re-ranks its samples.", "",
        "## Stage 2: language-free prior, held-out canonical captions", "",
        f"{prior['num_prompts']} prompts (the held-out combinations' canonical captions); prior trained "
        f"{prior['train_steps']} steps. With re-ranking: the CLIP-best of {prior['num_candidates']} samples; without: "
        f"a single sample. Oracle accuracies score one image per prompt for each sampling seed "
        f"({', '.join(map(str, seeds))}) in the strict reading (an image whose shape margin is below "
        f"{shapes.MIN_SHAPE_MARGIN:.2f} is wrong on shape; \"lenient\" counts any shape read), separately for the two "
        "halves of the prompts (docs/SHAPES.md): settings are chosen on the tuning half (even positions) at seeds "
        f"{', '.join(map(str, shapes.TUNING_SEEDS))}, so the test half (odd positions) is the figure to quote. CLIP "
        f"score and FD-CLIP (against the {prior['num_reference_images']} held-out images) score "
        f"{prior['images_per_prompt']} images per prompt of all {prior['num_prompts']} prompts at seed {seeds[0]}, "
        f"both from `{prior['eval_clip']}`, not the CLIP that conditions and re-ranks. "
        + ("Mean ± sample standard deviation over the seeds." if len(seeds) > 1 else "One seed: no spread."), "",
        f"Test half ({len(shapes.heldout_half('test'))} prompts), the headline:", "",
        generation.markdown_table(rows, prior["eval_clip"], group="test"), "",
        f"Tuning half ({len(shapes.heldout_half('tuning'))} prompts), beside it:", "",
        generation.markdown_table(rows, prior["eval_clip"], group="tuning", features=False), "",
        "Shape margins: "
        + "; ".join(f"{name}: median {median:.3f}, {ambiguous:.1%} ambiguous" for name, median, ambiguous in (
            ("renders (the VQGAN's inputs)", heldout["inputs_margin_median"], heldout["inputs_margin_below_min"]),
            ("their reconstructions", heldout["reconstructions_margin_median"],
             heldout["reconstructions_margin_below_min"]),
            ("generated, re-ranked, test half", prior["reranked"]["mean"]["oracle_test_margin_median"],
             prior["reranked"]["mean"]["oracle_test_margin_below_min"]))) + ".",
        "", f"Samples: `{prior['grid']}` (the first seed; a row per prompt, the prompt under it, candidates in "
        f"CLIP order, best first). Training curves: `{results['curves']}`.",
        *(["", "## Comparison (`--compare`)", "",
           "The language-free prior's ablations and the text-supervised upper bound, each the same recipe with one "
           f"conditioning switch changed, re-ranked (best of {prior['num_candidates']}) and scored as above (test "
           "half).", "",
           generation.markdown_table(results["compare"], prior["eval_clip"], group="test")]
          if "compare" in results else []),
        "", "## Time budget (for a 2-core CPU; minutes, compilation included)", "",
        "| stage | budget | measured | within |", "|---|---|---|---|",
        *(f"| {line['stage']} | {line['limit_minutes']} | " + (
            "not recorded | unknown |" if line["within"] is None else
            f"{line['measured_minutes']:.2f} | {'yes' if line['within'] else 'no'} |") for line in results["budget"]),
        *(["", "The budget assumes the shipped CLIP; the total above includes this run's CLIP training."]
          if "train_clip" in results["seconds"] else []),
        "", "## Time (seconds, compilation included)", "", "| step | seconds |", "|---|---|",
        *(f"| {name} | {'not recorded' if seconds is None else seconds}"
          f"{' (reused: earlier run)' if name in results['reused'] else ''} |"
          for name, seconds in results["seconds"].items()), "",
    ]
    return "\n".join(lines)
