"""The PatchGAN discriminator's shapes, parameter count and init against taming's, and the GAN losses' values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipgen_jax.models import discriminator as disc

LOGITS_REAL = jnp.array([2.0, 0.5, -1.0])
LOGITS_FAKE = jnp.array([-2.0, 0.0, 1.5])


@pytest.mark.parametrize("size, grid", [(32, 2), (256, 30)])
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_patch_grid_matches_taming(size, grid, norm):
    model = disc.NLayerDiscriminator(norm=norm)
    image = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), image)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=["batch_stats"])[0], variables, image)
    assert logits.shape == (2, grid, grid, 1) and logits.dtype == jnp.float32


def test_batch_norm_parameter_count_equals_taming():
    # taming's NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3) with BatchNorm has 2,765,633 parameters.
    image = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    params = jax.eval_shape(disc.NLayerDiscriminator(norm="batch").init, jax.random.key(0), image)["params"]
    assert sum(p.size for p in jax.tree.leaves(params)) == 2_765_633


def test_init_follows_taming():
    params = disc.NLayerDiscriminator(ndf=32).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    kernel = np.asarray(params["conv_3"]["kernel"])
    assert kernel.std() == pytest.approx(0.02, rel=0.01) and abs(kernel.mean()) < 1e-3
    scale = np.asarray(params["norm_3"]["scale"])
    assert scale.mean() == pytest.approx(1.0, abs=0.005) and scale.std() == pytest.approx(0.02, rel=0.2)
    assert not np.any(np.asarray(params["norm_3"]["bias"]))
    assert "bias" not in params["conv_3"] and "bias" in params["conv_4"]


def test_forward_runs_in_each_norm_and_dtype():
    x_BHWC = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
    for norm in ("batch", "group", "none"):
        model = disc.NLayerDiscriminator(ndf=8, norm=norm, dtype=jnp.bfloat16)
        variables = model.init(jax.random.key(0), x_BHWC)
        logits, updates = model.apply(variables, x_BHWC, mutable=["batch_stats"])
        assert logits.shape == (2, 2, 2, 1) and logits.dtype == jnp.float32
        assert np.all(np.isfinite(logits))
        assert bool(updates) == (norm == "batch")


def test_batch_norm_uses_running_averages_outside_training():
    model = disc.NLayerDiscriminator(ndf=8, norm="batch")
    x_BHWC = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
    variables = model.init(jax.random.key(0), x_BHWC)
    # Without mutable batch stats, only the running-average mode can run.
    with pytest.raises(Exception, match="batch_stats"):
        model.apply(variables, x_BHWC, train=True)
    assert model.apply(variables, x_BHWC, train=False).shape == (2, 2, 2, 1)


def test_rejects_unknown_norm():
    with pytest.raises(ValueError, match="norm must be"):
        disc.NLayerDiscriminator(norm="layer").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_hinge_d_loss_value():
    # mean(relu(1 - real)) = (0 + 0.5 + 2) / 3, mean(relu(1 + fake)) = (0 + 1 + 2.5) / 3.
    assert float(disc.hinge_d_loss(LOGITS_REAL, LOGITS_FAKE)) == pytest.approx(1.0, abs=1e-6)
    assert float(disc.discriminator_loss(LOGITS_REAL, LOGITS_FAKE, "hinge")) == pytest.approx(1.0, abs=1e-6)
    # Confident and correct on every patch: no loss.
    assert float(disc.hinge_d_loss(jnp.full((4,), 3.0), jnp.full((4,), -3.0))) == 0.0


def test_vanilla_d_loss_value():
    # 0.5 * (mean(softplus(-real)) + mean(softplus(fake))).
    assert float(disc.vanilla_d_loss(LOGITS_REAL, LOGITS_FAKE)) == pytest.approx(0.7392925, abs=1e-6)
    assert float(disc.discriminator_loss(LOGITS_REAL, LOGITS_FAKE, "vanilla")) == pytest.approx(0.7392925, abs=1e-6)
    assert float(disc.vanilla_d_loss(jnp.zeros(3), jnp.zeros(3))) == pytest.approx(np.log(2), abs=1e-6)


def test_generator_loss_values():
    assert float(disc.generator_loss(LOGITS_FAKE, "hinge")) == pytest.approx(1 / 6, abs=1e-6)
    # mean(softplus(-fake)) = (softplus(2) + log 2 + softplus(-1.5)) / 3.
    assert float(disc.generator_loss(LOGITS_FAKE, "vanilla")) == pytest.approx(1.0071628, abs=1e-6)


def test_losses_reject_unknown_kind():
    with pytest.raises(ValueError, match="'hinge' or 'vanilla'"):
        disc.generator_loss(LOGITS_FAKE, "wasserstein")
    with pytest.raises(ValueError, match="'hinge' or 'vanilla'"):
        disc.discriminator_loss(LOGITS_REAL, LOGITS_FAKE, "wasserstein")


def test_adaptive_gan_weight_ratio_and_clamping():
    assert float(disc.adaptive_gan_weight(jnp.array(2.0), jnp.array(1.0))) == pytest.approx(2 / 1.0001, rel=1e-6)
    # A vanishing GAN gradient would give 5 / 1e-4 = 5e4: clamped to max_weight.
    assert float(disc.adaptive_gan_weight(jnp.array(5.0), jnp.array(0.0))) == pytest.approx(1e4)
    assert float(disc.adaptive_gan_weight(jnp.array(5.0), jnp.array(1.0), max_weight=2.0)) == 2.0
    assert float(disc.adaptive_gan_weight(jnp.array(0.0), jnp.array(1.0))) == 0.0


def test_adaptive_gan_weight_passes_no_gradient():
    grads = jax.grad(lambda r, g: disc.adaptive_gan_weight(r, g), argnums=(0, 1))(jnp.array(2.0), jnp.array(1.0))
    assert [float(g) for g in grads] == [0.0, 0.0]
