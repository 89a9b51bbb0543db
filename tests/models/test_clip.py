"""The CLIP adapter: OpenAI's tokenizer offline, preprocessing equal to CLIPImageProcessor, loading and embedding."""

import json
import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from clipgen_jax.data import shapes
from clipgen_jax.models import clip, clip_tokenizer
from clipgen_jax.training import clip as clip_training


def _small_config(image_size: int = 32) -> transformers.CLIPConfig:
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=clip_tokenizer.VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16)


@pytest.fixture(scope="module")
def small_clip_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip")
    model = transformers.FlaxCLIPModel(_small_config(), seed=0)
    clip.export(model, model.params, clip_tokenizer.openai_tokenizer(16), clip.Preprocessing(32, 32), directory)
    return directory


def test_tokenizer_reproduces_openai_ids():
    tokenizer = clip_tokenizer.openai_tokenizer()
    assert len(tokenizer) == clip_tokenizer.VOCAB_SIZE
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    slow = transformers.CLIPTokenizer.from_pretrained(clip_tokenizer.cache_dir())
    text = "A Small RED circle, in the top-left; naïve café 42!"
    assert slow(text).input_ids == tokenizer(text).input_ids


def test_tokenizer_files_build_into_a_fresh_directory(tmp_path):
    clip_tokenizer.build_tokenizer_files(str(tmp_path))
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407 and vocab["cat</w>"] == 2368


def _photographs(count: int = 3) -> list[np.ndarray]:
    skimage_data = pytest.importorskip("skimage.data")
    return [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea()][:count]


@pytest.mark.parametrize("source", ["photographs", "shapes"])
def test_preprocessing_equals_clip_image_processor(source):
    """ViT-B/32's processor (shortest edge 224, bicubic, center crop 224) on photographs of several aspect ratios and
    on 32 px Shapes renders (upsampled)."""
    if source == "photographs":
        pictures = _photographs()
    else:
        rng = np.random.default_rng(0)
        pictures = [shapes.render(c, 32, rng) for c in shapes.training_combinations()[:4]]
    processor = clip.Preprocessing(shortest_edge=224, crop_size=224).to_processor()
    preprocessing = clip.Preprocessing.from_processor(processor)
    for picture in pictures:
        expected = processor(images=[picture], return_tensors="np").pixel_values
        actual = np.asarray(preprocessing(jnp.asarray(picture[None] / 127.5 - 1.0)))
        assert actual.shape == expected.shape == (1, 3, 224, 224)
        # One grey level is 1 / (255 * std) ~ 0.015; rounding ties in PIL's fixed point allow that much.
        assert np.abs(actual - expected).max() < 0.016
        assert np.mean(np.abs(actual - expected) > 1e-4) < 0.01


def test_preprocessed_embeddings_agree_with_processor(small_clip_dir):
    loaded = clip.load(small_clip_dir)
    processor = transformers.CLIPImageProcessor.from_pretrained(small_clip_dir)
    pictures = _photographs()
    ours = np.concatenate([loaded.embed_images(p[None] / 127.5 - 1.0) for p in pictures])
    pixels = np.concatenate([processor(images=[p], return_tensors="np").pixel_values for p in pictures])
    theirs = np.array(loaded.model.get_image_features(pixels, params=loaded.params))
    theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
    assert np.min(np.sum(ours * theirs, axis=1)) > 0.999


def test_openai_vit_b32_config_embeds_on_cpu():
    config = clip.openai_vit_b32_config()
    model = transformers.FlaxCLIPModel(config, seed=0)
    loaded = clip.CLIP(model=model, params=model.params, tokenizer=clip_tokenizer.openai_tokenizer(),
                       preprocessing=clip.Preprocessing(224, 224), name="vit-b32-random")
    image_emb = loaded.embed_images(np.zeros((2, 256, 320, 3), np.float32))
    text_emb = loaded.embed_texts(["a photo of a cat", "a small red circle"])
    assert image_emb.shape == text_emb.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1.0, rtol=1e-5)


def test_safetensors_in_pytorch_naming_load_without_torch(small_clip_dir):
    """The export is PyTorch-named safetensors; a Python where `import torch` fails must still load it."""
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from clipgen_jax.models import clip\n"
        f"c = clip.load({str(small_clip_dir)!r})\n"
        "print(c.embed_texts(['a red circle']).shape)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(1, 16)" in result.stdout
    with open(small_clip_dir / "model.safetensors", "rb") as f:
        header = f.read(8 + int.from_bytes(f.read(8), "little"))
    assert b"text_model.encoder.layers.0.self_attn.q_proj.weight" in header


def test_load_round_trip_is_exact(small_clip_dir):
    model = transformers.FlaxCLIPModel(_small_config(), seed=0)
    loaded = clip.load(small_clip_dir)
    for (path, expected), actual in zip(jax.tree_util.tree_leaves_with_path(model.params),
                                        jax.tree_util.tree_leaves(loaded.params)):
        np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected), err_msg=jax.tree_util.keystr(path))
    assert len(loaded.weights_hash()) == 64


def test_float16_export_halves_the_weights(tmp_path, small_clip_dir):
    loaded = clip.load(small_clip_dir)
    loaded.save(tmp_path, dtype="float16")
    half = clip.load(tmp_path)
    ratio = (tmp_path / "model.safetensors").stat().st_size / (small_clip_dir / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55
    texts = ["a small red circle in the top left on a black background"]
    assert float(np.sum(half.embed_texts(texts) * loaded.embed_texts(texts))) > 0.999


def test_prompts_empty_and_too_long(small_clip_dir, caplog):
    loaded = clip.load(small_clip_dir)
    with pytest.raises(ValueError, match="empty"):
        loaded.embed_texts(["a red circle", "  "])
    with caplog.at_level(logging.WARNING):
        ids, mask = loaded.tokenize(["red " * 40])
    assert "truncated" in caplog.text
    assert ids.shape == (1, 16) and ids[0, -1] == 49407 and mask.sum() == 16


def test_missing_and_malformed_models_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(clip.ClipNotFoundError, match="does not exist"):
        clip.load(str(tmp_path / "nowhere" / "clip"))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(clip.ClipNotFoundError, match="needs torch"):
        clip.load(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    with pytest.raises(clip.ClipNotFoundError, match="huggingface-cli download"):
        clip.load("openai/clip-vit-base-patch32")


def test_differentiable_image_path(small_clip_dir):
    loaded = clip.load(small_clip_dir)
    target = loaded.embed_texts(["a small red circle in the top left on a black background"])[0]
    images = jnp.zeros((1, 48, 40, 3))

    def similarity(x):
        return jnp.sum(loaded.image_features(loaded.params, x, round_to_uint8=False)[0] * target)

    grad = jax.grad(similarity)(images)
    assert grad.shape == images.shape and float(jnp.abs(grad).max()) > 0


def test_model_config_matches_openai_vit_b32():
    """configs/clip.py's defaults describe ViT-B/32 (what the vit_b32 preset trains)."""
    ours = clip_training.clip_config(clip_training.default_model_config()).to_dict()
    reference = clip.openai_vit_b32_config().to_dict()
    for tower in ("text_config", "vision_config"):
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
                    "vocab_size", "max_position_embeddings", "image_size", "patch_size"):
            if key in reference[tower]:
                assert ours[tower][key] == reference[tower][key], (tower, key)
    assert ours["projection_dim"] == reference["projection_dim"]


def test_export_loads_into_pytorch_clip_with_equal_embeddings(small_clip_dir):
    torch = pytest.importorskip("torch")
    torch_model = transformers.CLIPModel.from_pretrained(small_clip_dir).eval()
    loaded = clip.load(small_clip_dir)
    text = ["a small red circle in the top left on a black background"]
    ids, mask = loaded.tokenize(text)
    pixels = np.asarray(loaded.preprocessing(jnp.asarray(_photographs(1)[0][None] / 127.5 - 1.0)))
    with torch.no_grad():
        text_pt = torch_model.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                                attention_mask=torch.from_numpy(mask).long()).numpy()
        image_pt = torch_model.get_image_features(pixel_values=torch.from_numpy(np.array(pixels))).numpy()
    np.testing.assert_allclose(np.asarray(loaded.model.get_text_features(ids, mask, params=loaded.params)), text_pt,
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(loaded.model.get_image_features(pixels, params=loaded.params)), image_pt,
                               atol=1e-4)
