"""The official CLIP-GEN GPT's `sample()` (PyTorch, a full forward over the whole prefix at every step) against this
project's KV-cached sampler on the same weights, converted by clipgen_import, side by side in one process:

  python benchmarks/official_sampler_speed.py --official PATH_TO_A_CHECKOUT_OF_HFAiLab/clip-gen

Two shapes, with the official demo's sampling settings (temperature 1, top-k 500, top-p 0.95):
- tiny: a 4-layer, 256-wide GPT over 512 codes, all 256 tokens of --images images;
- gpt2_medium: the released prior's shape (24 layers, 1024 wide, 16 heads, 16384 codes), the first --medium_tokens
  tokens of --images images. This project's model then has its positions cut to those tokens (the first tokens'
  distribution is the same; its KV cache holds only them), as the official forward only ever sees the tokens so far.
Random weights: speed does not depend on them. This project's sampler is timed after its first call (which compiles;
reported apart); the official one after a warm-up call of two steps. The official code is imported from the checkout
(it is not part of this repository) and runs in float32 with torch's default threads. One JSON line is appended to
--out with both times and their ratio.
"""

import datetime
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags

from clipgen_jax import sampling
from clipgen_jax.models import clipgen_import
from clipgen_jax.models import prior as prior_lib

import results_file  # benchmarks/results_file.py (this script's folder is on sys.path)

_OFFICIAL = flags.DEFINE_string("official", None, "A checkout of github.com/HFAiLab/clip-gen.")
_IMAGES = flags.DEFINE_integer("images", 4, "Images sampled per call (one condition embedding each).")
_MEDIUM_TOKENS = flags.DEFINE_integer("medium_tokens", 32, "Tokens sampled at the gpt2_medium shape.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed calls of this project's sampler.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/official_sampler_speed.jsonl", "JSON-lines results file.")
flags.mark_flag_as_required("official")

SHAPES = {  # name -> (official GPT arguments, whether only the first --medium_tokens tokens are sampled)
    "tiny": (dict(vocab_size=512, n_layer=4, n_embed=256, n_head=4, block_size=256), False),
    "gpt2_medium": (dict(vocab_size=16384, n_layer=24, n_embed=1024, n_head=16, block_size=256), True),
}
TOP_K, TOP_P = 500, 0.95  # demo.py's


def _time_official(gpt, embed_BD: torch.Tensor, steps: int) -> float:
    with torch.no_grad():
        gpt.sample(embed_BD, steps=2, top_k=TOP_K, top_p=TOP_P)  # warm-up
        start = time.perf_counter()
        gpt.sample(embed_BD, steps=steps, top_k=TOP_K, top_p=TOP_P)
    return time.perf_counter() - start


def _time_ours(model: prior_lib.Prior, params, cond_BD: np.ndarray) -> tuple[float, float]:
    """(first call's seconds, compilation included; mean seconds of the timed calls)."""
    keys_B2 = sampling.row_keys(0, jnp.zeros(len(cond_BD)), jnp.arange(len(cond_BD)))

    def call():
        return jax.block_until_ready(sampling.sample(model, params, cond_BD, keys_B2, top_k=TOP_K, top_p=TOP_P))

    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(_REPEATS.value):
        call()
    return first, (time.perf_counter() - start) / _REPEATS.value


def _benchmark(name: str) -> dict:
    from models.gpt import GPT  # the official code, from --official

    arguments, first_tokens_only = SHAPES[name]
    torch.manual_seed(0)
    gpt = GPT(dropout=0.1, **arguments).eval()
    state_dict = {k: v.numpy() for k, v in gpt.state_dict().items()}
    model_config = clipgen_import.prior_config(state_dict, num_heads=arguments["n_head"])
    params = clipgen_import.prior_params(state_dict, model_config)
    del state_dict
    steps = _MEDIUM_TOKENS.value if first_tokens_only else model_config["num_tokens"]
    if first_tokens_only:
        model_config["num_tokens"] = steps
        params["position_embedding"] = params["position_embedding"][:steps]
    model = prior_lib.from_config(model_config)
    params = jax.tree.map(jnp.asarray, params)
    cond_BD = np.random.default_rng(0).standard_normal((_IMAGES.value, model.cond_dim)).astype(np.float32)
    cond_BD /= np.linalg.norm(cond_BD, axis=-1, keepdims=True)
    official_seconds = _time_official(gpt, torch.from_numpy(cond_BD), steps)
    del gpt
    first_seconds, ours_seconds = _time_ours(model, params, cond_BD)
    return {"shape": name, "vocab_size": model.vocab_size, "width": model.width, "depth": model.depth,
            "num_heads": model.num_heads, "images": _IMAGES.value, "tokens": steps,
            "official_seconds": official_seconds, "ours_seconds": ours_seconds,
            "ours_first_call_seconds": first_seconds,
            "speedup": official_seconds / ours_seconds}


def main(argv):
    del argv
    host_setting = results_file.set_up_host()
    sys.path.insert(0, _OFFICIAL.value)
    for name in SHAPES:
        result = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
                  "backend": jax.default_backend(), "torch": torch.__version__,
                  "torch_threads": torch.get_num_threads(),
                  "top_k": TOP_K, "top_p": TOP_P, **host_setting, **_benchmark(name)}
        results_file.append(_OUT.value, result)


if __name__ == "__main__":
    app.run(main)
