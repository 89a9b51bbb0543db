"""Sampling: the KV-cached loop gives the full-recompute reference's tokens exactly; a row's tokens do not depend on
the batch; filters; guidance; one compile for any temperature, top_k, top_p and guidance scale."""

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


def keys(seed, rows=4):
    """Row keys of `rows` candidates of prompt 0."""
    return sampling.row_keys(seed, np.zeros(rows), np.arange(rows))


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
        rng = keys(seed)
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
        np.testing.assert_array_equal(sampling.sample(model, params, cond_BD, keys(0, 2), **settings),
                                      sampling.sample_naive(model, params, cond_BD, keys(0, 2), **settings))
    unrolled = prior.Prior(**FIELDS)
    np.testing.assert_array_equal(
        sampling.sample(model, params, cond_BD, keys(0, 2), greedy=True),
        sampling.sample(unrolled, prior.unstack_block_params(params, 2), cond_BD, keys(0, 2), greedy=True))


def test_cached_sampler_matches_naive_with_token_conditioning():
    model = prior.Prior(**FIELDS, token_conditioning=True)
    params = peaked_params(model)
    cond_BD = jax.random.normal(jax.random.PRNGKey(2), (3, FIELDS["cond_dim"]))
    for settings in (dict(greedy=True), dict(top_k=10), dict(guidance_scale=3.0)):
        cached = sampling.sample(model, params, cond_BD, keys(0, 3), **settings)
        np.testing.assert_array_equal(cached,
                                      sampling.sample_naive(model, params, cond_BD, keys(0, 3), **settings))
        assert len(np.unique(np.asarray(cached))) > 4


def test_seeds_and_conditions_change_samples_and_greedy_ignores_the_seed(setup):
    model, params, cond_BD = setup
    first = sampling.sample(model, params, cond_BD, keys(0))
    np.testing.assert_array_equal(first, sampling.sample(model, params, cond_BD, keys(0)))
    assert (first != sampling.sample(model, params, cond_BD, keys(1))).mean() > 0.3
    greedy = sampling.sample(model, params, cond_BD, keys(0), greedy=True)
    np.testing.assert_array_equal(greedy, sampling.sample(model, params, cond_BD, keys(7), greedy=True))
    np.testing.assert_array_equal(greedy, sampling.sample(model, params, cond_BD, keys(7), temperature=0))
    assert len(np.unique(np.asarray(greedy), axis=0)) == len(cond_BD)  # each condition its own tokens


def test_top_k_one_is_greedy(setup):
    model, params, cond_BD = setup
    greedy = sampling.sample(model, params, cond_BD, keys(0), greedy=True)
    for seed in range(3):
        np.testing.assert_array_equal(sampling.sample(model, params, cond_BD, keys(seed), top_k=1),
                                      greedy)


def test_guidance_scale_one_is_the_unguided_sampler_and_larger_scales_change_samples(setup):
    model, params, cond_BD = setup
    rng = keys(3)
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
        rng = keys(5)
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
    draws = sampling._choose(logits_BV, keys(0, 20000), 3, greedy=False, filtered=True, guided=False, temperature=2.0,
                             top_k=3, top_p=None, guidance_scale=1.0)
    expected = np.array([0.0, 0.5, 0.15, 0.3]) ** 0.5
    expected /= expected.sum()
    np.testing.assert_allclose(np.bincount(np.asarray(draws), minlength=4) / 20000, expected, atol=0.015)


def test_new_temperature_top_k_top_p_and_guidance_values_compile_nothing(setup):
    model, params, cond_BD = setup
    sampling._sample_cached.clear_cache()
    sampling.sample(model, params, cond_BD, keys(0), temperature=1, top_k=np.int64(5))
    sampling.sample(model, params, -cond_BD, keys(1), temperature=1.0, top_k=5)
    assert sampling._sample_cached._cache_size() == 1
    for temperature, top_k, top_p in ((0.5, 3, 0.9), (1.7, None, 0.5), (0.9, 64, None), (1.1, 1000, 1.0)):
        sampling.sample(model, params, cond_BD, keys(2), temperature=temperature, top_k=top_k, top_p=top_p)
    assert sampling._sample_cached._cache_size() == 1
    for scale in (2.0, 3.5, 0.5):  # guidance: one more compilation (the null rows), then none per scale
        sampling.sample(model, params, cond_BD, keys(2), top_p=0.9, guidance_scale=scale)
    assert sampling._sample_cached._cache_size() == 2


@pytest.mark.parametrize("settings", [dict(temperature=0.7, top_k=5), dict(top_p=0.8), dict(top_k=20, top_p=0.9)],
                         ids=str)
def test_traced_filters_match_the_static_top_k_filter(settings):
    """The sort-and-index top k (traced k) keeps exactly the tokens `lax.top_k` (static k) keeps."""
    logits_BV = jax.random.normal(jax.random.PRNGKey(0), (8, 64)) * 3.0
    logits_BV = logits_BV.at[:, 10].set(logits_BV[:, 11])  # ties
    traced = jax.jit(lambda l, t, k, p: sampling.filter_logits(l, temperature=t, top_k=k, top_p=p))
    temperature, top_k = settings.get("temperature", 1.0), settings.get("top_k", 64)
    got = traced(logits_BV, np.float32(temperature), np.int32(top_k), np.float32(settings.get("top_p", 1.0)))
    tempered_BV = logits_BV / temperature
    expected_BV = jnp.where(tempered_BV < jax.lax.top_k(tempered_BV, top_k)[0][:, -1:], -jnp.inf, tempered_BV)
    if "top_p" in settings:
        expected_BV = sampling.filter_logits(expected_BV, top_p=settings["top_p"])
    np.testing.assert_array_equal(got, expected_BV)


def test_a_rows_tokens_do_not_depend_on_the_batch(setup):
    """64 rows (8 prompts x 8 candidates) drawn at once, 7 at a time (the last call padded) and one at a time."""
    model, params, _ = setup
    cond_PD = jax.random.normal(jax.random.PRNGKey(6), (8, FIELDS["cond_dim"]))
    cond_RD = jnp.repeat(cond_PD, 8, axis=0)
    keys_R2 = sampling.row_keys(11, np.repeat(np.arange(8), 8), np.tile(np.arange(8), 8))
    settings = dict(temperature=0.8, top_k=20, top_p=0.9)
    whole = np.asarray(sampling.sample(model, params, cond_RD, keys_R2, **settings))
    assert len(np.unique(whole, axis=0)) == 64
    for batch in (1, 7):
        rows = []
        for start in range(0, 64, batch):
            pad = batch - len(cond_RD[start:start + batch])
            chunk = [jnp.concatenate([x[start:start + batch], jnp.repeat(x[-1:], pad, axis=0)])
                     for x in (cond_RD, keys_R2)]
            rows.append(np.asarray(sampling.sample(model, params, *chunk, **settings))[:batch - pad])
        np.testing.assert_array_equal(np.concatenate(rows), whole)


def test_row_keys_are_folded_from_seed_prompt_and_candidate():
    keys_R2 = sampling.row_keys(3, [0, 2], [5, 1])
    for row, (p, n) in enumerate([(0, 5), (2, 1)]):
        np.testing.assert_array_equal(keys_R2[row],
                                      jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(3), p), n))


def test_one_key_per_row_is_required(setup):
    model, params, cond_BD = setup
    with pytest.raises(ValueError, match=r"one PRNG key per row, \[4, 2\]"):
        sampling.sample(model, params, cond_BD, jax.random.PRNGKey(0))


@pytest.mark.parametrize("bad, message", [(dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
                                          (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_invalid_settings_are_clear_errors(setup, bad, message):
    model, params, cond_BD = setup
    with pytest.raises(ValueError, match=message):
        sampling.sample(model, params, cond_BD, keys(0), **bad)
