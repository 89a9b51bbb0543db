"""The VQGAN+CLIP baseline on tiny random models: the optimisation raises CLIP similarity, its outputs are VQGAN
decodings of codebook tokens, seeds reproduce, `generate` returns what `Pipeline.generate` does, and
`tools/generate.py --method vqgan_clip` writes the docs/SHAPES.md layout or refuses bad input with one line."""

import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from clipgen_jax import pipeline, vqgan_clip

from helpers import PROMPTS, check_ranked_generation, check_two_prompts_two_kept, tiny_models

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOL = str(REPO_ROOT / "tools" / "generate.py")
# Few steps and views: the tiny models only need to show the direction of the optimisation.
FAST = vqgan_clip.Settings(steps=12, learning_rate=0.2, cutouts=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("vqgan_clip"))


@pytest.fixture(scope="module")
def method(models):
    vqgan_path, clip_path = models
    return vqgan_clip.VQGANCLIP.load(vqgan_path, str(clip_path))


def _keys(count, seed=0):
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(np.arange(count))


def _decode_and_score(method, codes, queries):
    return jax.jit(lambda tokens, query: pipeline.decode_and_score(
        method.vqgan, method.vqgan_params, method.clip, method.clip.params, tokens, query))(codes, queries)


def test_the_optimisation_raises_clip_similarity(method):
    queries = method.clip.embed_texts(PROMPTS)
    # A random CLIP barely tells images apart (similarities differ in the fourth decimal), so gains are measured
    # against the spread of the similarity over random images: the decodings of 16 random token grids per prompt.
    random_codes = jax.random.randint(jax.random.PRNGKey(5), (32, 16, 16), 0, method.vqgan.codebook_size)
    _, start_scores = _decode_and_score(method, random_codes, np.repeat(queries, 16, axis=0))
    start_scores = np.asarray(start_scores).reshape(2, 16)
    spread = start_scores.std(axis=1)
    _, _, scores, history = method.optimise(queries, _keys(2), FAST)
    assert history.shape == (FAST.steps, 2)
    # The augmented views' mean similarity climbs over the steps, and the saved image of the final codes beats every
    # random image by far.
    assert np.all(history[-3:].mean(axis=0) > history[:3].mean(axis=0) + 3 * spread), (history, spread)
    assert np.all(scores > start_scores.max(axis=1) + 5 * spread), (scores, start_scores, spread)


def test_outputs_are_vqgan_decodings_of_codebook_tokens(method):
    queries = method.clip.embed_texts(PROMPTS)
    codes, images, scores, _ = method.optimise(queries, _keys(2), FAST)
    assert codes.shape == (2, 16, 16) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < method.vqgan.codebook_size
    decoded, rescored = _decode_and_score(method, codes, queries)
    # The same decode compiled on its own: at most a rounding step apart at a handful of pixels.
    difference = np.abs(np.asarray(decoded, np.int16) - images.astype(np.int16))
    assert images.dtype == np.uint8 and difference.max() <= 1 and np.mean(difference > 0) < 0.01
    np.testing.assert_allclose(scores, rescored, atol=1e-4)


def test_seeds_reproduce_and_generate_ranks_like_the_pipeline(method):
    images, _, all_images, all_scores = check_ranked_generation(
        lambda keep, seed: method.generate(PROMPTS, num_candidates=3, keep=keep, seed=seed, settings=FAST),
        method.clip, atol=1e-4)
    # A candidate's key is (seed, prompt, candidate): other batchings give the same candidates.
    rebatched, rebatched_scores = method.generate(PROMPTS, num_candidates=3, keep=3, seed=0, batch_size=4,
                                                  settings=FAST)
    np.testing.assert_allclose(rebatched_scores, all_scores, atol=1e-4)
    assert np.mean(rebatched != all_images) < 0.01
    other_seed, _ = method.generate(PROMPTS, num_candidates=3, keep=2, seed=1, settings=FAST)
    assert not np.array_equal(other_seed, images)


def test_every_init_starts_from_distinct_latents(method):
    grid = (2, 16, 16, method.vqgan.code_dim)
    for init in vqgan_clip.INITS:
        latents = np.asarray(method._initial_latents(method.vqgan_params, _keys(2), init))
        assert latents.shape == grid and np.all(np.isfinite(latents)) and not np.allclose(latents[0], latents[1])
        if init == "codes":  # codebook entries: they snap to themselves
            codebook = np.asarray(method.vqgan.apply({"params": method.vqgan_params}, method=method.vqgan.codebook))
            assert np.all(np.isclose(latents[..., None, :], codebook).all(-1).any(-1))


def test_bad_settings_are_named(method):
    for settings, message in ((dict(steps=0), "steps=0 must be a positive integer"),
                              (dict(learning_rate=0.0), "learning_rate=0.0 must be > 0"),
                              (dict(cutouts=0), "cutouts=0 must be a positive integer"),
                              (dict(cut_scale=0.0), r"cut_scale=0.0 must be in \(0, 1\]"),
                              (dict(init="zeros"), "init='zeros' must be one of")):
        with pytest.raises(ValueError, match=message):
            vqgan_clip.Settings(**settings)
    with pytest.raises(ValueError, match="keep=3 must be between 1 and num_candidates=2"):
        method.generate(PROMPTS, num_candidates=2, keep=3)
    with pytest.raises(pipeline.PromptError, match="prompt 1 is empty"):
        method.generate([PROMPTS[0], " "])


def test_augmented_views_of_the_whole_image_are_the_image():
    images = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1.0, maxval=1.0)
    whole = vqgan_clip.Settings(cutouts=3, cut_scale=1.0, noise=0.0)
    views = vqgan_clip.cutouts(images, _keys(2), whole, 32)
    assert views.shape == (2, 3, 32, 32, 3)
    np.testing.assert_allclose(views, np.repeat(np.asarray(images)[:, None], 3, axis=1), atol=1e-5)
    # Resized views keep the range; flips mirror the columns.
    resized = vqgan_clip.cutouts(images, _keys(2), vqgan_clip.Settings(cutouts=3, cut_scale=0.5, noise=0.0), 48)
    assert resized.shape == (2, 3, 48, 48, 3) and float(np.abs(resized).max()) <= 1.0 + 1e-5
    flipped = vqgan_clip.cutouts(images[:1], _keys(1), vqgan_clip.Settings(cutouts=16, cut_scale=1.0, noise=0.0,
                                                                          flip=True), 32)
    mirrored = np.asarray(images[0, :, ::-1])
    is_mirrored = [np.allclose(view, mirrored, atol=1e-5) for view in flipped[0]]
    assert 0 < sum(is_mirrored) < 16


# ----------------------------------------------------------------------------------------------------------------
# tools/generate.py --method vqgan_clip


def _run(*args):
    return subprocess.run([sys.executable, TOOL, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def test_the_tool_writes_the_shapes_layout(models, method, tmp_path):
    vqgan_path, clip_path = models
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    result = _run("--method=vqgan_clip", f"--prompts={prompts_file}", f"--vqgan={vqgan_path}", f"--clip={clip_path}",
                  "--num_candidates=2", "--keep=2", "--seed=3", f"--steps={FAST.steps}",
                  f"--learning_rate={FAST.learning_rate}", f"--cutouts={FAST.cutouts}", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    records = check_two_prompts_two_kept(out)
    images, scores = method.generate(PROMPTS, num_candidates=2, keep=2, seed=3, settings=FAST)
    for record in records:
        saved = np.asarray(Image.open(out / record["file"]))
        assert saved.shape == (32, 32, 3)
        assert np.mean(saved != images[record["prompt_index"], record["rank"]]) < 0.01
        assert record["clip_score"] == pytest.approx(float(scores[record["prompt_index"], record["rank"]]), abs=1e-4)
    assert records[0]["clip_score"] >= records[1]["clip_score"] and records[2]["clip_score"] >= records[3]["clip_score"]


@pytest.mark.parametrize("case", ["unknown_method", "zero_steps", "negative_learning_rate", "no_vqgan",
                                  "prior_flag", "method_flag_with_prior"])
def test_bad_input_is_a_one_line_error_and_leaves_no_output(case, models, tmp_path):
    vqgan_path, clip_path = models
    models_args = [f"--vqgan={vqgan_path}", f"--clip={clip_path}"]
    args, expected = {
        "unknown_method": (["--method=diffusion", *models_args], "--method='diffusion' is not one of prior, "
                                                                 "vqgan_clip"),
        "zero_steps": (["--method=vqgan_clip", "--steps=0", *models_args], "steps=0 must be a positive integer"),
        "negative_learning_rate": (["--method=vqgan_clip", "--learning_rate=-1", *models_args],
                                   "learning_rate=-1.0 must be > 0"),
        "no_vqgan": (["--method=vqgan_clip", f"--clip={clip_path}"], "--method vqgan_clip needs --vqgan DIR"),
        "prior_flag": (["--method=vqgan_clip", "--temperature=0.5", *models_args],
                       "--temperature applies to --method prior only, not vqgan_clip"),
        "method_flag_with_prior": (["--steps=5", "--prior=runs/none"], "--steps applies to --method vqgan_clip only"),
    }[case]
    out = tmp_path / "out"
    result = _run(f"--text={PROMPTS[0]}", *args, f"--out={out}")
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and "Traceback" not in result.stderr
    assert re.search(re.escape(expected), last_line), last_line
    assert not out.exists() and not list(tmp_path.glob(".out*"))
