"""Sampling image tokens from the prior: a KV-cached loop and its full-recompute reference.

`sample` is one jit: the prefix is prefilled into a preallocated KV cache, then a `lax.fori_loop` feeds one token per
step, writing the cache in place, so shapes never change and the loop compiles once per (model, batch shape,
sampling settings). `sample_naive` reruns the whole training forward at every step. Both draw step i's random numbers
from `fold_in(rng, i)` with the same shapes and filter float32 logits identically, so for the same rng they give the
same tokens; the only numerical difference between them is the shape of the matmuls.

Classifier-free guidance (`guidance_scale` s != 1) runs each condition twice in one batch of 2B rows, the second
copy with the model's learned null embedding, and samples from cond + (s - 1) * (cond - uncond), which is
uncond + s * (cond - uncond). s == 1 skips the null rows altogether: it is the unguided sampler, token for token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def filter_logits(logits_BV, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
    """Logits divided by the temperature, with tokens outside the top k, then outside the nucleus (the smallest set
    of most likely tokens whose probability reaches top_p) set to -inf, as Hugging Face's warpers in that order."""
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p is not None and top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # A token stays if the mass of the more likely ones is still short of top_p; the first always stays.
        keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p
        threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
    return logits_BV


def guide(logits_RV, guidance_scale: float):
    """Rows [conditional; null] (R = 2B) -> guided logits [B, V]; identity on R = B rows when the scale is 1."""
    if guidance_scale == 1.0:
        return logits_RV
    cond_BV, uncond_BV = jnp.split(logits_RV, 2, axis=0)
    return cond_BV + (guidance_scale - 1.0) * (cond_BV - uncond_BV)


def _choose(logits_BV, rng, index, *, greedy: bool, temperature: float, top_k, top_p):
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = filter_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(jax.random.fold_in(rng, index), logits_BV, axis=-1).astype(jnp.int32)


def _model_rows(cond_BD, guidance_scale: float):
    """The rows the model runs: the conditions, followed by null copies when guiding."""
    if guidance_scale == 1.0:
        return cond_BD, None
    batch = cond_BD.shape[0]
    use_null_R = jnp.concatenate([jnp.zeros((batch,), bool), jnp.ones((batch,), bool)])
    return jnp.concatenate([cond_BD, cond_BD], axis=0), use_null_R


_STATIC = ("model", "greedy", "temperature", "top_k", "top_p", "guidance_scale")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_cached(model, params, cond_BD, rng, *, greedy, temperature, top_k, top_p, guidance_scale):
    choose = functools.partial(_choose, rng=rng, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
    variables = {"params": params}
    cond_RD, use_null_R = _model_rows(cond_BD, guidance_scale)
    rows = cond_RD.shape[0]
    logits_RV, cache = model.apply(variables, cond_RD, model.init_cache(rows), use_null_B=use_null_R,
                                   method=model.prefill)
    tokens_BL = jnp.zeros((cond_BD.shape[0], model.num_tokens), jnp.int32)
    tokens_BL = tokens_BL.at[:, 0].set(choose(guide(logits_RV, guidance_scale), index=0))

    def step(i, carry):
        tokens_BL, cache = carry
        previous_B = jax.lax.dynamic_index_in_dim(tokens_BL, i - 1, axis=1, keepdims=False)
        previous_R = jnp.tile(previous_B, rows // previous_B.shape[0])
        logits_RV, cache = model.apply(variables, previous_R, i - 1, cache, method=model.decode)
        new_B1 = choose(guide(logits_RV, guidance_scale), index=i)[:, None]
        return jax.lax.dynamic_update_slice_in_dim(tokens_BL, new_B1, i, axis=1), cache

    tokens_BL, _ = jax.lax.fori_loop(1, model.num_tokens, step, (tokens_BL, cache))
    return tokens_BL


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_naive(model, params, cond_BD, rng, *, greedy, temperature, top_k, top_p, guidance_scale):
    choose = functools.partial(_choose, rng=rng, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
    cond_RD, use_null_R = _model_rows(cond_BD, guidance_scale)
    rows = cond_RD.shape[0]

    def step(i, tokens_BL):
        # Positions after i hold zeros; causality keeps them from reaching logits[:, i].
        logits_RLV = model.apply({"params": params}, cond_RD, jnp.tile(tokens_BL, (rows // tokens_BL.shape[0], 1)),
                                 use_null_B=use_null_R)
        logits_RV = jax.lax.dynamic_index_in_dim(logits_RLV, i, axis=1, keepdims=False)
        new_B1 = choose(guide(logits_RV, guidance_scale), index=i)[:, None]
        return jax.lax.dynamic_update_slice_in_dim(tokens_BL, new_B1, i, axis=1)

    return jax.lax.fori_loop(0, model.num_tokens, step, jnp.zeros((cond_BD.shape[0], model.num_tokens), jnp.int32))


def _settings(temperature, top_k, top_p, guidance_scale, greedy) -> dict:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    greedy = bool(greedy) or temperature == 0
    # Static arguments: normalise so that equal settings hash alike and reuse one compilation.
    return dict(greedy=greedy, temperature=None if greedy else float(temperature),
                top_k=None if greedy or top_k is None else int(top_k),
                top_p=None if greedy or top_p is None else float(top_p), guidance_scale=float(guidance_scale))


def sample(model, params, cond_BD, rng, *, temperature=1.0, top_k=None, top_p=None, guidance_scale=1.0,
           greedy=False):
    """Image tokens int32 [B, num_tokens] for CLIP embeddings cond_BD [B, cond_dim] (normalised or not: the model
    normalises). temperature 0 or `greedy` takes the argmax; guidance_scale != 1 is classifier-free guidance."""
    return _sample_cached(model, params, jnp.asarray(cond_BD), rng,
                          **_settings(temperature, top_k, top_p, guidance_scale, greedy))


def sample_naive(model, params, cond_BD, rng, *, temperature=1.0, top_k=None, top_p=None, guidance_scale=1.0,
                 greedy=False):
    """The reference for `sample`: the same tokens, recomputing the full forward at every step."""
    return _sample_naive(model, params, jnp.asarray(cond_BD), rng,
                         **_settings(temperature, top_k, top_p, guidance_scale, greedy))
