"""The VQGAN modules: quantizers (search, gradients, losses, restarts) and the encode/decode API."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipgen_jax.models import quantizers, vqgan


def small_vqgan(**overrides):
    fields = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=32, resolution=32,
                  codebook_size=64, code_dim=8)
    return vqgan.VQGAN(**{**fields, **overrides})


@pytest.mark.parametrize("chunk_rows", [4096, 7])  # one block, and many blocks with a padded remainder
def test_nearest_code_matches_brute_force(monkeypatch, chunk_rows):
    monkeypatch.setattr(quantizers, "SEARCH_CHUNK_ROWS", chunk_rows)
    z = jax.random.normal(jax.random.PRNGKey(0), (50, 8))
    codebook = jax.random.normal(jax.random.PRNGKey(1), (33, 8))
    brute = np.argmin(((np.asarray(z)[:, None, :] - np.asarray(codebook)[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(np.asarray(quantizers.nearest_code(z, codebook)), brute)


@pytest.mark.parametrize("legacy, expected", [(False, 1.0 + 0.25 * 1.0), (True, 0.25 * 1.0 + 1.0)])
def test_vq_loss_places_beta_and_gradient_is_straight_through(legacy, expected):
    quantizer = quantizers.VectorQuantizer(codebook_size=4, code_dim=2, kind="vq", beta=0.25, legacy=legacy)
    params = {"params": {"codebook": jnp.array([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]])}}
    z = jnp.array([[[1.0, 1.0]]])  # nearest code 0 at squared distance 2 -> mean over 2 dims = 1
    quantized, indices, losses = quantizer.apply(params, z)
    assert int(indices[0, 0]) == 0
    np.testing.assert_allclose(quantized, [[[0.0, 0.0]]])
    np.testing.assert_allclose(losses["codebook"], 1.0)
    np.testing.assert_allclose(losses["commitment"], 1.0)
    np.testing.assert_allclose(losses["total"], expected)
    jacobian = jax.jacobian(lambda x: quantizer.apply(params, x)[0])(z)
    np.testing.assert_allclose(jacobian.reshape(2, 2), np.eye(2))


def test_l2_quantizer_uses_unit_codes_and_cosine_neighbours():
    quantizer = quantizers.VectorQuantizer(codebook_size=3, code_dim=2, kind="l2")
    params = {"params": {"codebook": jnp.array([[5.0, 0.0], [0.0, 0.1], [-1.0, -1.0]])}}
    # By L2 distance (3, 0) is nearest to code 0 either way, but (0.1, 3) is nearest to the short code 1 only by angle.
    quantized, indices, _ = quantizer.apply(params, jnp.array([[3.0, 0.0], [0.1, 3.0]]))
    np.testing.assert_array_equal(indices, [0, 1])
    np.testing.assert_allclose(jnp.linalg.norm(quantized, axis=-1), [1.0, 1.0], rtol=1e-6)


def test_restart_replaces_only_dead_codes():
    codebook = jnp.arange(12.0).reshape(4, 3)
    z = jnp.full((5, 3), 100.0)
    restarted = quantizers.restart_dead_codes(codebook, jnp.array([1.0, 0.0, 0.5, 0.001]), z,
                                              jax.random.PRNGKey(0), threshold=0.01)
    restarted, codebook = np.asarray(restarted), np.asarray(codebook)
    np.testing.assert_array_equal(restarted[[0, 2]], codebook[[0, 2]])
    np.testing.assert_array_equal(restarted[[1, 3]], np.full((2, 3), 100.0))


def test_unknown_quantizer_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="quantizer kind 'fsq' is not one of"):
        quantizers.VectorQuantizer(4, 2, kind="fsq").init(jax.random.PRNGKey(0), jnp.zeros((1, 2)))


@pytest.mark.parametrize("encoder_attention", [True, False])
def test_encode_decode_api_is_consistent(encoder_attention):
    model = small_vqgan(quantizer="l2", encoder_attention=encoder_attention)
    images = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1, maxval=1)
    variables = model.init(jax.random.PRNGKey(1), images)
    attention_blocks = {tower: sorted(name for name in variables["params"][tower] if "attn" in name)
                        for tower in ("encoder", "decoder")}
    # attn_resolutions=(8,): the encoder's last level (one block) and the decoder's first (two), plus the middles.
    assert attention_blocks == {
        "encoder": ["down_2_attn_0", "mid_attn_1"] if encoder_attention else [],
        "decoder": ["mid_attn_1", "up_2_attn_0", "up_2_attn_1"]}
    reconstruction, indices, _, _ = model.apply(variables, images)
    tokens = model.apply(variables, images, method=model.encode)
    assert tokens.shape == (2, 8, 8) and tokens.dtype == jnp.int32
    np.testing.assert_array_equal(tokens, indices)
    decoded = model.apply(variables, tokens, method=model.decode)
    np.testing.assert_allclose(decoded, reconstruction, atol=1e-5)
    # Soft one-hots through the codebook (the prior's differentiable path) give the same images for hard one-hots.
    one_hot = jax.nn.one_hot(tokens, model.codebook_size)
    codebook = model.apply(variables, method=model.codebook)
    np.testing.assert_allclose(model.apply(variables, one_hot @ codebook, method=model.decode_codes), decoded,
                               atol=1e-5)


def test_paper_f16_preset_shapes():
    model = vqgan.VQGAN()  # defaults are the paper's imagenet_f16_16384 tokenizer
    images = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    tokens = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.encode), variables, images)
    assert tokens.shape == (1, 16, 16)
    assert variables["params"]["quantize"]["codebook"].shape == (16384, 256)
    num_params = sum(np.prod(x.shape) for x in jax.tree.leaves(variables))
    assert 60e6 < num_params < 90e6  # encoder + decoder + codebook of taming's f16 model (~72M)


def test_bypass_passes_latents_through_but_still_reports_codes():
    quantizer = quantizers.VectorQuantizer(codebook_size=4, code_dim=2, kind="l2")
    params = quantizer.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)))
    z = jnp.array([[3.0, 4.0]])
    passed, indices, losses = quantizer.apply(params, z, True)
    np.testing.assert_allclose(passed, [[0.6, 0.8]], rtol=1e-6)  # l2-normalised, not snapped to a code
    snapped, same_indices, _ = quantizer.apply(params, z, False)
    np.testing.assert_array_equal(indices, same_indices)
    codebook = quantizer.apply(params, method=quantizer.code_vectors)
    np.testing.assert_allclose(snapped, codebook[indices], rtol=1e-6)
    assert float(losses["codebook"]) > 0.0
