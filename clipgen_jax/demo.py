"""The Shapes demo behind `make demo`: the whole CLIP-GEN chain on the offline Shapes world (../shared/SHAPES.md).

Stages, each a library call:
  1. build the Shapes TFDS data into OUT/data (`shapes_tfds.prepare`),
  2. train the VQGAN into OUT/vqgan (`configs/vqgan.py:shapes`) and evaluate it on the held-out combinations,
  3. the CLIP: the shipped "shapes-clip" (or any CLIP `clip` names), or with `train_clip` one trained from scratch
     into OUT/clip (`configs/clip.py:shapes`), whose OUT/clip/export is then used,
  4. precompute VQGAN tokens and CLIP embeddings into OUT/data (`configs/precompute.py:shapes`; another dataset name
     than the Shapes source in the same TFDS data_dir),
  5. train the language-free prior into OUT/prior (`configs/prior.py:shapes`),
  6. generate for the 96 held-out canonical captions through `Pipeline` (NUM_CANDIDATES per prompt) and score the
     rank-0 image with the oracle, with CLIP re-ranking (the best of the candidates) and without (one sample per
     prompt), for each of SEEDS; a grid of the first GRID_PROMPTS prompts goes to OUT/samples_heldout.png.
Results go to OUT/results.json and OUT/results.md: stage times, the VQGAN table, the CLIP used, the prior's oracle
accuracies (mean and standard deviation over the seeds) and issue 7's time budget beside the measured times.

`quick` runs the same chain on the `tiny` Shapes build with the `tiny` presets (a short prior run, QUICK_CANDIDATES
candidates, one seed): a smoke run of a few minutes whose accuracies mean nothing.

Rerunning reuses what is finished: the Shapes build and a complete precompute are kept, a training run resumes from
(or returns at) its newest checkpoint, and generation is skipped when results.json already holds it for the same
prior weights and settings. A stage found complete keeps the time of the run that did it (from results.json) and is
listed under "reused"; a stage resumed after an interruption counts only the resuming run's time.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from clipgen_jax import checkpointing, pipeline, precompute, training
from clipgen_jax.data import precomputed, shapes, shapes_tfds
from clipgen_jax.evaluation import reconstruction
from clipgen_jax.models import clip as clip_lib
from clipgen_jax.training import writer

logger = logging.getLogger(__name__)

DEFAULT_CLIP = "shapes-clip"
NUM_CANDIDATES = 16  # images drawn per prompt; re-ranking keeps the CLIP-best
SEEDS = (0, 1, 2)  # sampling seeds the accuracies are averaged over
QUICK_CANDIDATES = 4
QUICK_SEEDS = (0,)
QUICK_PRIOR_STEPS = 20
GRID_PROMPTS = 16  # prompts (rows) in the sample grid
GRID_FILE = "samples_heldout.png"
ACCURACY_KEYS = ("all",) + shapes.ATTRIBUTE_NAMES

# Issue 7's budget on the 2-core CPU, compilation included: (label, stages counted, minutes).
BUDGET = (
    ("VQGAN (train + evaluate)", ("train_vqgan", "evaluate_vqgan"), 12),
    ("precompute", ("precompute",), 2),
    ("prior", ("train_prior",), 10),
    ("generation + evaluation", ("generate_evaluate",), 6),
)
BUDGET_TOTAL_MINUTES = 30


class _Clock:
    """Times stages into results["seconds"]; a stage complete before it ran keeps the earlier run's time."""

    def __init__(self, results: dict, previous: dict):
        self.results = results
        self.previous_seconds = previous.get("seconds", {})

    def run(self, name: str, complete_before: bool, fn, *args, **kwargs):
        logger.info("demo stage %s%s", name, " (complete: reusing it)" if complete_before else "")
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        seconds = round(time.perf_counter() - start, 1)
        if complete_before:
            self.results["reused"].append(name)
            seconds = self.previous_seconds.get(name, seconds)
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
        train_clip: bool = False) -> dict:
    """Runs the demo into `out` and returns its results (also written to `out/results.json` and `results.md`).

    `clip`: the CLIP that conditions and re-ranks (packaged name, directory or Hub id); ignored with `train_clip`,
    which trains one into `out/clip` and uses its export."""
    out = pathlib.Path(out).absolute()  # the precompute plan records paths: a rerun from elsewhere must match
    data_dir = out / "data"
    previous = _previous_results(out)
    results: dict = {"quick": quick, "backend": jax.default_backend(), "seconds": {}, "reused": []}
    clock = _Clock(results, previous)
    preset = "tiny" if quick else "shapes"
    if not train_clip:
        clip_lib.resolve(clip)  # a missing CLIP fails now, not after the VQGAN's training

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

    # 6. Generation and the oracle's scores.
    num_candidates, seeds = (QUICK_CANDIDATES, QUICK_SEEDS) if quick else (NUM_CANDIDATES, SEEDS)
    pipe = pipeline.Pipeline.load(out / "prior")
    settings = {"prior_weights_hash": checkpointing.params_hash(pipe.prior_params), "prior_step": pipe.metadata["step"],
                "num_prompts": len(shapes.heldout_combinations()), "num_candidates": num_candidates,
                "seeds": list(seeds)}
    earlier = previous.get("prior")
    if earlier is not None and earlier.get("settings") == settings and (out / GRID_FILE).is_file():
        clock.run("generate_evaluate", True, lambda: None)
        results["prior"] = earlier
    else:
        results["prior"] = clock.run("generate_evaluate", False, evaluate_prior, pipe, out / GRID_FILE,
                                     num_candidates=num_candidates, seeds=seeds)
        results["prior"]["settings"] = settings
    results["prior"]["train_steps"] = prior_config.train.steps

    results["budget"] = budget(results["seconds"])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    logger.info("wrote %s and %s", out / "results.json", out / "results.md")
    return results


def evaluate_prior(pipe: pipeline.Pipeline, grid_path: pathlib.Path, *, num_candidates: int,
                   seeds: tuple[int, ...], batch_size: int | None = None) -> dict:
    """The oracle's accuracies on the held-out canonical captions, per seed and as mean / std over seeds:
    "reranked" scores the CLIP-best of `num_candidates` images per prompt, "single" one sample per prompt (no
    re-ranking). The grid of the first seed's candidates (rows: the first GRID_PROMPTS prompts, best first) is saved
    to `grid_path`."""
    attributes = shapes.heldout_combinations()
    prompts = [shapes.canonical_caption(attrs) for attrs in attributes]
    batch_size = batch_size or len(prompts)  # one sampler shape for both calls (it compiles once)
    per_seed: dict[str, list[dict]] = {"reranked": [], "single": []}
    for index, seed in enumerate(seeds):
        logger.info("generating %d x %d held-out images (seed %d)", len(prompts), num_candidates, seed)
        images_PKHWC, _ = pipe.generate(prompts, num_candidates=num_candidates, keep=num_candidates, seed=seed,
                                        batch_size=batch_size)
        single_PKHWC, _ = pipe.generate(prompts, num_candidates=1, keep=1, seed=seed, batch_size=batch_size)
        per_seed["reranked"].append(shapes.score_images(images_PKHWC[:, 0], attributes))
        per_seed["single"].append(shapes.score_images(single_PKHWC[:, 0], attributes))
        if index == 0:
            Image.fromarray(captioned_grid(images_PKHWC[:GRID_PROMPTS], prompts[:GRID_PROMPTS])).save(grid_path)
    summary: dict = {"num_prompts": len(prompts), "num_candidates": num_candidates, "seeds": list(seeds),
                     "grid": grid_path.name}
    for method, scores in per_seed.items():
        summary[method] = {"per_seed": scores, "mean": {}, "std": {}}
        for key in scores[0]:
            values = np.asarray([s[key] for s in scores])
            summary[method]["mean"][key] = float(values.mean())
            # Sample standard deviation over the seeds; none from a single seed.
            summary[method]["std"][key] = float(values.std(ddof=1)) if len(values) > 1 else None
    return summary


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


def budget(seconds: dict[str, float]) -> list[dict]:
    """Issue 7's budget lines with the measured minutes beside them (stages absent from `seconds` count 0)."""
    lines = []
    for label, stages, limit in BUDGET:
        minutes = sum(seconds.get(stage, 0.0) for stage in stages) / 60
        lines.append({"stage": label, "stages": list(stages), "limit_minutes": limit,
                      "measured_minutes": round(minutes, 2), "within": minutes <= limit})
    total = sum(seconds.values()) / 60
    lines.append({"stage": "total", "stages": sorted(seconds), "limit_minutes": BUDGET_TOTAL_MINUTES,
                  "measured_minutes": round(total, 2), "within": total <= BUDGET_TOTAL_MINUTES})
    return lines


def _mean_std(summary: dict, key: str) -> str:
    mean, std = summary["mean"][key], summary["std"][key]
    return f"{mean:.1%}" if std is None else f"{mean:.1%} ± {std:.1%}"


def markdown(results: dict) -> str:
    heldout, prior, clip = results["vqgan_heldout"], results["prior"], results["clip"]
    seeds = prior["seeds"]
    lines = [
        "# Shapes demo results" + (" (quick smoke run: tiny presets, the numbers mean nothing)"
                                   if results["quick"] else ""), "",
        f"Backend: {results['backend']}.", "",
        "## Stage 1: VQGAN, held-out combinations", "",
        "| images | PSNR (dB) | SSIM | codebook usage | perplexity | oracle agreement: all | "
        + " | ".join(shapes.ATTRIBUTE_NAMES) + " |",
        "|---" * (6 + len(shapes.ATTRIBUTE_NAMES)) + "|",
        "| {} | {:.2f} | {:.3f} | {:.1%} | {:.0f} | {:.1%} | ".format(
            heldout["num_images"], heldout["psnr"], heldout["ssim"], heldout["codebook_usage"],
            heldout["perplexity"], heldout["oracle_agreement/all"])
        + " | ".join(f"{heldout[f'oracle_agreement/{name}']:.1%}" for name in shapes.ATTRIBUTE_NAMES) + " |",
        "", "## CLIP", "",
        f"{'Trained by this demo' if clip['trained_by_demo'] else 'Frozen, not trained here'}: `{clip['name']}` "
        f"({clip['embed_dim']}-d embeddings, weights {clip['weights_hash'][:12]}). It conditions the prior and "
        "re-ranks its samples.", "",
        "## Stage 2: language-free prior, held-out canonical captions", "",
        f"{prior['num_prompts']} prompts (the held-out combinations' canonical captions), the oracle scoring one image "
        f"per prompt; prior trained {prior['train_steps']} steps. With re-ranking: the CLIP-best of "
        f"{prior['num_candidates']} samples; without: a single sample. "
        + (f"Mean ± sample standard deviation over {len(seeds)} sampling seeds ({', '.join(map(str, seeds))})."
           if len(seeds) > 1 else f"One sampling seed ({seeds[0]}): no spread."), "",
        "| method | all attributes | " + " | ".join(shapes.ATTRIBUTE_NAMES) + " |",
        "|---" * (2 + len(shapes.ATTRIBUTE_NAMES)) + "|",
        *(f"| {label} | " + " | ".join(_mean_std(prior[method], key) for key in ACCURACY_KEYS) + " |"
          for label, method in ((f"CLIP re-ranking (best of {prior['num_candidates']})", "reranked"),
                                ("no re-ranking", "single"))),
        "", f"Samples: `{prior['grid']}` (the first seed; a row per prompt, the prompt under it, candidates in "
        "CLIP order, best first).",
        "", "## Time budget (2-core CPU in issue 7; minutes, compilation included)", "",
        "| stage | budget | measured | within |", "|---|---|---|---|",
        *(f"| {line['stage']} | {line['limit_minutes']} | {line['measured_minutes']:.2f} | "
          f"{'yes' if line['within'] else 'no'} |" for line in results["budget"]),
        *(["", "The budget assumes the shipped CLIP; the total above includes this run's CLIP training."]
          if "train_clip" in results["seconds"] else []),
        "", "## Time (seconds, compilation included)", "", "| step | seconds |", "|---|---|",
        *(f"| {name} | {seconds}{' (reused: earlier run)' if name in results['reused'] else ''} |"
          for name, seconds in results["seconds"].items()), "",
    ]
    return "\n".join(lines)
