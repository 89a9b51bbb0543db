"""The generation pipeline: loading a prior bundle with its VQGAN and CLIP, generating and re-ranking, refusing a
VQGAN the prior was not trained with, prompt checks, prompts files and the output layout."""

import dataclasses
import json
import shlex
import shutil

import numpy as np
import pytest
import transformers
from PIL import Image

from clipgen_jax import checkpointing, pipeline
from clipgen_jax.evaluation import generation
from clipgen_jax.models import clip, clip_tokenizer

from helpers import (CONTEXT_LENGTH, PROMPTS, check_ranked_generation, save_prior_bundle, save_vqgan,
                     small_clip_config, tiny_models)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    vqgan_path, clip_path = tiny_models(root)
    return save_prior_bundle(root / "prior", vqgan_path, clip_path)


@pytest.fixture(scope="module")
def pipe(bundle):
    return pipeline.Pipeline.load(bundle)


def test_generate_returns_the_best_candidates_ranked_by_clip_similarity(pipe):
    assert pipe.grid_shape == (16, 16) and pipe.image_size == 32
    images, _, _, _ = check_ranked_generation(
        lambda keep, seed: pipe.generate(PROMPTS, num_candidates=3, keep=keep, seed=seed, batch_size=4),
        pipe.clip, atol=1e-5)
    again, _ = pipe.generate(PROMPTS, num_candidates=3, keep=2, seed=0, batch_size=4)
    np.testing.assert_array_equal(again, images)
    other_seed, _ = pipe.generate(PROMPTS, num_candidates=3, keep=2, seed=1, batch_size=4)
    assert not np.array_equal(other_seed, images)


def test_generate_from_image_embeddings_ranks_by_similarity_to_them(pipe):
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(1, 16)).astype(np.float32) * 3.0  # normalised by the pipeline
    images, scores = pipe.generate(image_embeddings=embeddings, num_candidates=4, keep=4, seed=0, batch_size=4)
    assert images.shape == (1, 4, 32, 32, 3) and np.all(np.diff(scores, axis=1) <= 0)
    image_emb = pipe.clip.embed_images(images[0].astype(np.float32) / 127.5 - 1.0)
    unit = embeddings[0] / np.linalg.norm(embeddings[0])
    np.testing.assert_allclose(scores[0], image_emb @ unit, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one of"):
        pipe.generate(PROMPTS, image_embeddings=embeddings)
    with pytest.raises(ValueError, match=r"must be \[P, 16\]"):
        pipe.generate(image_embeddings=np.ones((1, 8), np.float32))
    with pytest.raises(ValueError, match="keep=5 must be between 1 and num_candidates=4"):
        pipe.generate(image_embeddings=embeddings, num_candidates=4, keep=5)


def _found_in(images_AHWC, images_BHWC) -> np.ndarray:
    """[A] whether each image of A is one of B's. The tokens are exact, but the VQGAN decoder's convolutions are
    blocked by batch shape too, so a pixel may round to the neighbouring uint8 value."""
    difference_AB = np.abs(images_AHWC[:, None].astype(int) - images_BHWC[None].astype(int)).max(axis=(2, 3, 4))
    return (difference_AB <= 1).any(axis=1)


def test_a_candidates_image_depends_on_seed_prompt_and_candidate_index_only(pipe):
    """Candidate n of prompt p is the same image at 1, 7 or 64 rows per call, with fewer candidates or other
    prompts; evaluation's repeats of a prompt are its further candidates."""
    whole, _ = pipe.generate(PROMPTS, num_candidates=4, keep=4, seed=5, batch_size=64)
    assert not _found_in(whole[0], whole[1]).any()
    for batch_size in (1, 7):
        images, _ = pipe.generate(PROMPTS, num_candidates=4, keep=4, seed=5, batch_size=batch_size)
        assert all(_found_in(images[p], whole[p]).all() for p in range(2))
    first_two, _ = pipe.generate(PROMPTS[1:], num_candidates=2, keep=2, seed=5, prompt_indices=[1])
    last_two, _ = pipe.generate(PROMPTS[1:], num_candidates=2, keep=2, seed=5, prompt_indices=[1],
                                first_candidates=[2])
    assert _found_in(np.concatenate([first_two[0], last_two[0]]), whole[1]).all()
    assert not _found_in(first_two[0], last_two[0]).any()
    repeated = generation.pipeline_method(pipe)([PROMPTS[0], PROMPTS[0], PROMPTS[1]], 2, 5)
    best_of_two, _ = pipe.generate(PROMPTS, num_candidates=2, keep=1, seed=5)
    assert _found_in(repeated[[0, 2]], best_of_two[:, 0]).all() and _found_in(repeated[1:2], whole[0]).all()
    assert not _found_in(repeated[1:2], best_of_two[:, 0]).any()
    second_alone = generation.pipeline_method(pipe, prompt_indices=[1])([PROMPTS[1]], 2, 5)
    assert _found_in(second_alone, best_of_two[1]).all()


def test_guidance_is_refused_without_a_trained_null_embedding(pipe):
    assert not pipe.null_embedding_trained
    with pytest.raises(ValueError, match=r"guidance_scale=2.0 needs a prior trained with condition dropout "
                                         r"\(cond.dropout > 0\)"):
        pipe.generate(PROMPTS, num_candidates=1, guidance_scale=2.0)
    guided = dataclasses.replace(pipe, metadata={**pipe.metadata, "cond": {**pipe.metadata["cond"], "dropout": 0.1}})
    assert guided.null_embedding_trained
    assert guided.generate(PROMPTS[:1], num_candidates=1, guidance_scale=2.0)[0].shape == (1, 1, 32, 32, 3)


def test_generate_one_reports_progress_and_the_command(pipe, bundle):
    calls = []
    result = pipe.generate_one(PROMPTS[0], num_candidates=3, keep=2, seed=4, top_k=10, batch_size=2,
                               progress=lambda done, total: calls.append((done, total)))
    images, scores = pipe.generate(PROMPTS[:1], num_candidates=3, keep=2, seed=4, top_k=10)
    np.testing.assert_array_equal(result.images_KHWC, images[0])
    np.testing.assert_array_equal(result.scores_K, scores[0])
    assert calls == [(2, 3), (3, 3)]
    assert shlex.split(result.command) == [
        "python", "tools/generate.py", f"--prior={bundle}", f"--text={PROMPTS[0]}", "--num_candidates=3", "--keep=2",
        "--temperature=1.0", "--top_k=10", "--guidance_scale=1.0", "--seed=4", "--batch_size=2"]
    variation = pipe.generate_one(image_embedding=np.ones(16, np.float32), image_path="cat.png", num_candidates=2)
    assert variation.images_KHWC.shape == (1, 32, 32, 3) and "--image=cat.png" in variation.command


def test_prompt_problems_are_named(pipe):
    with pytest.raises(pipeline.PromptError, match="prompt 1 is empty"):
        pipe.check_prompts(["a red circle", "  "])
    with pytest.raises(pipeline.PromptError, match=r"prompt 0 is too long: 19 CLIP tokens, at most 16"):
        pipe.check_prompts(["a small red circle in the top left on a black background next to a green square"])
    with pytest.raises(pipeline.PromptError, match="no prompts"):
        pipe.check_prompts([])


def test_a_vqgan_or_clip_the_prior_was_not_trained_with_is_refused(bundle, tmp_path):
    other = save_vqgan(tmp_path / "other_vqgan", seed=1)
    with pytest.raises(pipeline.ModelMismatchError, match=r"trained with the VQGAN .*vqgan \(weights [0-9a-f]{12}\), "
                                                          r"but the VQGAN .*other_vqgan has weights"):
        pipeline.Pipeline.load(bundle, vqgan=other)
    other_clip = tmp_path / "other_clip"
    model = transformers.FlaxCLIPModel(small_clip_config(), seed=1)
    clip.export(model, model.params, clip_tokenizer.openai_tokenizer(CONTEXT_LENGTH), clip.Preprocessing(32, 32),
                other_clip)
    with pytest.raises(pipeline.ModelMismatchError, match="pass --clip with the CLIP the prior was trained with"):
        pipeline.Pipeline.load(bundle, clip=str(other_clip))


def test_bundle_records_its_models_and_finds_them_after_a_move(bundle, tmp_path):
    metadata = checkpointing.load_bundle_metadata(bundle)
    assert metadata["kind"] == "prior" and metadata["cond"]["source"] == "image"
    assert metadata["vqgan"] == str(bundle.parent / "vqgan") and metadata["clip"] == str(bundle.parent / "clip")
    assert metadata["vqgan_relative"] == "../vqgan" and metadata["clip_relative"] == "../clip"
    # The runs directory moved as a whole: the absolute paths are gone, the relative ones still hold.
    moved = tmp_path / "moved"
    shutil.copytree(bundle.parent, moved)
    metadata.update(vqgan="/nonexistent/vqgan", clip="/nonexistent/clip")
    (moved / "prior" / checkpointing.BUNDLE_METADATA).write_text(json.dumps(metadata))
    loaded = pipeline.Pipeline.load(moved / "prior")
    assert loaded.clip.name == str(moved / "prior" / "../clip")


def test_missing_prior_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="no prior at .*nothing: train one"):
        pipeline.Pipeline.load(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="neither a prior bundle nor a training checkpoint"):
        pipeline.Pipeline.load(tmp_path)


def test_prompts_file_rules(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\n")
    assert pipeline.read_prompts_file(path) == ["a red circle", "a blue square"]
    path.write_text("a red circle\r\na blue square")
    assert pipeline.read_prompts_file(path) == ["a red circle", "a blue square"]
    path.write_text("a red circle\n\na blue square\n")
    with pytest.raises(pipeline.PromptError, match="line 2 of the prompts file .* is empty"):
        pipeline.read_prompts_file(path)
    path.write_text("a red circle\n\n")
    with pytest.raises(pipeline.PromptError, match="line 2 .* is empty"):
        pipeline.read_prompts_file(path)
    path.write_text("")
    with pytest.raises(pipeline.PromptError, match="is empty; write one prompt per line"):
        pipeline.read_prompts_file(path)
    path.write_bytes(b"\xff\xfe red")
    with pytest.raises(pipeline.PromptError, match="cannot read the prompts file"):
        pipeline.read_prompts_file(path)
    with pytest.raises(pipeline.PromptError, match="cannot read the prompts file .*missing.txt: No such file"):
        pipeline.read_prompts_file(tmp_path / "missing.txt")


def test_save_samples_writes_the_layout_and_replaces_only_its_own_output(tmp_path):
    images = np.arange(2 * 3 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 4, 3)
    scores = np.array([[0.5, 0.4, 0.1], [0.9, 0.2, 0.1]], np.float32)
    out = pipeline.save_samples(tmp_path / "out", images, scores, seed=7, prompts=["a", "b"])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0000_00.png", "0000_01.png", "0000_02.png", "0001_00.png", "0001_01.png", "0001_02.png",
                     "grid.png", "samples.json"]
    records = json.loads((out / "samples.json").read_text())
    assert records[4] == {"prompt_index": 1, "rank": 1, "prompt": "b", "seed": 7, "file": "0001_01.png",
                          "clip_score": pytest.approx(0.2)}
    np.testing.assert_array_equal(np.asarray(Image.open(out / "0001_01.png")), images[1, 1])
    assert np.asarray(Image.open(out / "grid.png")).shape == (2 * 5 + 1, 3 * 5 + 1, 3)  # a row per prompt
    pipeline.save_samples(out, images[:1], scores[:1], seed=7, prompts=["a"])  # an earlier output: replaced
    assert len(list(out.iterdir())) == 5 and not list(tmp_path.glob(".*"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not an earlier output of generate"):
        pipeline.save_samples(tmp_path / "mine", images, scores, seed=7, prompts=["a", "b"])
