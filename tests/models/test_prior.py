"""The prior: logits, causality, the null condition, layer scan and remat, the KV cache, presets and FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipgen_jax import training
from clipgen_jax.models import prior, vqgan

TINY = dict(vocab_size=32, num_tokens=9, cond_dim=8, width=32, depth=2, num_heads=4, num_prefix_tokens=2)


def tiny_prior(**overrides) -> prior.Prior:
    return prior.Prior(**{**TINY, **overrides})


@pytest.fixture(scope="module")
def tiny():
    model = tiny_prior()
    params = prior.init_params(model, jax.random.PRNGKey(0))
    cond_BD = jax.random.normal(jax.random.PRNGKey(1), (3, TINY["cond_dim"]))
    tokens_BL = jax.random.randint(jax.random.PRNGKey(2), (3, TINY["num_tokens"]), 0, TINY["vocab_size"])
    return model, params, cond_BD, tokens_BL


def test_logits_shape_and_dtype_also_with_bfloat16_compute(tiny):
    model, params, cond_BD, tokens_BL = tiny
    logits = model.apply({"params": params}, cond_BD, tokens_BL)
    assert logits.shape == (3, TINY["num_tokens"], TINY["vocab_size"]) and logits.dtype == jnp.float32
    half = model.clone(dtype=jnp.bfloat16).apply({"params": params}, cond_BD, tokens_BL)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, logits, atol=0.05)
    assert params["null_embedding"].shape == (TINY["cond_dim"],)
    assert params["position_embedding"].shape == (model.seq_len, TINY["width"]) and model.seq_len == 10


@pytest.mark.parametrize("changed", [0, 4, 8])
def test_logits_are_causal(tiny, changed):
    model, params, cond_BD, tokens_BL = tiny
    edited = tokens_BL.at[:, changed].set((tokens_BL[:, changed] + 1) % TINY["vocab_size"])
    before = np.asarray(model.apply({"params": params}, cond_BD, tokens_BL))
    after = np.asarray(model.apply({"params": params}, cond_BD, edited))
    np.testing.assert_array_equal(after[:, :changed + 1], before[:, :changed + 1])
    if changed < TINY["num_tokens"] - 1:
        assert np.abs(after[:, changed + 1:] - before[:, changed + 1:]).max() > 1e-4
    # The condition reaches every position, the first included.
    other = model.apply({"params": params}, cond_BD[::-1], tokens_BL)
    assert np.abs(np.asarray(other)[0, 0] - before[0, 0]).max() > 1e-5


def test_condition_scale_does_not_matter(tiny):
    model, params, cond_BD, tokens_BL = tiny
    np.testing.assert_allclose(model.apply({"params": params}, 7.0 * cond_BD, tokens_BL),
                               model.apply({"params": params}, cond_BD, tokens_BL), atol=1e-5)


def test_null_rows_ignore_the_condition(tiny):
    model, params, cond_BD, tokens_BL = tiny
    use_null_B = jnp.array([True, False, True])
    logits = model.apply({"params": params}, cond_BD, tokens_BL, use_null_B=use_null_B)
    other_cond = jax.random.normal(jax.random.PRNGKey(9), cond_BD.shape)
    other = model.apply({"params": params}, other_cond, tokens_BL, use_null_B=use_null_B)
    np.testing.assert_array_equal(np.asarray(other)[[0, 2]], np.asarray(logits)[[0, 2]])
    assert np.abs(np.asarray(other)[1] - np.asarray(logits)[1]).max() > 1e-5
    plain = model.apply({"params": params}, cond_BD, tokens_BL)
    np.testing.assert_allclose(np.asarray(logits)[1], np.asarray(plain)[1], atol=1e-6)
    # A null row is the normalised condition replaced by the null embedding (which is used as it is).
    unit_null = params["null_embedding"] / jnp.linalg.norm(params["null_embedding"])
    unit_params = {**params, "null_embedding": unit_null}
    nulls = model.apply({"params": unit_params}, cond_BD, tokens_BL, use_null_B=use_null_B)
    as_cond = model.apply({"params": unit_params}, jnp.broadcast_to(unit_null, cond_BD.shape), tokens_BL)
    np.testing.assert_allclose(np.asarray(as_cond)[0], np.asarray(nulls)[0], atol=1e-6)


def test_token_conditioning_reaches_image_tokens_without_the_prefix_and_null_rows_drop_it(tiny):
    _, _, cond_BD, tokens_BL = tiny
    other_cond = jax.random.normal(jax.random.PRNGKey(9), cond_BD.shape)
    for token_conditioning in (False, True):
        model = tiny_prior(token_conditioning=token_conditioning)
        params = prior.init_params(model, jax.random.PRNGKey(0))
        assert ("cond_to_tokens" in params) == token_conditioning
        # A prefix that ignores the condition: only token conditioning can still pass it on.
        params = {**params, "prefix": jax.tree.map(jnp.zeros_like, params["prefix"])}
        logits = np.asarray(model.apply({"params": params}, cond_BD, tokens_BL))
        other = np.asarray(model.apply({"params": params}, other_cond, tokens_BL))
        np.testing.assert_array_equal(other[:, 0], logits[:, 0])  # the first token sees the prefix only
        assert (np.abs(other[:, 1:] - logits[:, 1:]).max() > 1e-4) == token_conditioning
        all_null_B = jnp.ones((3,), bool)
        np.testing.assert_array_equal(model.apply({"params": params}, cond_BD, tokens_BL, use_null_B=all_null_B),
                                      model.apply({"params": params}, other_cond, tokens_BL, use_null_B=all_null_B))


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_layers_match_unrolled_layers(tiny, remat):
    model, params, cond_BD, tokens_BL = tiny
    scanned = model.clone(scan_layers=True, remat=remat)
    scanned_params = prior.stack_block_params(params, TINY["depth"])
    fresh = prior.init_params(scanned, jax.random.PRNGKey(0))
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, scanned_params)
    np.testing.assert_allclose(scanned.apply({"params": scanned_params}, cond_BD, tokens_BL),
                               model.apply({"params": params}, cond_BD, tokens_BL), atol=1e-5)
    round_trip = prior.unstack_block_params(scanned_params, TINY["depth"])
    jax.tree.map(np.testing.assert_array_equal, round_trip, params)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_remat_gives_identical_gradients(tiny, scan_layers):
    model, params, cond_BD, tokens_BL = tiny
    model = model.clone(scan_layers=scan_layers, dropout_rate=0.1)
    if scan_layers:
        params = prior.stack_block_params(params, TINY["depth"])

    def grads(module):
        def loss(p):
            logits = module.apply({"params": p}, cond_BD, tokens_BL, deterministic=False,
                                  rngs={"dropout": jax.random.PRNGKey(5)})
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens_BL[..., None], -1))
        return jax.jit(jax.grad(loss))(params)

    plain, rematerialised = grads(model), grads(model.clone(remat=True))
    jax.tree.map(np.testing.assert_array_equal, plain, rematerialised)
    assert float(jnp.abs(plain["head"]["kernel"]).max()) > 0


def test_dropout_is_active_only_when_not_deterministic(tiny):
    model, params, cond_BD, tokens_BL = tiny
    model = model.clone(dropout_rate=0.5)
    clean = model.apply({"params": params}, cond_BD, tokens_BL)
    np.testing.assert_array_equal(clean, tiny[0].apply({"params": params}, cond_BD, tokens_BL))
    noisy = model.apply({"params": params}, cond_BD, tokens_BL, deterministic=False,
                        rngs={"dropout": jax.random.PRNGKey(0)})
    assert np.abs(np.asarray(noisy) - np.asarray(clean)).max() > 1e-3


def test_dropout_drops_the_rate_and_rescales_the_rest():
    x = jnp.ones((3, 1001, 333), jnp.float32)  # an odd number of elements: the last random word is half used
    layer = prior.Dropout(0.1)
    out = np.asarray(layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)}))
    kept = out != 0
    assert abs(1 - kept.mean() - 0.1) < 2e-3
    np.testing.assert_array_equal(np.unique(out[kept]), np.float32(65536 / (65536 - 6554)))
    np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
    again = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    other = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    np.testing.assert_array_equal(again, out)
    assert 0.15 < np.mean((np.asarray(other) != 0) != kept) < 0.2  # independent masks differ in ~2 p (1 - p)


@pytest.mark.parametrize("scan_layers, token_conditioning", [(False, False), (True, False), (False, True)])
def test_cached_decoding_reproduces_the_training_forward(tiny, scan_layers, token_conditioning):
    model, params, cond_BD, tokens_BL = tiny
    model = model.clone(scan_layers=scan_layers, token_conditioning=token_conditioning)
    if token_conditioning:
        params = prior.init_params(model, jax.random.PRNGKey(0))
    if scan_layers:
        params = prior.stack_block_params(params, TINY["depth"])
    variables = {"params": params}
    full = np.asarray(model.apply(variables, cond_BD, tokens_BL))
    cache = model.init_cache(3)
    assert cache.keys.shape == (TINY["depth"], 3, model.seq_len, TINY["num_heads"], TINY["width"] // TINY["num_heads"])
    logits, cache = jax.jit(lambda v, c, k: model.apply(v, c, k, method=model.prefill))(variables, cond_BD, cache)
    np.testing.assert_allclose(logits, full[:, 0], atol=1e-6)
    decode = jax.jit(lambda v, t, i, k: model.apply(v, t, i, k, method=model.decode))
    for index in range(TINY["num_tokens"] - 1):
        logits, cache = decode(variables, tokens_BL[:, index], index, cache)
        np.testing.assert_allclose(logits, full[:, index + 1], atol=1e-6)
    assert decode._cache_size() == 1  # the position is an argument, not a constant


def test_presets_and_from_config():
    for name, fields in prior.PRESETS.items():
        assert set(fields) == set(prior.CONFIG_FIELDS), name
    model = prior.from_config(prior.PRESETS["gpt2_medium"], dtype=jnp.bfloat16)
    assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32
    shapes = jax.eval_shape(lambda: prior.init_params(model, jax.random.PRNGKey(0)))
    count = sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
    assert 330e6 < count < 345e6  # GPT-2 medium's 24 x 12.6M block weights, plus a 16384-token embedding and head
    large = prior.from_config(prior.PRESETS["gpt2_large"])
    assert (large.depth, large.width, large.num_heads) == (36, 1280, 20)
    shapes_model = training.load_config("configs/prior.py:shapes").model.to_dict()
    shapes_preset = prior.from_config(shapes_model)
    # The tokens the shapes prior models: the shapes VQGAN preset's grid and codebook.
    shapes_vqgan = vqgan.from_config(training.load_config("configs/vqgan.py:shapes").model)
    grid_side = shapes_vqgan.resolution // shapes_vqgan.downsample_factor
    assert (shapes_preset.vocab_size, shapes_preset.num_tokens, shapes_preset.cond_dim) == (
        shapes_vqgan.codebook_size, grid_side ** 2, 128)
    with pytest.raises(ValueError, match="unknown prior model fields"):
        prior.from_config({**shapes_model, "n_layer": 3})


def test_training_flops_per_token_formula():
    model = tiny_prior()
    positions, tokens = 10, 9
    block = 12 * 32**2
    per_sample = 6 * (positions * 2 * block + tokens * 32 * 32 + 8 * 2 * 32) + 12 * 2 * positions**2 * 32
    assert prior.training_flops_per_token(model) == pytest.approx(per_sample / tokens)
    token_conditioned = tiny_prior(token_conditioning=True)
    assert prior.training_flops_per_token(token_conditioned) == pytest.approx((per_sample + 6 * 8 * 32) / tokens)


def test_training_flops_agree_with_xla_count():
    model = prior.from_config(training.load_config("configs/prior.py:shapes").model)
    params = jax.eval_shape(lambda: prior.init_params(model, jax.random.PRNGKey(0)))
    cond_BD = jax.ShapeDtypeStruct((4, model.cond_dim), jnp.float32)
    tokens_BL = jax.ShapeDtypeStruct((4, model.num_tokens), jnp.int32)

    def loss(p, c, t):
        return jnp.mean(model.apply({"params": p}, c, t) ** 2)

    cost = jax.jit(jax.grad(loss)).lower(params, cond_BD, tokens_BL).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_per_token = float(cost["flops"]) / (4 * model.num_tokens)
    assert xla_per_token == pytest.approx(prior.training_flops_per_token(model), rel=0.1)
