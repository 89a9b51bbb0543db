"""Image metrics against references with known answers."""

import numpy as np
import pytest

from clipgen_jax.data import shapes
from clipgen_jax.evaluation import image_metrics, reconstruction


def test_psnr_known_value():
    images = np.zeros((1, 4, 4, 3), np.float32)  # 0 in [-1, 1] is 0.5 in [0, 1]
    noisy = images + 0.2  # 0.1 in [0, 1]: MSE 0.01 -> 20 dB
    np.testing.assert_allclose(image_metrics.psnr(noisy, images), [20.0], rtol=1e-5)


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    noisy = np.clip(images + rng.normal(0, 0.2, images.shape), -1, 1).astype(np.float32)
    expected = [metrics.structural_similarity((a + 1) / 2, (b + 1) / 2, gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False, data_range=1.0, channel_axis=-1)
                for a, b in zip(noisy, images)]
    np.testing.assert_allclose(image_metrics.ssim(noisy, images), expected, rtol=1e-4)
    np.testing.assert_allclose(image_metrics.ssim(images, images), [1.0] * 3, rtol=1e-6)


def test_code_statistics():
    stats = image_metrics.code_statistics(np.array([5, 5, 0, 0]))
    assert stats == {"codebook_usage": 0.5, "perplexity": pytest.approx(2.0)}


def test_to_uint8_rounds_like_a_saved_png():
    np.testing.assert_array_equal(image_metrics.to_uint8(np.array([-1.0, -2.0, 0.0, 1.0, 3.0])),
                                  [0, 0, 128, 255, 255])


def shapes_batch(n=24, seed=0):
    rng = np.random.default_rng(seed)
    combos = shapes.training_combinations()[:n]
    images_u8 = np.stack([shapes.render(c, 32, rng) for c in combos])
    return {"image": images_u8 / 127.5 - 1.0}


def test_identity_reconstruction_agrees_everywhere_and_blank_agrees_nowhere():
    batch = shapes_batch()
    perfect = reconstruction.evaluate(lambda x: (x, np.zeros((len(x), 2, 2), np.int32)), [batch],
                                      shapes_oracle=True, codebook_size=4)
    assert perfect["num_images"] == 24
    assert perfect["oracle_agreement/all"] == 1.0 and perfect["ssim"] == pytest.approx(1.0)
    assert perfect["psnr"] == pytest.approx(100.0)  # MSE floored at 1e-10
    assert perfect["codebook_usage"] == 0.25 and perfect["perplexity"] == pytest.approx(1.0)
    assert perfect["background_exact"] == 1.0 and perfect["oracle_agreement_background_snapped/all"] == 1.0
    assert perfect["background_codes"] == 1  # every token is code 0
    blank = reconstruction.evaluate(lambda x: (np.zeros_like(x), None), [batch], shapes_oracle=True)
    assert blank["oracle_agreement/all"] == 0.0  # "no object" is wrong on every attribute


def test_a_reconstruction_between_two_shapes_disagrees_on_shape_in_the_strict_reading():
    squares = [shapes.Attributes(1, colour, 0, 4, 1) for colour in range(4)]  # small squares in the center, on white
    inputs_u8 = np.stack([shapes.render_at(a, 32, shapes.cell_centre(4, 32)) for a in squares])
    circles_u8 = np.stack([shapes.render_at(a._replace(shape=0), 32, shapes.cell_centre(4, 32)) for a in squares])
    blends_u8 = np.rint(0.6 * inputs_u8 + 0.4 * circles_u8).astype(np.uint8)  # a rounded square: read square, narrowly
    scores = reconstruction.evaluate(lambda x: (blends_u8 / 127.5 - 1.0, None), [{"image": inputs_u8 / 127.5 - 1.0}],
                                     shapes_oracle=True)
    assert scores["oracle_agreement/shape"] == scores["oracle_agreement/all"] == 0.0
    assert scores["oracle_agreement/lenient_shape"] == scores["oracle_agreement/lenient_all"] == 1.0
    assert scores["oracle_agreement/colour"] == scores["oracle_agreement/position"] == 1.0
    assert scores["inputs_margin_below_min"] == 0.0 and scores["inputs_margin_p10"] >= shapes.MIN_SHAPE_MARGIN
    assert scores["reconstructions_margin_below_min"] == 1.0
    assert scores["reconstructions_margin_median"] < shapes.MIN_SHAPE_MARGIN < scores["inputs_margin_median"]


def _background_shifted(images_u8, per_channel):
    """Every background pixel moved `per_channel` levels towards mid-gray (white down, black and gray up)."""
    background = np.stack([shapes.border_median(image) for image in images_u8])[:, None, None, :]
    is_background = np.all(images_u8 == background, axis=-1, keepdims=True)
    shifted = background + np.where(background > 128, -per_channel, per_channel)
    return np.where(is_background, shifted, images_u8).astype(np.uint8)


def test_background_diagnostics_snap_faint_noise_only():
    inputs_u8 = image_metrics.to_uint8(shapes_batch()["image"])
    # 3 levels per channel (L1 9 <= BACKGROUND_SNAP_L1) snap back; 5 (L1 15) do not.
    exact, snapped = reconstruction.background_diagnostics(inputs_u8, _background_shifted(inputs_u8, 3))
    np.testing.assert_array_equal(exact, 0.0)
    assert snapped.all()
    far = _background_shifted(inputs_u8, 5)
    exact, snapped = reconstruction.background_diagnostics(inputs_u8, far)
    np.testing.assert_array_equal(snapped, reconstruction.oracle_agreement(inputs_u8, far))
    exact, _ = reconstruction.background_diagnostics(inputs_u8, inputs_u8)
    np.testing.assert_array_equal(exact, 1.0)


def test_background_token_codes_are_those_of_all_background_patches():
    images_u8 = np.zeros((2, 8, 8, 3), np.uint8)  # black backgrounds, 2 x 2 grids of 4 x 4 patches
    images_u8[0, 1, 6] = 255  # one pixel of an object in image 0's top-right patch
    images_u8[1] = 128
    images_u8[1, 4:, :4] = (40, 80, 220)  # image 1: its bottom-left patch is all object
    tokens = np.array([[[1, 2], [3, 4]], [[5, 6], [7, 8]]])
    np.testing.assert_array_equal(np.sort(reconstruction.background_token_codes(images_u8, tokens)),
                                  [1, 3, 4, 5, 6, 8])
