"""The VQGAN stage: its jitted step (adaptive GAN weight, restarts, EMA), a tiny run on Shapes, export and reload."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipgen_jax import checkpointing, training
from clipgen_jax.training import vqgan as vqgan_training


def tiny_config(data_dir=None):
    config = training.load_config("configs/vqgan.py:tiny")
    if data_dir is not None:
        config.data.data_dir = str(data_dir)
    return config


def random_batch(size=32, n=4, seed=0):
    return {"image": jax.random.uniform(jax.random.PRNGKey(seed), (n, size, size, 3), minval=-1.0, maxval=1.0)}


def test_adaptive_weight_equals_ratio_of_full_last_layer_gradients():
    config = tiny_config()
    config.loss.disc_start = 0
    stage = vqgan_training.VQGANStage(config)
    state = stage.init_state(jax.random.PRNGKey(0))
    images = random_batch()["image"]

    def last_layer_grad(loss_of_reconstruction):
        def loss(params):
            reconstruction = stage.model.apply({"params": params}, images)[0]
            return loss_of_reconstruction(reconstruction)
        return jax.grad(loss)(state.params)["decoder"]["conv_out"]["kernel"]

    def gan_loss(r):
        logits = stage.discriminator.apply({"params": state.disc_params}, r)
        return -jnp.mean(logits)

    rec_grad = last_layer_grad(lambda r: stage._reconstruction_loss(images, r)[0])
    gan_grad = last_layer_grad(gan_loss)
    expected = jnp.linalg.norm(rec_grad) / (jnp.linalg.norm(gan_grad) + 1e-4)

    _, metrics = jax.jit(stage.train_step)(state, {"image": images})
    np.testing.assert_allclose(metrics["adaptive_weight"], expected, rtol=1e-4)


def test_step_restarts_dead_codes_and_tracks_ema():
    config = tiny_config()
    config.quantizer.update(restart_every=1, restart_threshold=1e9)  # every code counts as dead
    stage = vqgan_training.VQGANStage(config)
    state = stage.init_state(jax.random.PRNGKey(0))
    new_state, metrics = jax.jit(stage.train_step)(state, random_batch())
    old_codebook = state.params["quantize"]["codebook"]
    new_codebook = new_state.params["quantize"]["codebook"]
    # Every code was re-seeded from the batch's encoder outputs (4 images x 16 positions): far from the tiny init.
    assert float(jnp.min(jnp.linalg.norm(new_codebook - old_codebook, axis=-1))) > 1e-2
    assert np.all(np.asarray(new_state.code_usage) == 1.0)
    ema = jax.tree.leaves(new_state.ema_params)[0]
    before, after = jax.tree.leaves(state.params)[0], jax.tree.leaves(new_state.params)[0]
    np.testing.assert_allclose(ema, 0.9 * before + 0.1 * after, rtol=1e-5, atol=1e-7)
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_image_size_the_preset_cannot_take_is_a_clear_error():
    config = tiny_config()
    config.data.image_size = 64
    with pytest.raises(ValueError, match="data.image_size=64 but this VQGAN preset is built for 32 px images"):
        vqgan_training.VQGANStage(config)


def test_tiny_run_exports_a_bundle_that_reloads(shapes_data_dir, tmp_path):
    config = tiny_config(shapes_data_dir)
    state = training.train(config, tmp_path)
    assert int(state.step) == config.train.steps
    model, params, metadata = checkpointing.load_vqgan(tmp_path)
    assert metadata["kind"] == "vqgan" and metadata["step"] == config.train.steps
    for exported, ema in zip(jax.tree.leaves(params), jax.tree.leaves(state.ema_params), strict=True):
        np.testing.assert_array_equal(np.asarray(exported), np.asarray(ema))
    tokens = model.apply({"params": params}, random_batch()["image"], method=model.encode)
    assert tokens.shape == (4, 16, 16)
    assert int(tokens.max()) < config.model.codebook_size


def test_perceptual_loss_without_weights_names_the_fetch_command(tmp_path):
    config = tiny_config()
    config.loss.update(perceptual_weight=1.0, lpips_weights=str(tmp_path / "missing.npz"))
    with pytest.raises(FileNotFoundError, match="python -m clipgen_jax.models.lpips --fetch"):
        vqgan_training.VQGANStage(config)


def test_perceptual_loss_with_the_shipped_weights_trains():
    from clipgen_jax.models import lpips

    if not lpips.default_weights_path().is_file():
        pytest.skip(f"LPIPS weights absent; create them with {lpips.FETCH_COMMAND}")
    config = tiny_config()
    config.loss.perceptual_weight = 1.0
    stage = vqgan_training.VQGANStage(config)
    state = stage.init_state(jax.random.PRNGKey(0))
    _, metrics = jax.jit(stage.train_step)(state, random_batch())
    assert 0.0 < float(metrics["perceptual"]) < 2.0
    assert np.isfinite(float(metrics["loss"]))


def test_continuous_warmup_decodes_latents_then_seeds_every_code():
    config = tiny_config()
    config.quantizer.update(continuous_warmup_steps=2, restart_dead_codes=False)
    stage = vqgan_training.VQGANStage(config)
    step = jax.jit(stage.train_step)
    state = stage.init_state(jax.random.PRNGKey(0))
    first, _ = step(state, random_batch(seed=1))
    # Step 1 of 2 is continuous: only the codebook loss moves the codes (no re-seeding yet).
    assert float(jnp.max(jnp.abs(first.params["quantize"]["codebook"] - state.params["quantize"]["codebook"]))) < 0.1
    second, _ = step(first, random_batch(seed=2))
    # The warm-up's last step re-seeds every code from encoder outputs.
    moved = jnp.linalg.norm(second.params["quantize"]["codebook"] - first.params["quantize"]["codebook"], axis=-1)
    assert float(jnp.min(moved)) > 0.1


def test_foreground_weights_lift_the_object_and_its_outline_only():
    image = np.zeros((1, 12, 12, 3), np.float32) - 1.0  # black background in [-1, 1]
    image[0, 4:7, 5:8] = [1.0, -1.0, -1.0]  # a 3 x 3 red square: L1 distance 2 of 6 -> 1/3 after / 2 and the mean
    weights = np.asarray(vqgan_training.foreground_weights(jnp.asarray(image), strength=9.0))[0, :, :, 0]
    expected = np.ones((12, 12))
    expected[3:8, 4:9] = 1.0 + 9.0 / 3.0  # the square dilated by one pixel
    np.testing.assert_allclose(weights, expected, rtol=1e-6)


def test_image_gradient_loss_sees_a_blurred_edge_that_a_constant_offset_hides():
    image = np.zeros((1, 4, 4, 1), np.float32)
    image[0, :, 2:] = 1.0  # a vertical edge between columns 1 and 2
    offset = image + 0.5  # every pixel wrong by 0.5, every difference right
    assert float(vqgan_training._image_gradient_l1(jnp.asarray(image), jnp.asarray(offset))) == 0.0
    blurred = image.copy()
    blurred[0, :, 1] = 0.5  # the edge spread over two columns
    # Horizontal differences per row: image (0, 1, 0), blurred (0.5, 0.5, 0): errors summing to 1 in each of 4 rows,
    # over 12 differences; the vertical differences are all 0 in both.
    np.testing.assert_allclose(vqgan_training._image_gradient_l1(jnp.asarray(image), jnp.asarray(blurred)), 4.0 / 12,
                               rtol=1e-6)
