"""Sampling image tokens from the prior: a KV-cached loop and its full-recompute reference.

`sample` is one jit: the prefix is prefilled into a preallocated KV cache, then a `lax.fori_loop` feeds one token per
step, writing the cache in place, so shapes never change. The loop compiles once per (model, batch shape, greedy,
filtered, guided): temperature, top_k, top_p and the guidance scale are traced arguments, so a new value of any of
them reuses the compiled loop. `sample_naive` reruns the whole training forward at every step.

Random numbers are per row: row b draws step i from `fold_in(keys_B2[b], i)` (`row_keys` derives a row's key from
(seed, prompt index, candidate index)), so a row's tokens do not depend on the other rows or on the batch size. Both
samplers filter float32 logits identically, so for the same keys they give the same tokens; the only numerical
difference between them, and between batch sizes, is the shape of the matmuls: XLA may block a matmul differently
for another number of rows, the logits then differ in their last bits, and where two tokens are within that of a
tie (or a Gumbel draw falls within it) the choice can flip and the rest of that image follows.

Classifier-free guidance (`guidance_scale` s != 1) runs each condition twice in one batch of 2B rows, the second
copy with the model's learned null embedding, and samples from cond + (s - 1) * (cond - uncond), which is
uncond + s * (cond - uncond). s == 1 skips the null rows altogether: it is the unguided sampler, token for token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def row_keys(seed: int, prompt_index_R, candidate_index_R) -> jax.Array:
    """PRNG keys [R, 2]: row r's is fold_in(fold_in(PRNGKey(seed), prompt_index_R[r]), candidate_index_R[r])."""
    root = jax.random.PRNGKey(seed)
    return jax.vmap(lambda p, n: jax.random.fold_in(jax.random.fold_in(root, p), n))(
        jnp.asarray(prompt_index_R, jnp.int32), jnp.asarray(candidate_index_R, jnp.int32))


def filter_logits(logits_BV, *, temperature=1.0, top_k=None, top_p=None):
    """Logits divided by the temperature, with tokens outside the top k, then outside the nucleus (the smallest set
    of most likely tokens whose probability reaches top_p) set to -inf, as Hugging Face's warpers in that order.

    The three settings may be traced scalars; top_k >= V and top_p >= 1 keep every token (None skips the filter)."""
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k is None and top_p is None:
        return logits_BV
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    if top_k is not None:
        index = jnp.clip(top_k, 1, logits_BV.shape[-1]) - 1
        kth_B1 = jax.lax.dynamic_slice_in_dim(sorted_BV, index, 1, axis=1)
        sorted_BV = jnp.where(sorted_BV < kth_B1, -jnp.inf, sorted_BV)
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p is not None:
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # A token stays if the mass of the more likely ones is still short of top_p; the first always stays.
        keep_BV = ((jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p) | (top_p >= 1.0)
        threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
    return logits_BV


def guide(logits_RV, guidance_scale):
    """Rows [conditional; null] (R = 2B) -> guided logits [B, V]."""
    cond_BV, uncond_BV = jnp.split(logits_RV, 2, axis=0)
    return cond_BV + (guidance_scale - 1.0) * (cond_BV - uncond_BV)


def _choose(logits_RV, keys_B2, index, *, greedy: bool, filtered: bool, guided: bool, temperature, top_k, top_p,
            guidance_scale):
    """Row b's token at step `index` from the model's rows (with their null copies when guided)."""
    logits_BV = guide(logits_RV, guidance_scale) if guided else logits_RV
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = filter_logits(logits_BV, temperature=temperature, top_k=top_k if filtered else None,
                              top_p=top_p if filtered else None)
    step_keys_B2 = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B2, index)
    return jax.vmap(jax.random.categorical)(step_keys_B2, logits_BV).astype(jnp.int32)


def _model_rows(cond_BD, guided: bool):
    """The rows the model runs: the conditions, followed by null copies when guiding."""
    if not guided:
        return cond_BD, None
    batch = cond_BD.shape[0]
    use_null_R = jnp.concatenate([jnp.zeros((batch,), bool), jnp.ones((batch,), bool)])
    return jnp.concatenate([cond_BD, cond_BD], axis=0), use_null_R


_STATIC = ("model", "greedy", "filtered", "guided")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_cached(model, params, cond_BD, keys_B2, settings, *, greedy, filtered, guided):
    choose = functools.partial(_choose, keys_B2=keys_B2, greedy=greedy, filtered=filtered, guided=guided, **settings)
    variables = {"params": params}
    cond_RD, use_null_R = _model_rows(cond_BD, guided)
    rows = cond_RD.shape[0]
    logits_RV, cache = model.apply(variables, cond_RD, model.init_cache(rows), use_null_B=use_null_R,
                                   method=model.prefill)
    tokens_BL = jnp.zeros((cond_BD.shape[0], model.num_tokens), jnp.int32)
    tokens_BL = tokens_BL.at[:, 0].set(choose(logits_RV, index=0))

    def step(i, carry):
        tokens_BL, cache = carry
        previous_B = jax.lax.dynamic_index_in_dim(tokens_BL, i - 1, axis=1, keepdims=False)
        previous_R = jnp.tile(previous_B, rows // previous_B.shape[0])
        logits_RV, cache = model.apply(variables, previous_R, i - 1, cache, method=model.decode)
        new_B1 = choose(logits_RV, index=i)[:, None]
        return jax.lax.dynamic_update_slice_in_dim(tokens_BL, new_B1, i, axis=1), cache

    tokens_BL, _ = jax.lax.fori_loop(1, model.num_tokens, step, (tokens_BL, cache))
    return tokens_BL


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_naive(model, params, cond_BD, keys_B2, settings, *, greedy, filtered, guided):
    choose = functools.partial(_choose, keys_B2=keys_B2, greedy=greedy, filtered=filtered, guided=guided, **settings)
    cond_RD, use_null_R = _model_rows(cond_BD, guided)
    rows = cond_RD.shape[0]

    def step(i, tokens_BL):
        # Positions after i hold zeros; causality keeps them from reaching logits[:, i].
        logits_RLV = model.apply({"params": params}, cond_RD, jnp.tile(tokens_BL, (rows // tokens_BL.shape[0], 1)),
                                 use_null_B=use_null_R)
        logits_RV = jax.lax.dynamic_index_in_dim(logits_RLV, i, axis=1, keepdims=False)
        new_B1 = choose(logits_RV, index=i)[:, None]
        return jax.lax.dynamic_update_slice_in_dim(tokens_BL, new_B1, i, axis=1)

    return jax.lax.fori_loop(0, model.num_tokens, step, jnp.zeros((cond_BD.shape[0], model.num_tokens), jnp.int32))


def _arguments(model, cond_BD, keys_B2, temperature, top_k, top_p, guidance_scale, greedy) -> dict:
    """The jitted samplers' arguments: the settings checked, traced as fixed-dtype scalars (a new value compiles
    nothing), and the three static switches (each of which does)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    cond_BD, keys_B2 = jnp.asarray(cond_BD), jnp.asarray(keys_B2)
    if keys_B2.shape != (cond_BD.shape[0], 2):
        raise ValueError(f"keys_B2 must be one PRNG key per row, [{cond_BD.shape[0]}, 2]; got {keys_B2.shape}")
    greedy = bool(greedy) or temperature == 0
    settings = dict(temperature=np.float32(1.0 if greedy else temperature),
                    top_k=np.int32(model.vocab_size if top_k is None else min(top_k, model.vocab_size)),
                    top_p=np.float32(1.0 if top_p is None else top_p), guidance_scale=np.float32(guidance_scale))
    return dict(model=model, cond_BD=cond_BD, keys_B2=keys_B2, settings=settings, greedy=greedy,
                filtered=not greedy and (top_k is not None or top_p is not None), guided=guidance_scale != 1.0)


def sample(model, params, cond_BD, keys_B2, *, temperature=1.0, top_k=None, top_p=None, guidance_scale=1.0,
           greedy=False):
    """Image tokens int32 [B, num_tokens] for CLIP embeddings cond_BD [B, cond_dim] (normalised or not: the model
    normalises), row b drawn with the PRNG key keys_B2[b] (`row_keys`). temperature 0 or `greedy` takes the argmax;
    guidance_scale != 1 is classifier-free guidance."""
    return _sample_cached(params=params, **_arguments(model, cond_BD, keys_B2, temperature, top_k, top_p,
                                                      guidance_scale, greedy))


def sample_naive(model, params, cond_BD, keys_B2, *, temperature=1.0, top_k=None, top_p=None, guidance_scale=1.0,
                 greedy=False):
    """The reference for `sample`: the same tokens, recomputing the full forward at every step."""
    return _sample_naive(params=params, **_arguments(model, cond_BD, keys_B2, temperature, top_k, top_p,
                                                     guidance_scale, greedy))
