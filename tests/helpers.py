"""Helpers shared by the test modules (tests/ is on sys.path): tiny random models and bundles, restoring a
checkpointed train state, comparing precomputed datasets, and the ranked-generation contract."""

import json
import pathlib

import jax
import numpy as np
import transformers
from array_record.python import array_record_module

from clipgen_jax import checkpointing, parallel, pipeline, training
from clipgen_jax.data import precomputed
from clipgen_jax.models import clip, clip_tokenizer, vqgan
from clipgen_jax.models import prior as prior_lib

CONTEXT_LENGTH = 16


def small_clip_config() -> transformers.CLIPConfig:
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=clip_tokenizer.VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=CONTEXT_LENGTH,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16)


def save_vqgan(path: pathlib.Path, seed: int) -> pathlib.Path:
    """The tiny VQGAN preset (32 px, 16 x 16 tokens of 64 codes), random weights from `seed`, as a bundle."""
    model_config = training.load_config("configs/vqgan.py:tiny").model.to_dict()
    params = vqgan.init_params(vqgan.from_config(model_config), jax.random.PRNGKey(seed))
    return checkpointing.save_bundle(path, params, {"kind": "vqgan", "model": model_config})


def tiny_models(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A tiny random VQGAN bundle and a tiny random CLIP directory (16-d embeddings, 16-token context)."""
    save_vqgan(root / "vqgan", seed=0)
    model = transformers.FlaxCLIPModel(small_clip_config(), seed=0)
    clip.export(model, model.params, clip_tokenizer.openai_tokenizer(CONTEXT_LENGTH), clip.Preprocessing(32, 32),
                root / "clip")
    return root / "vqgan", root / "clip"


def tiny_prior_config(vqgan_path, clip_path):
    config = training.load_config("configs/prior.py:tiny")
    config.vqgan, config.clip = str(vqgan_path), str(clip_path)
    return config


def save_prior_bundle(path: pathlib.Path, vqgan_path, clip_path, seed: int = 0, **cond) -> pathlib.Path:
    """A random-weight tiny prior exported like a finished run, with the identities of the two models."""
    config = tiny_prior_config(vqgan_path, clip_path)
    config.cond.update(cond)
    model = prior_lib.from_config(config.model)
    params = prior_lib.init_params(model, jax.random.PRNGKey(seed))
    vqgan_model, vqgan_params, vqgan_metadata = checkpointing.load_vqgan(vqgan_path)
    identities = {"vqgan": precomputed.vqgan_identity(vqgan_path, vqgan_params, vqgan_metadata["model"]),
                  "clip": precomputed.clip_identity(clip.load(clip_path))}
    metadata = pipeline.prior_metadata(config.to_dict(), vqgan_path=vqgan_path, step=0, identities=identities,
                                       bundle_dir=path)
    return checkpointing.save_bundle(path, params, metadata)


PROMPTS = ["a small red circle in the top left on a black background", "a large blue square in the center"]


def check_ranked_generation(generate, clip_model, atol: float):
    """The generate contract shared by Pipeline and VQGANCLIP, on PROMPTS with 3 candidates: `generate(keep, seed)`
    returns uint8 images and float32 scores, best first; keep=2 is the first two of the same three candidates; the
    scores are the CLIP similarity of each returned uint8 image and its prompt; the candidates differ. Returns
    (images kept 2, scores kept 2, all images, all scores) of seed 0."""
    all_images, all_scores = generate(keep=3, seed=0)
    images, scores = generate(keep=2, seed=0)
    assert images.shape == (2, 2, 32, 32, 3) and images.dtype == np.uint8
    assert scores.shape == (2, 2) and scores.dtype == np.float32
    assert np.all(np.diff(all_scores, axis=1) <= 0)  # best first
    np.testing.assert_array_equal(images, all_images[:, :2])
    np.testing.assert_array_equal(scores, all_scores[:, :2])
    image_emb = clip_model.embed_images(all_images.reshape(-1, 32, 32, 3).astype(np.float32) / 127.5 - 1.0)
    expected = np.einsum("pkd,pd->pk", image_emb.reshape(2, 3, -1), clip_model.embed_texts(PROMPTS))
    np.testing.assert_allclose(all_scores, expected, atol=atol)
    assert len({image.tobytes() for image in all_images.reshape(-1, 32, 32, 3)}) == 6  # distinct candidates
    return images, scores, all_images, all_scores


def checkpointed_state(workdir, step, stage):
    """`stage`'s train state saved in `workdir` at `step`."""
    abstract = jax.eval_shape(stage.init_state, jax.random.PRNGKey(0))
    # Restored onto this process's single device, whatever topology wrote the checkpoint.
    abstract = checkpointing.abstract_with_shardings(abstract, parallel.state_shardings(abstract, parallel.make_mesh()))
    checkpointer = checkpointing.Checkpointer(workdir / "checkpoints")
    try:
        return checkpointer.restore(step, abstract)[0]
    finally:
        checkpointer.close()


def dataset_files(directory: pathlib.Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


def dataset_records(path: pathlib.Path) -> list[bytes]:
    reader = array_record_module.ArrayRecordReader(str(path))
    try:
        return list(reader.read_all())
    finally:
        reader.close()


def assert_same_dataset(directory: pathlib.Path, expected: pathlib.Path) -> None:
    """Every record of every shard, and every file (shards, plan, metadata, TFDS info), equal byte for byte."""
    files, expected_files = dataset_files(directory), dataset_files(expected)
    assert sorted(files) == sorted(expected_files)
    shards = [name for name in files if ".array_record-" in name]
    assert len(shards) == 7  # validation 128 / 40 -> 4 shards, heldout 96 / 40 -> 3
    for name in shards:
        assert dataset_records(directory / name) == dataset_records(expected / name)
    for name in files:
        assert files[name] == expected_files[name], name


def check_two_prompts_two_kept(out: pathlib.Path) -> list[dict]:
    """The docs/SHAPES.md layout for PROMPTS with keep=2 and seed 3; returns samples.json's records."""
    assert sorted(p.name for p in out.iterdir()) == ["0000_00.png", "0000_01.png", "0001_00.png", "0001_01.png",
                                                     "grid.png", "samples.json"]
    records = json.loads((out / "samples.json").read_text())
    assert [(r["prompt_index"], r["rank"], r["prompt"], r["seed"], r["file"]) for r in records] == [
        (0, 0, PROMPTS[0], 3, "0000_00.png"), (0, 1, PROMPTS[0], 3, "0000_01.png"),
        (1, 0, PROMPTS[1], 3, "0001_00.png"), (1, 1, PROMPTS[1], 3, "0001_01.png")]
    return records
