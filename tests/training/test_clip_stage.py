"""The CLIP stage: captions in the pipeline, the contrastive loss, a tiny run that exports a loadable CLIP."""

import json
import re

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from clipgen_jax import training
from clipgen_jax.data import captions, images, shapes
from clipgen_jax.evaluation import clip_scores
from clipgen_jax.models import clip, clip_tokenizer
from clipgen_jax.training import clip as clip_training


def test_hard_negatives_are_one_attribute_away_and_never_held_out():
    rng = np.random.default_rng(0)
    for attrs in shapes.training_combinations()[::7]:
        negatives = shapes.hard_negative_combinations(attrs, 4, rng)
        assert len(set(negatives)) == 4
        for negative in negatives:
            assert not shapes.is_heldout(negative)
            assert sum(a != b for a, b in zip(attrs, negative)) == 1


def test_hard_negative_attribute_weights():
    rng = np.random.default_rng(0)
    attrs = shapes.training_combinations()[0]
    changed = [next(i for i, (a, b) in enumerate(zip(attrs, n)) if a != b)
               for _ in range(200) for n in shapes.hard_negative_combinations(attrs, 1, rng, [0, 0, 0, 1, 0])]
    assert set(changed) == {shapes.ATTRIBUTE_NAMES.index("position")}
    with pytest.raises(ValueError, match="hard negatives requested"):
        shapes.hard_negative_combinations(attrs, 9, rng, [0, 0, 0, 1, 0])


def test_random_captions_share_one_wording():
    rng = np.random.default_rng(3)
    attrs = shapes.Attributes(0, 0, 0, 4, 2)  # circle, red, small, center, gray: both have synonyms
    other = attrs._replace(colour=1)
    for _ in range(50):
        first, second = shapes.random_captions([attrs, other], rng)
        assert re.sub(r"\bred\b", "green", first) == second


def _tiny_config(shapes_data_dir, **overrides) -> ml_collections.ConfigDict:
    config = training.load_config("configs/clip.py:tiny")
    config.data.data_dir = str(shapes_data_dir)
    for key, value in overrides.items():
        config[key] = value
    return config


def test_caption_batches_are_tokenized(shapes_data_dir):
    config = _tiny_config(shapes_data_dir)
    tokenizer = clip_tokenizer.openai_tokenizer(24)
    iterator = captions.make_batch_iterator(config.data, config.captions, tokenizer, 24, split="train",
                                            batch_size=4, seed=0)
    batch = next(iterator)
    assert batch["input_ids"].shape == (4, 24) and batch["input_ids"].dtype == np.int32
    assert batch["hard_negative_ids"].shape == (4, 2, 24)
    assert (batch["input_ids"][:, 0] == 49406).all()
    decoded = tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    labels = shapes.Attributes(*(int(batch[name][0]) for name in shapes.ATTRIBUTE_NAMES))
    colour = shapes.COLOURS[labels.colour]
    assert colour in decoded  # the caption describes the image's own labels
    iterator.close()


def test_sidecar_captions_and_missing_ones_are_skipped(tmp_path):
    for index, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{index}.png")
        if index != 1:
            (tmp_path / f"{index}.txt").write_text(f"a {colour} picture\n")
    data_config = images.default_data_config()
    data_config.update(source="folder", folder=str(tmp_path), validation_fraction=0.0, image_size=16)
    caption_config = captions.default_caption_config()
    iterator = captions.make_batch_iterator(data_config, caption_config, clip_tokenizer.openai_tokenizer(16), 16,
                                            split="train", batch_size=8, seed=0, shuffle=False, num_epochs=1)
    batch = next(iterator)
    assert list(batch["caption"]) == ["a red picture", "a green picture"] and iterator.num_skipped == 1
    caption_config.hard_negatives = 2
    with pytest.raises(ValueError, match="hard_negatives"):
        captions.resolve_source(data_config, caption_config)


def test_contrastive_loss_values():
    eye = jnp.eye(4)
    loss, accuracy = clip_training.contrastive_loss(eye, eye, jnp.log(2.0))
    expected = -np.log(np.exp(2) / (np.exp(2) + 3))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(accuracy) == 1.0
    # A hard negative identical to the positive caption halves that image's probability.
    hard = eye[:, None, :]
    loss_hard, _ = clip_training.contrastive_loss(eye, eye, jnp.log(2.0), hard)
    expected_i2t = -np.log(np.exp(2) / (2 * np.exp(2) + 3))
    np.testing.assert_allclose(float(loss_hard), (expected + expected_i2t) / 2, rtol=1e-5)


def test_tiny_run_exports_a_loadable_clip(tmp_path, shapes_data_dir):
    config = _tiny_config(shapes_data_dir)
    workdir = tmp_path / "clip"
    training.train(config, str(workdir))
    export = workdir / "export"
    assert (export / "model.safetensors").is_file() and (export / "vocab.json").is_file()
    metadata = json.loads((export / "clipgen_metadata.json").read_text())
    assert metadata["steps"] == 6 and 0.0 <= metadata["shapes_scores"]["shapes/zero_shot_colour"] <= 1.0
    loaded = clip.load(export)
    assert loaded.preprocessing.crop_size == 32 and loaded.context_length == 24
    embedding = loaded.embed_texts(["a small red circle in the top left on a black background"])
    assert embedding.shape == (1, 16)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/shapes/text_to_image_top1" in r for r in records)
    assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)


def test_shapes_scores_of_an_oracle_embedding():
    """The scoring itself: embeddings that are one-hot per combination score 100%; shuffled ones do not."""
    combinations = shapes.all_combinations()
    caption_emb = np.eye(len(combinations), dtype=np.float32)
    heldout = shapes.heldout_combinations() * 2
    labels = np.asarray(heldout, np.int64)
    image_emb = caption_emb[[combinations.index(c) for c in heldout]]
    perfect = clip_scores.shapes_zero_shot(image_emb, labels, caption_emb)
    assert all(perfect[f"zero_shot_{name}"] == 1.0 for name in shapes.ATTRIBUTE_NAMES)
    shuffled = clip_scores.shapes_zero_shot(image_emb, np.roll(labels, 1, axis=0), caption_emb)
    assert shuffled["zero_shot_mean"] < 0.9
    hits = clip_scores.top_k_hits(np.array([[0.1, 0.9, 0.5], [0.9, 0.1, 0.5]]),
                                  np.array([[True, False, False], [True, False, False]]), ks=(1, 2))
    assert hits == {1: 0.5, 2: 0.5}
