"""The CLIP-conditioned prior: a GPT-style decoder over VQGAN tokens, p(image tokens | CLIP image embedding).

The sequence is `num_prefix_tokens` condition tokens (the L2-normalised CLIP embedding through one Dense layer, as
CLIP-GEN's official code) followed by the image tokens in raster order; position j's output predicts the token at
j + 1, so the last prefix position predicts the first image token and the last image token is never an input. With
`token_conditioning` a second Dense projection of the embedding is also added to every image token's embedding, so
each position sees the condition directly instead of only through attention to the prefix.

Blocks are pre-LayerNorm (attention, GELU MLP) with learned positional embeddings, a final LayerNorm and an untied
output head, initialised as GPT-2. Three switches reproduce CLIP-GEN's official prior (torch's
`nn.TransformerEncoderLayer(norm_first=True, activation=F.gelu)` blocks; clipgen_jax/models/clipgen_import.py):
`head_bias`, `exact_gelu` (erf instead of the tanh approximation) and `inner_dropout` (dropout also on the
attention probabilities and after the MLP's GELU: five places with the embeddings' and the two residual
branches'). Their defaults are the model every earlier bundle holds.

`__call__` is the training forward (all positions at once, causal); `prefill` and `decode` run the same weights
over a preallocated KV cache (`init_cache`) that they update in place, one jitted sampling loop with fixed shapes
(clipgen_jax.sampling). The cache is explicit, not a Flax collection, so that the scanned and unrolled layer stacks
share one layout: keys and values [depth, batch, positions, heads, head_dim].
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipgen_jax import numerics

LAYER_NORM_EPSILON = 1e-5  # GPT-2's
INIT_STDDEV = 0.02  # GPT-2's; residual projections are scaled by 1 / sqrt(2 * depth) on top

CONFIG_FIELDS = ("vocab_size", "num_tokens", "cond_dim", "width", "depth", "num_heads", "mlp_ratio",
                 "num_prefix_tokens", "token_conditioning", "dropout_rate", "scan_layers", "remat", "head_bias",
                 "exact_gelu", "inner_dropout")

# Architecture sizes; configs/prior.py holds the training recipes (and the Shapes prior's model).
PRESETS = {
    # CLIP-GEN's prior (GPT-2 medium) over a 16x16 grid of a 16384-code VQGAN, conditioned on ViT-B/32's 512-d space.
    "gpt2_medium": dict(vocab_size=16384, num_tokens=256, cond_dim=512, width=1024, depth=24, num_heads=16,
                        mlp_ratio=4, num_prefix_tokens=1, token_conditioning=False, dropout_rate=0.0,
                        scan_layers=False, remat=False, head_bias=False, exact_gelu=False, inner_dropout=False),
    "gpt2_large": dict(vocab_size=16384, num_tokens=256, cond_dim=512, width=1280, depth=36, num_heads=20,
                       mlp_ratio=4, num_prefix_tokens=1, token_conditioning=False, dropout_rate=0.0,
                       scan_layers=False, remat=False, head_bias=False, exact_gelu=False, inner_dropout=False),
}


class KVCache(NamedTuple):
    """Keys and values of every layer at every sequence position: [depth, batch, positions, heads, head_dim]; and
    each row's projected condition [batch, width] that `token_conditioning` adds to every image token."""
    keys: jax.Array
    values: jax.Array
    token_condition: jax.Array

    def write(self, layer, start, keys_BSHK, values_BSHK) -> KVCache:
        index = (layer, 0, start, 0, 0)
        return self._replace(
            keys=jax.lax.dynamic_update_slice(self.keys, keys_BSHK[None].astype(self.keys.dtype), index),
            values=jax.lax.dynamic_update_slice(self.values, values_BSHK[None].astype(self.values.dtype), index))

    def read(self, layer) -> tuple[jax.Array, jax.Array]:
        return (jax.lax.dynamic_index_in_dim(self.keys, layer, keepdims=False),
                jax.lax.dynamic_index_in_dim(self.values, layer, keepdims=False))


def _dense_init(stddev: float = INIT_STDDEV):
    return nn.initializers.normal(stddev)


class Dropout(nn.Module):
    """Inverted dropout drawing 16 random bits per element, two per threefry word: half the random words of
    nn.Dropout's float comparison, which took ~9 ms of a 62 ms Shapes training step on the 2-core CPU (16.9 against
    16.0 steps/s, benchmarks/prior_speed.py). The rate is rounded to a multiple of 2^-16 (0.1 -> 0.100006)."""
    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        threshold = round(self.rate * 2 ** 16)
        words = jax.random.bits(self.make_rng("dropout"), ((x.size + 1) // 2,), jnp.uint32)
        bits = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:x.size].reshape(x.shape)
        scale = 2 ** 16 / (2 ** 16 - threshold)
        return jnp.where(bits >= threshold, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))


class Block(nn.Module):
    """Pre-LayerNorm transformer block. `carry` is (activations [B, S, W], KVCache or None); without a cache it
    attends causally within the S positions, with one it writes this layer's keys and values at positions
    start .. start + S - 1 and attends to every cached position up to each query's own."""
    width: int
    num_heads: int
    mlp_ratio: int
    depth: int
    dropout_rate: float = 0.0
    exact_gelu: bool = False
    inner_dropout: bool = False
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, layer, start, deterministic: bool):
        x_BSW, cache = carry
        # Split over the batch when the caller sets logical axis rules (clipgen_jax.parallel.activation_sharding),
        # as the training step does; otherwise a no-op.
        x_BSW = nn.with_logical_constraint(x_BSW, ("batch", "length", "embed"))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        head_dim = self.width // self.num_heads
        residual_init = _dense_init(INIT_STDDEV / math.sqrt(2 * self.depth))

        h = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, name="attention_norm", **kw)(x_BSW)
        qkv = nn.DenseGeneral((3, self.num_heads, head_dim), kernel_init=_dense_init(), name="qkv", **kw)(h)
        q_BSHK, k_BSHK, v_BSHK = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if cache is None and self._drops_inside(deterministic):
            attended = self._causal_attention_with_dropout(q_BSHK, k_BSHK, v_BSHK)
        elif cache is None:
            attended = jax.nn.dot_product_attention(q_BSHK, k_BSHK, v_BSHK, is_causal=True,
                                                    implementation=self._causal_impl())
        else:
            cache = cache.write(layer, start, k_BSHK, v_BSHK)
            keys_BTHK, values_BTHK = cache.read(layer)
            query_pos = start + jnp.arange(x_BSW.shape[1])
            # Attending over all T cached positions, unwritten ones masked, keeps the reduction the same length
            # as in the training forward's causal attention over T: cached and full-recompute logits agree.
            mask_ST = jnp.arange(keys_BTHK.shape[1])[None, :] <= query_pos[:, None]
            attended = jax.nn.dot_product_attention(q_BSHK, keys_BTHK.astype(self.dtype),
                                                    values_BTHK.astype(self.dtype), mask=mask_ST[None, None])
        out = nn.DenseGeneral(self.width, axis=(-2, -1), kernel_init=residual_init, name="attention_out",
                              **kw)(attended)
        x_BSW = x_BSW + Dropout(self.dropout_rate)(out, deterministic=deterministic)

        h = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, name="mlp_norm", **kw)(x_BSW)
        h = nn.gelu(nn.Dense(self.width * self.mlp_ratio, kernel_init=_dense_init(), name="mlp_in", **kw)(h),
                    approximate=not self.exact_gelu)
        if self._drops_inside(deterministic):
            h = Dropout(self.dropout_rate, name="mlp_hidden_dropout")(h, deterministic=False)
        h = nn.Dense(self.width, kernel_init=residual_init, name="mlp_out", **kw)(h)
        x_BSW = x_BSW + Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return (x_BSW, cache), None

    def _drops_inside(self, deterministic: bool) -> bool:
        return self.inner_dropout and self.dropout_rate > 0 and not deterministic

    def _causal_attention_with_dropout(self, q_BSHK, k_BSHK, v_BSHK):
        """Causal attention with dropout on its probabilities (torch's nn.MultiheadAttention), which
        jax.nn.dot_product_attention has no option for: the training forward of `inner_dropout` only."""
        length = q_BSHK.shape[1]
        logits_BHST = jnp.einsum("bshk,bthk->bhst", q_BSHK, k_BSHK).astype(jnp.float32)
        logits_BHST = logits_BHST / math.sqrt(q_BSHK.shape[-1])
        causal_ST = jnp.tril(jnp.ones((length, length), jnp.bool_))
        probs_BHST = jax.nn.softmax(jnp.where(causal_ST, logits_BHST, -jnp.inf), axis=-1).astype(self.dtype)
        probs_BHST = Dropout(self.dropout_rate, name="attention_probs_dropout")(probs_BHST, deterministic=False)
        return jnp.einsum("bhst,bthk->bshk", probs_BHST, v_BSHK)

    def _causal_impl(self) -> str | None:
        """The causal kernel: with "auto", cuDNN flash attention where it applies (an NVIDIA GPU, 16-bit compute,
        head_dim a multiple of 8 up to 128), else XLA's; jax.nn.dot_product_attention's own default is always XLA's."""
        if self.attention_impl != "auto":
            return self.attention_impl
        head_dim = self.width // self.num_heads
        cudnn_ok = (jax.default_backend() == "gpu" and jnp.dtype(self.dtype) in (jnp.bfloat16, jnp.float16)
                    and head_dim % 8 == 0 and head_dim <= 128)
        return "cudnn" if cudnn_ok else "xla"


class Prior(nn.Module):
    """p(image tokens | CLIP embedding). See the module docstring for the sequence layout."""
    vocab_size: int
    num_tokens: int
    cond_dim: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: int = 4
    num_prefix_tokens: int = 1
    token_conditioning: bool = False
    dropout_rate: float = 0.0
    head_bias: bool = False
    exact_gelu: bool = False
    inner_dropout: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: bool = False
    attention_impl: str | None = "auto"  # the training forward's: "auto", "xla" or "cudnn" (see Block._causal_impl)

    @property
    def seq_len(self) -> int:
        """Positions the transformer sees: the prefix and every image token but the last."""
        return self.num_prefix_tokens + self.num_tokens - 1

    def setup(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.prefix = nn.Dense(self.num_prefix_tokens * self.width, kernel_init=_dense_init(), **kw)
        # Unit-norm scale, like the normalised embeddings it stands in for.
        self.null_embedding = self.param("null_embedding", nn.initializers.normal(1.0 / math.sqrt(self.cond_dim)),
                                         (self.cond_dim,), self.param_dtype)
        self.token_embedding = nn.Embed(self.vocab_size, self.width, embedding_init=_dense_init(), **kw)
        if self.token_conditioning:
            self.cond_to_tokens = nn.Dense(self.width, kernel_init=_dense_init(), **kw)
        self.position_embedding = self.param("position_embedding", _dense_init(), (self.seq_len, self.width),
                                             self.param_dtype)
        self.embedding_dropout = Dropout(self.dropout_rate)
        block = Block
        if self.remat:
            # prevent_cse is only needed outside scan, where XLA could otherwise merge the recomputation away.
            block = nn.remat(Block, static_argnums=(4,), prevent_cse=not self.scan_layers)
        block_kw = dict(width=self.width, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, depth=self.depth,
                        dropout_rate=self.dropout_rate, exact_gelu=self.exact_gelu, inner_dropout=self.inner_dropout,
                        attention_impl=self.attention_impl, **kw)
        if self.scan_layers:
            self.blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                                  in_axes=(0, nn.broadcast, nn.broadcast), length=self.depth)(**block_kw)
        else:
            self.blocks = [block(**block_kw) for _ in range(self.depth)]
        self.final_norm = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, **kw)
        self.head = nn.Dense(self.vocab_size, use_bias=self.head_bias, kernel_init=_dense_init(), **kw)

    def _embed_condition(self, cond_BD, use_null_B):
        """-> the prefix tokens [B, P, W], and the condition added to every image token [B, W] (zeros without
        token_conditioning)."""
        cond_BD = numerics.l2_normalise(cond_BD.astype(jnp.float32))
        if use_null_B is not None:
            cond_BD = jnp.where(use_null_B[:, None], self.null_embedding.astype(jnp.float32)[None], cond_BD)
        prefix_BPW = self.prefix(cond_BD).reshape(cond_BD.shape[0], self.num_prefix_tokens, self.width)
        if self.token_conditioning:
            return prefix_BPW, self.cond_to_tokens(cond_BD)
        return prefix_BPW, jnp.zeros((cond_BD.shape[0], self.width), prefix_BPW.dtype)

    def _embed_tokens(self, tokens_BS, token_condition_BW):
        embedded_BSW = self.token_embedding(tokens_BS)
        if self.token_conditioning:
            embedded_BSW = embedded_BSW + token_condition_BW[:, None].astype(embedded_BSW.dtype)
        return embedded_BSW

    def _trunk(self, x_BSW, start, cache: KVCache | None, deterministic: bool):
        """Embeddings at positions start .. start + S - 1 -> final-normed activations, and the updated cache."""
        positions = jax.lax.dynamic_slice_in_dim(self.position_embedding, start, x_BSW.shape[1])
        x_BSW = self.embedding_dropout(x_BSW + positions.astype(self.dtype), deterministic=deterministic)
        carry = (x_BSW, cache)
        if self.scan_layers:
            carry, _ = self.blocks(carry, jnp.arange(self.depth), start, deterministic)
        else:
            for layer, block in enumerate(self.blocks):
                carry, _ = block(carry, layer, start, deterministic)
        x_BSW, cache = carry
        return self.final_norm(x_BSW), cache

    def _logits(self, h):
        return nn.with_logical_constraint(self.head(h).astype(jnp.float32), ("batch", "length", "vocab"))

    def __call__(self, cond_BD, tokens_BL, *, use_null_B=None, deterministic=True):
        """float32 logits [B, L, vocab]: logits[:, i] predict tokens_BL[:, i] from the prefix and tokens[:, :i]."""
        prefix_BPW, token_condition_BW = self._embed_condition(cond_BD, use_null_B)
        inputs_BTW = jnp.concatenate([prefix_BPW, self._embed_tokens(tokens_BL[:, :-1], token_condition_BW)], axis=1)
        h_BTW, _ = self._trunk(inputs_BTW, 0, None, deterministic)
        return self._logits(h_BTW[:, self.num_prefix_tokens - 1:])

    def init_cache(self, batch_size: int) -> KVCache:
        """An empty cache for `batch_size` rows (needs no parameters: call it on the unbound module)."""
        shape = (self.depth, batch_size, self.seq_len, self.num_heads, self.width // self.num_heads)
        return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype),
                       jnp.zeros((batch_size, self.width), self.dtype))

    def prefill(self, cond_BD, cache: KVCache, *, use_null_B=None):
        """Runs the prefix into `cache`; returns the logits [B, vocab] of image token 0 and the cache."""
        prefix_BPW, token_condition_BW = self._embed_condition(cond_BD, use_null_B)
        cache = cache._replace(token_condition=token_condition_BW.astype(cache.token_condition.dtype))
        h_BPW, cache = self._trunk(prefix_BPW, 0, cache, True)
        return self._logits(h_BPW[:, -1]), cache

    def decode(self, tokens_B, index, cache: KVCache):
        """Feeds image token `index` (int32 [B]; after `prefill` and tokens 0 .. index - 1); returns the logits
        [B, vocab] of token index + 1 and the cache."""
        h_B1W, cache = self._trunk(self._embed_tokens(tokens_B[:, None], cache.token_condition),
                                   self.num_prefix_tokens + index, cache, True)
        return self._logits(h_B1W[:, 0]), cache


def from_config(model_config, dtype=jnp.float32) -> Prior:
    """A Prior from a config mapping with the fields in CONFIG_FIELDS; parameters are float32, compute in `dtype`."""
    fields = dict(model_config)
    unknown = set(fields) - set(CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"unknown prior model fields {sorted(unknown)}; known: {CONFIG_FIELDS}")
    return Prior(**fields, dtype=dtype, param_dtype=jnp.float32)


def init_params(model: Prior, rng: jax.Array):
    """Fresh parameters for `model`; under `jax.eval_shape`, their shapes."""
    cond_BD = jnp.zeros((1, model.cond_dim), jnp.float32)
    tokens_BL = jnp.zeros((1, model.num_tokens), jnp.int32)
    return model.init(rng, cond_BD, tokens_BL)["params"]


def stack_block_params(params, depth: int):
    """Unrolled-layer parameters (`blocks_0` .. `blocks_{depth-1}`) -> the `scan_layers=True` layout (`blocks`,
    each leaf with a leading depth axis)."""
    params = dict(params)
    layers = [params.pop(f"blocks_{i}") for i in range(depth)]
    params["blocks"] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)
    return params


def unstack_block_params(params, depth: int):
    """The inverse of `stack_block_params`."""
    params = dict(params)
    stacked = params.pop("blocks")
    for i in range(depth):
        params[f"blocks_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
    return params


def training_flops_per_token(model: Prior) -> float:
    """Training FLOPs (forward + backward) per image token, PaLM's convention (appendix B) for one sample:

        6 * (T * depth * N_block + L * width * vocab + cond_dim * C * width) + 12 * depth * T**2 * width

    divided by L, where P = num_prefix_tokens, C = P + 1 with token_conditioning (else P), L = num_tokens,
    T = P + L - 1 positions, and
    N_block = (4 + 2 * mlp_ratio) * width**2 the matmul weights of a block (qkv, attention output, MLP). The last term
    is attention's QK^T and AV (2 * 2 * T * width per position and layer, times 3 for training), counted over all
    T x T pairs although causal kernels may skip half. Embedding lookups, norms and biases are not counted.
    """
    prefix, tokens = model.num_prefix_tokens, model.num_tokens
    positions = prefix + tokens - 1
    block = (4 + 2 * model.mlp_ratio) * model.width**2
    matmul = positions * model.depth * block + tokens * model.width * model.vocab_size
    matmul += model.cond_dim * (prefix + model.token_conditioning) * model.width
    return (6 * matmul + 12 * model.depth * positions**2 * model.width) / tokens
