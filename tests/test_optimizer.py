"""clipgen_jax.optimizer: the schedules, Adam or AdamW with optional clipping, the fields every stage config has,
and the one-line refusal of a config without them."""

import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest

from clipgen_jax import optimizer, training

STAGE_PRESETS = {"autoencoder": ("shapes", "tiny"), "vqgan": ("shapes", "imagenet_f16_16384", "tiny"),
                 "clip": ("shapes", "vit_b32", "finetune", "tiny"), "prior": ("shapes", "gpt2_medium", "tiny")}


def test_cosine_schedule_warms_up_then_decays_to_the_final_fraction():
    opt = optimizer.default_config(learning_rate=1e-3, warmup_steps=10, final_lr_fraction=0.1)
    schedule = optimizer.make_schedule(opt, total_steps=100)
    assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(55)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-4)
    assert float(schedule(100)) == pytest.approx(1e-4)
    assert float(optimizer.make_schedule(opt, total_steps=100, peak=2e-3)(10)) == pytest.approx(2e-3)


def test_constant_schedule_with_and_without_warmup():
    flat = optimizer.make_schedule(optimizer.default_config(learning_rate=4e-4, schedule="constant"), 100)
    assert float(flat(0)) == float(flat(99)) == pytest.approx(4e-4)
    warm = optimizer.make_schedule(optimizer.default_config(learning_rate=4e-4, schedule="constant",
                                                            warmup_steps=4), 100)
    assert [float(warm(s)) for s in (0, 2, 4, 99)] == pytest.approx([0.0, 2e-4, 4e-4, 4e-4])


def test_weight_decay_picks_adamw_on_the_masked_leaves_and_clipping_comes_first():
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    opt = optimizer.default_config(learning_rate=0.1, schedule="constant", weight_decay=0.5, grad_clip_norm=1.0)
    transform, _ = optimizer.make(opt, 10, decay_mask=lambda p: {"kernel": True, "bias": False})
    state = transform.init(params)
    assert isinstance(state[0], optax.ClipByGlobalNormState) and len(state) == 2
    updates, _ = transform.update(zero_grads, state, params)
    assert float(updates["kernel"][0, 0]) == pytest.approx(-0.1 * 0.5) and float(updates["bias"][0]) == 0.0
    plain, _ = optimizer.make(optimizer.default_config(), 10)  # no decay, no clipping: Adam alone
    assert jax.tree.structure(plain.init(params)) == jax.tree.structure(optax.adam(lambda _: 0.1).init(params))


@pytest.mark.parametrize("stage", sorted(STAGE_PRESETS))
def test_every_stage_config_has_the_shared_fields(stage):
    for preset in STAGE_PRESETS[stage]:
        config = training.load_config(f"configs/{stage}.py:{preset}")
        assert set(optimizer.FIELDS) <= set(config.optimizer), (stage, preset)
        optimizer.make(config.optimizer, config.train.steps)


def test_each_stage_keeps_the_optimizer_state_layout_of_its_existing_checkpoints():
    """Resuming a workdir restores the optimizer state into this layout: the chains the stages built before."""
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}

    def mask(p):
        return jax.tree.map(lambda _: True, p)

    earlier = {"autoencoder": optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lambda _: 0.0)),
               "vqgan": optax.adam(lambda _: 0.0),
               "clip": optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lambda _: 0.0, mask=mask)),
               "prior": optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lambda _: 0.0, mask=mask))}
    for stage, transform in earlier.items():
        config = training.load_config(f"configs/{stage}.py:tiny")
        built, _ = optimizer.make(config.optimizer, config.train.steps, decay_mask=mask)
        assert jax.tree.structure(built.init(params)) == jax.tree.structure(transform.init(params)), stage


def test_a_config_from_before_the_shared_fields_trains_as_it_did():
    """The VQGAN's optimizer fields before they were shared: a constant-rate Adam, no clipping."""
    old_vqgan = ml_collections.ConfigDict(dict(learning_rate=4e-4, disc_learning_rate=4e-4, b1=0.5, b2=0.9,
                                               schedule="constant", warmup_steps=0))
    transform, schedule = optimizer.make(old_vqgan, 10, peak=old_vqgan.disc_learning_rate)
    reference = optax.adam(4e-4, b1=0.5, b2=0.9)
    params = {"w": jnp.arange(3.0)}
    state, expected_state = transform.init(params), reference.init(params)
    # Several steps with changing gradients: after the first, Adam's update depends on b1 and b2.
    for grads in ({"w": jnp.asarray([0.5, -1.0, 2.0])}, {"w": jnp.asarray([-2.0, 0.25, 1.0])},
                  {"w": jnp.asarray([1.0, 3.0, -0.5])}):
        updates, state = transform.update(grads, state, params)
        expected, expected_state = reference.update(grads, expected_state, params)
        assert updates["w"].tolist() == expected["w"].tolist()
    assert float(schedule(9)) == pytest.approx(4e-4)
    with pytest.raises(ValueError, match="optimizer.schedule='linear' is not one of cosine, constant"):
        optimizer.make(optimizer.default_config(schedule="linear"), 10)
