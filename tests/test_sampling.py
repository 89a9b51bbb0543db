"""Sampling: the KV-cached loop gives the full-recompute reference's tokens exactly; filters; guidance; one compile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipgen_jax import sampling
from clipgen_jax.models import prior

FIELDS = dict(vocab_size=64, num_tokens=16, cond_dim=8, width=32, depth=2, num_heads=4, num_prefix_tokens=2)


def peaked_params(model, seed=0):
    """Random weights with the head and the condition projection scaled up: at initialisation the logits are
    nearly flat and barely depend on the condition, which would let wrong samplers pass."""
    params = prior.init_params(model.clone(scan_layers=False), jax.random.PRNGKey(seed))
    params = {**params, "head": {"kernel": params["head"]["kernel"] * 20.0},
              "prefix": {**params["prefix"], "kernel": params["prefix"]["kernel"] * 50.0}}
    if model.token_conditioning:
        params["cond_to_tokens"] = {**params["cond_to_tokens"], "kernel": params["cond_to_tokens"]["kernel"] * 50.0}
    return prior.stack_block_params(params, model.depth) if model.scan_layers else params


@pytest.fixture(scope="module")
def setup():
    model = prior.Prior(**FIELDS)
    cond_BD = jax.random.normal(jax.random.PRNGKey(1), (4, FIELDS["cond_dim"]))
    return model, peaked_params(model), cond_BD


SETTINGS = [
    dict(greedy=True),
    dict(),
    dict(temperature=0.7, top_k=5),
    dict(top_p=0.8),
    dict(temperature=1.3, top_k=20, top_p=0.9),
    dict(guidance_scale=3.0),
    dict(guidance_scale=2.0, greedy=True),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_cached_sampler_gives_the_naive_samplers_tokens(setup, settings):
    model, params, cond_BD = setup
    for seed in range(3):
        rng = jax.random.PRNGKey(seed)
        cached = np.asarray(sampling.sample(model, params, cond_BD, rng, **settings))
        naive = np.asarray(sampling.sample_naive(model, params, cond_BD, rng, **settings))
        assert cached.shape == (4, FIELDS["num_tokens"]) and cached.dtype == np.int32
        np.testing.assert_array_equal(cached, naive)
        assert 0 <= cached.min() and cached.max() < FIELDS["vocab_size"]
        assert len(np.unique(cached)) > 4  # a collapsed sampler would agree with itself too easily


def test_cached_sampler_matches_naive_with_scanned_rematerialised_layers():
    model = prior.Prior(**FIELDS, scan_layers=True, remat=True)
    params = peaked_params(model)
    cond_BD = jax.random.normal(jax.random.PRNGKey(2), (2, FIELDS["cond_dim"]))
    for settings in (dict(greedy=True), dict(top_k=10)):
        np.testing.assert_array_equal(sampling.sample(model, params, cond_BD, jax.random.PRNGKey(0), **settings),
                                      sampling.sample_naive(model, params, cond_BD, jax.random.PRNGKey(0), **settings))
    unrolled = prior.Prior(**FIELDS)
    np.testing.assert_array_equal(
        sampling.sample(model, params, cond_BD, jax.random.PRNGKey(0), greedy=True),
        sampling.sample(unrolled, prior.unstack_block_params(params, 2), cond_BD, jax.random.PRNGKey(0), greedy=True))


def test_cached_sampler_matches_naive_with_token_conditioning():
    model = prior.Prior(**FIELDS, token_conditioning=True)
    params = peaked_params(model)
    cond_BD = jax.random.normal(jax.random.PRNGKey(2), (3, FIELDS["cond_dim"]))
    for settings in (dict(greedy=True), dict(top_k=10), dict(guidance_scale=3.0)):
        cached = sampling.sample(model, params, cond_BD, jax.random.PRNGKey(0), **settings)
        np.testing.assert_array_equal(cached,
                                      sampling.sample_naive(model, params, cond_BD, jax.random.PRNGKey(0), **settings))
        assert len(np.unique(np.asarray(cached))) > 4


def test_seeds_and_conditions_change_samples_and_greedy_ignores_the_seed(setup):
    model, params, cond_BD = setup
    first = sampling.sample(model, params, cond_BD, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(first, sampling.sample(model, params, cond_BD, jax.random.PRNGKey(0)))
    assert (first != sampling.sample(model, params, cond_BD, jax.random.PRNGKey(1))).mean() > 0.3
    greedy = sampling.sample(model, params, cond_BD, jax.random.PRNGKey(0), greedy=True)
    np.testing.assert_array_equal(greedy, sampling.sample(model, params, cond_BD, jax.random.PRNGKey(7), greedy=True))
    np.testing.assert_array_equal(greedy, sampling.sample(model, params, cond_BD, jax.random.PRNGKey(7), temperature=0))
    assert len(np.unique(np.asarray(greedy), axis=0)) == len(cond_BD)  # each condition its own tokens


def test_top_k_one_is_greedy(setup):
    model, params, cond_BD = setup
    greedy = sampling.sample(model, params, cond_BD, jax.random.PRNGKey(0), greedy=True)
    for seed in range(3):
        np.testing.assert_array_equal(sampling.sample(model, params, cond_BD, jax.random.PRNGKey(seed), top_k=1),
                                      greedy)


def test_guidance_scale_one_is_the_unguided_sampler_and_larger_scales_change_samples(setup):
    model, params, cond_BD = setup
    rng = jax.random.PRNGKey(3)
    unguided = np.asarray(sampling.sample(model, params, cond_BD, rng))
    np.testing.assert_array_equal(sampling.sample(model, params, cond_BD, rng, guidance_scale=1.0), unguided)
    np.testing.assert_array_equal(sampling.sample(model, params, cond_BD, rng, guidance_scale=1), unguided)
    np.testing.assert_array_equal(sampling.sample_naive(model, params, cond_BD, rng, guidance_scale=1.0), unguided)
    for settings in (dict(), dict(greedy=True)):
        plain = np.asarray(sampling.sample(model, params, cond_BD, rng, **settings))
        guided = np.asarray(sampling.sample(model, params, cond_BD, rng, guidance_scale=4.0, **settings))
        assert (guided != plain).mean() > 0.1


def test_guided_rows_pair_each_condition_with_its_null_row(setup):
    """With the null embedding equal to the (normalised) condition, conditional and null logits coincide, so any
    guidance scale must reproduce the unguided tokens: this fails if rows are mispaired or the random numbers
    differ between the guided and the unguided loop."""
    model, params, _ = setup
    unit = jax.random.normal(jax.random.PRNGKey(4), (FIELDS["cond_dim"],))
    unit = unit / jnp.linalg.norm(unit)
    params = {**params, "null_embedding": unit}
    cond_BD = jnp.broadcast_to(3.0 * unit, (4, FIELDS["cond_dim"]))
    for settings in (dict(), dict(top_p=0.9), dict(greedy=True)):
        rng = jax.random.PRNGKey(5)
        unguided = sampling.sample(model, params, cond_BD, rng, **settings)
        np.testing.assert_array_equal(sampling.sample(model, params, cond_BD, rng, guidance_scale=5.0, **settings),
                                      unguided)
        if not settings.get("greedy"):
            assert (unguided != unguided[0]).any()  # rows share a condition but not their random numbers


def test_guide_is_uncond_plus_scale_times_difference():
    cond = jax.random.normal(jax.random.PRNGKey(0), (3, 10))
    uncond = jax.random.normal(jax.random.PRNGKey(1), (3, 10))
    np.testing.assert_allclose(sampling.guide(jnp.concatenate([cond, uncond]), 2.5), uncond + 2.5 * (cond - uncond),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(sampling.guide(cond, 1.0), cond)


def test_filter_logits_top_k_and_nucleus():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda filtered: np.isfinite(np.asarray(filtered))[0].tolist()  # noqa: E731
    assert kept(sampling.filter_logits(logits, top_k=2)) == [False, True, False, True]
    assert kept(sampling.filter_logits(logits, top_k=10)) == [True] * 4
    assert kept(sampling.filter_logits(logits, top_p=0.5)) == [False, True, False, False]
    assert kept(sampling.filter_logits(logits, top_p=0.7)) == [False, True, False, True]
    assert kept(sampling.filter_logits(logits, top_p=0.9)) == [False, True, True, True]
    assert kept(sampling.filter_logits(logits, top_p=1.0)) == [True] * 4
    assert kept(sampling.filter_logits(logits, top_k=3, top_p=0.99)) == [False, True, True, True]
    np.testing.assert_allclose(sampling.filter_logits(logits, temperature=0.5), logits / 0.5)


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits_BV = jnp.tile(jnp.log(jnp.array([0.05, 0.5, 0.15, 0.3])), (20000, 1))
    draws = sampling._choose(logits_BV, jax.random.PRNGKey(0), 3, greedy=False, temperature=2.0, top_k=3, top_p=None)
    expected = np.array([0.0, 0.5, 0.15, 0.3]) ** 0.5
    expected /= expected.sum()
    np.testing.assert_allclose(np.bincount(np.asarray(draws), minlength=4) / 20000, expected, atol=0.015)


def test_sampling_loop_compiles_once(setup):
    model, params, cond_BD = setup
    sampling._sample_cached.clear_cache()
    sampling.sample(model, params, cond_BD, jax.random.PRNGKey(0), temperature=1, top_k=np.int64(5))
    sampling.sample(model, params, -cond_BD, jax.random.PRNGKey(1), temperature=1.0, top_k=5)
    assert sampling._sample_cached._cache_size() == 1


@pytest.mark.parametrize("bad, message", [(dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
                                          (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_invalid_settings_are_clear_errors(setup, bad, message):
    model, params, cond_BD = setup
    with pytest.raises(ValueError, match=message):
        sampling.sample(model, params, cond_BD, jax.random.PRNGKey(0), **bad)
