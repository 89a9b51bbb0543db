"""Imports CLIP-GEN's official PyTorch models (github.com/HFAiLab/clip-gen: `vqgan_coco.pt`, `gpt_coco.pt`, each
`torch.save({'model': state_dict, 'epoch': ..., ...})`) as a VQGAN bundle and a prior bundle.

The architecture is read from the state dicts' names and shapes; only the prior's head count is not in the weights
(`HEADS_BY_WIDTH` holds the released sizes). What maps onto what:
- VQGAN (taming-like, `nn.Sequential` indices instead of taming's names): the encoder's last conv1x1
  (`encoder.final.3`) is this project's `quant_conv`, the decoder's first (`decoder.quant_conv_in`) its
  `post_quant_conv`; a one-head `nn.MultiheadAttention` is the same computation as taming's q/k/v/proj_out 1x1 convs
  (its `in_proj` rows are q, k and v); GroupNorm keeps torch's epsilon 1e-5. The quantizer is an unnormalised
  codebook (nearest by L2) trained with mse(z, sg zq) + 0.2 mse(sg z, zq): `legacy_beta=True, beta=0.2` here.
  The discriminator's weights (`discriminator.*`, BatchNorm buffers included) are not part of the tokenizer.
- GPT: `cond_proj` is the one prefix token's projection, `pos_emb` the 256 positions (the prefix and 255 input
  tokens), each block `nn.TransformerEncoderLayer(norm_first=True, activation=F.gelu)`: the prior with `exact_gelu`,
  `head_bias` and `inner_dropout` (clipgen_jax/models/prior.py). Its causal-mask buffers (`blocks.N.mask`) are not
  weights. The official prior has no null embedding: it is zeros here, and the bundle records condition dropout 0
  (no classifier-free guidance).
The files are read by `taming_import.read_state_dict` (torch's `weights_only` loader or the restricted reader: no code
named by a file runs).
"""

from __future__ import annotations

import math
import pathlib
import re
import shutil
from typing import Any, Mapping

import jax
import numpy as np

from clipgen_jax import checkpointing, pipeline
from clipgen_jax.data import precomputed
from clipgen_jax.models import clip as clip_lib
from clipgen_jax.models import prior as prior_lib
from clipgen_jax.models import taming_import, vqgan
from clipgen_jax.models.taming_import import Reader, Source, StateDict

# The released priors' head counts by width: models/gpt.py's gpt2_medium and gpt2_large.
HEADS_BY_WIDTH = {1024: 16, 1280: 20}
DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # the weights of OpenAI's ViT-B/32, which the official code uses
OFFICIAL_DROPOUT = 0.1  # train_gpt.py's --dropout default
OFFICIAL_BETA = 0.2  # models/quantizer.py
TORCH_NORM_EPSILON = 1e-5  # nn.GroupNorm's default
VQGAN_DIR = "vqgan"  # the VQGAN bundle, inside the prior bundle that `convert` writes
IGNORED_VQGAN_KEYS = re.compile(r"discriminator\.")
IGNORED_GPT_KEYS = re.compile(r"blocks\.\d+\.mask$")
# The ResnetBlock's nn.Sequential: GroupNorm, SiLU, conv, GroupNorm, SiLU, Dropout, conv.
_RESNET_LAYERS = {"norm1": "block.0", "conv1": "block.2", "norm2": "block.3", "conv2": "block.6",
                  "nin_shortcut": "shortcut"}
_QKV = ("q", "k", "v")


class ClipgenImportError(taming_import.CheckpointImportError):
    """The checkpoint is not a CLIP-GEN model that this project's VQGAN and prior can reproduce."""


def _require(state_dict: Mapping[str, np.ndarray], key: str, what: str) -> np.ndarray:
    if key not in state_dict:
        raise ClipgenImportError(f"the state dict has no {key}: it is not CLIP-GEN's {what}")
    return state_dict[key]


def _identity(value: np.ndarray) -> np.ndarray:
    return value


# ---------------------------------------------------------------------------------------------------------------------
# The VQGAN.

def _sequential_modules(state_dict: Mapping[str, np.ndarray], prefix: str) -> list[tuple[int, str]]:
    """(index, kind) of the modules of the nn.Sequential at `prefix` ("encoder.down."): "block" (ResnetBlock),
    "attn" (AttnBlock) or "resample" (Downsample/Upsample)."""
    indices = sorted({int(m.group(1)) for key in state_dict if (m := re.match(re.escape(prefix) + r"(\d+)\.", key))})
    modules = []
    for index in indices:
        module = f"{prefix}{index}."
        if module + "attn.in_proj_weight" in state_dict:
            modules.append((index, "attn"))
        elif module + "block.0.weight" in state_dict:
            modules.append((index, "block"))
        elif module + "conv.weight" in state_dict:
            modules.append((index, "resample"))
        else:
            raise ClipgenImportError(f"{prefix}{index} is neither a ResnetBlock, an AttnBlock nor a resampling conv")
    return modules


def vqgan_config(state_dict: Mapping[str, np.ndarray], grid_side: int) -> dict[str, Any]:
    """This project's VQGAN fields for an official VQGAN state dict whose code grid is `grid_side` square (the prior's
    positions tell it; the official Encoder's resolution 256 and attention at 16 px are not in the weights)."""
    ch = _require(state_dict, "encoder.conv_in.weight", "VQGAN").shape[0]
    codebook_KD = _require(state_dict, "quantizer.embedding.weight", "VQGAN")
    levels: list[list[str]] = [[]]
    ch_mult = []
    for index, kind in _sequential_modules(state_dict, "encoder.down."):
        if kind == "resample":
            levels.append([])
            continue
        if kind == "block" and not levels[-1]:
            ch_mult.append(state_dict[f"encoder.down.{index}.block.6.weight"].shape[0] // ch)
        levels[-1].append(kind)
    blocks_per_level = {level.count("block") for level in levels}
    if len(blocks_per_level) != 1 or len(ch_mult) != len(levels):
        raise ClipgenImportError(f"encoder.down does not have the same number of ResnetBlocks at each of its "
                                 f"{len(levels)} levels")
    resolution = grid_side * 2 ** (len(levels) - 1)
    return {
        "ch": int(ch), "ch_mult": ch_mult, "num_res_blocks": blocks_per_level.pop(),
        "attn_resolutions": [resolution // 2 ** level for level, kinds in enumerate(levels) if "attn" in kinds],
        "z_channels": int(_require(state_dict, "encoder.final.2.weight", "VQGAN").shape[0]),
        "resolution": resolution, "codebook_size": int(codebook_KD.shape[0]), "code_dim": int(codebook_KD.shape[1]),
        "quantizer": "vq", "beta": OFFICIAL_BETA, "legacy_beta": True, "norm_epsilon": TORCH_NORM_EPSILON,
    }


def _vqgan_modules(model_config: Mapping[str, Any]) -> dict[tuple[str, ...], str]:
    """This project's VQGAN module paths -> the official module names, in the official construction order."""
    levels = len(model_config["ch_mult"])
    attention = [model_config["resolution"] // 2 ** level in model_config["attn_resolutions"]
                 for level in range(levels)]
    modules = {("quant_conv",): "encoder.final.3", ("post_quant_conv",): "decoder.quant_conv_in"}
    for tower in ("encoder", "decoder"):
        modules.update({(tower, "conv_in"): f"{tower}.conv_in", (tower, "mid_block_1"): f"{tower}.mid.0",
                        (tower, "mid_attn_1"): f"{tower}.mid.1", (tower, "mid_block_2"): f"{tower}.mid.2",
                        (tower, "norm_out"): f"{tower}.final.0", (tower, "conv_out"): f"{tower}.final.2"})
    for tower, part, order, blocks, resample, last in (
            ("encoder", "down", range(levels), model_config["num_res_blocks"], "downsample", levels - 1),
            ("decoder", "up", reversed(range(levels)), model_config["num_res_blocks"] + 1, "upsample", 0)):
        names = []  # the tower's nn.Sequential, in order
        for level in order:
            for i in range(blocks):
                names += [f"{part}_{level}_block_{i}"] + ([f"{part}_{level}_attn_{i}"] if attention[level] else [])
            names += [f"{part}_{level}_{resample}"] if level != last else []
        # Downsample and Upsample wrap their conv.
        modules.update({(tower, name): f"{tower}.{part}.{index}" + (".conv" if name.endswith(resample) else "")
                        for index, name in enumerate(names)})
    return modules


def _vqgan_source(modules: Mapping[tuple[str, ...], str], path: tuple[str, ...], shape: tuple[int, ...]) -> Source:
    *module_path, leaf = path
    if leaf == "codebook":
        return "quantizer.embedding.weight", shape, _identity
    cut = next(cut for cut in range(len(module_path), 0, -1) if tuple(module_path[:cut]) in modules)
    module, inner = modules[tuple(module_path[:cut])], module_path[cut:]
    suffix = "weight" if leaf in ("kernel", "scale") else "bias"
    if inner and inner[0] in _QKV:  # one slice of the attention's fused in_proj, as a 1x1 conv
        j, channels = _QKV.index(inner[0]), shape[-1]
        rows = slice(j * channels, (j + 1) * channels)
        if leaf == "kernel":
            return (f"{module}.attn.in_proj_weight", (3 * channels, channels),
                    lambda value: value[rows].T[None, None])
        return f"{module}.attn.in_proj_bias", (3 * channels,), lambda value: value[rows]
    if inner == ["proj_out"]:
        if leaf == "kernel":
            return f"{module}.attn.out_proj.weight", shape[2:][::-1], lambda value: value.T[None, None]
        return f"{module}.attn.out_proj.bias", shape, _identity
    if inner:
        module += "." + _RESNET_LAYERS.get(inner[0], inner[0])
    if leaf == "kernel":
        return (f"{module}.{suffix}", tuple(shape[i] for i in taming_import._KERNEL_TO_TORCH),
                lambda value: np.transpose(value, taming_import._KERNEL_FROM_TORCH))
    return f"{module}.{suffix}", shape, _identity


def vqgan_params(state_dict: Mapping[str, np.ndarray], model_config: Mapping[str, Any]) -> Any:
    """The VQGAN params for an official VQGAN state dict; one line naming any missing, unexpected or mis-shaped
    tensor."""
    model = vqgan.from_config(model_config)
    abstract = jax.eval_shape(lambda: vqgan.init_params(model, jax.random.PRNGKey(0)))
    modules = _vqgan_modules(model_config)
    return taming_import.gather_params(
        state_dict, abstract, lambda path, shape: _vqgan_source(modules, path, shape), ignored=IGNORED_VQGAN_KEYS,
        error=ClipgenImportError, what="CLIP-GEN's VQGAN with the architecture its tensors imply")


# ---------------------------------------------------------------------------------------------------------------------
# The prior.

def prior_config(state_dict: Mapping[str, np.ndarray], num_heads: int | None = None) -> dict[str, Any]:
    """This project's prior fields for an official GPT state dict. `num_heads` is not in the weights: None takes it
    from `HEADS_BY_WIDTH` (the released sizes) and is refused for other widths."""
    vocab_size, width = _require(state_dict, "tok_emb.weight", "GPT").shape
    depth = len({m.group(1) for key in state_dict if (m := re.match(r"blocks\.(\d+)\.encoder\.", key))})
    if num_heads is None:
        if width not in HEADS_BY_WIDTH:
            known = ", ".join(f"{w} wide: {h} heads" for w, h in HEADS_BY_WIDTH.items())
            raise ClipgenImportError(f"the GPT is {width} wide; the head count is known only for the released sizes "
                                     f"({known}): give it (--heads)")
        num_heads = HEADS_BY_WIDTH[width]
    if num_heads < 1 or width % num_heads:
        raise ClipgenImportError(f"the GPT's width {width} is not a multiple of {num_heads} heads")
    hidden = _require(state_dict, "blocks.0.encoder.linear1.weight", "GPT").shape[0]
    return {"vocab_size": int(vocab_size), "num_tokens": int(_require(state_dict, "pos_emb", "GPT").shape[1]),
            "cond_dim": int(_require(state_dict, "cond_proj.weight", "GPT").shape[1]), "width": int(width),
            "depth": depth, "num_heads": int(num_heads), "mlp_ratio": hidden // width, "num_prefix_tokens": 1,
            "token_conditioning": False, "dropout_rate": OFFICIAL_DROPOUT, "scan_layers": False, "remat": False,
            "head_bias": True, "exact_gelu": True, "inner_dropout": True}


# This project's prior module names -> the official ones (per block: nn.TransformerEncoderLayer's).
_PRIOR_MODULES = {"prefix": "cond_proj", "final_norm": "norm", "head": "head", "attention_norm": "encoder.norm1",
                  "mlp_norm": "encoder.norm2", "mlp_in": "encoder.linear1", "mlp_out": "encoder.linear2",
                  "qkv": "encoder.self_attn.in_proj", "attention_out": "encoder.self_attn.out_proj"}


def _prior_source(path: tuple[str, ...], shape: tuple[int, ...]) -> Source:
    if path == ("token_embedding", "embedding"):
        return "tok_emb.weight", shape, _identity
    if path == ("position_embedding",):
        return "pos_emb", (1, *shape), lambda value: value[0]
    *modules, leaf = path
    block = [f"blocks.{modules[0].removeprefix('blocks_')}"] if modules[0].startswith("blocks_") else []
    name = ".".join(block + [_PRIOR_MODULES[modules[-1]]])
    if modules[-1] == "qkv":  # in_proj: [3 * width, width] = (q, k, v) x heads x head_dim rows
        if leaf == "kernel":
            return f"{name}_weight", (math.prod(shape[1:]), shape[0]), lambda value: value.T.reshape(shape)
        return f"{name}_bias", (math.prod(shape),), lambda value: value.reshape(shape)
    if leaf == "kernel":  # Dense [in, out] (attention_out: [heads, head_dim, width]) <- Linear [out, in]
        return (f"{name}.weight", (shape[-1], math.prod(shape[:-1])),
                lambda value: value.T.reshape(shape))
    return f"{name}.{'weight' if leaf == 'scale' else 'bias'}", shape, _identity


def prior_params(state_dict: Mapping[str, np.ndarray], model_config: Mapping[str, Any]) -> Any:
    """The prior params for an official GPT state dict (the null embedding, which it has not, zeros); one line naming
    any missing, unexpected or mis-shaped tensor."""
    model = prior_lib.from_config(model_config)
    abstract = dict(jax.eval_shape(lambda: prior_lib.init_params(model, jax.random.PRNGKey(0))))
    null_embedding = abstract.pop("null_embedding")
    params = taming_import.gather_params(state_dict, abstract, _prior_source, ignored=IGNORED_GPT_KEYS,
                                         error=ClipgenImportError,
                                         what="CLIP-GEN's GPT with the architecture its tensors imply")
    return {**params, "null_embedding": np.zeros(null_embedding.shape, np.float32)}


# ---------------------------------------------------------------------------------------------------------------------
# The whole conversion.

def clip_identity(clip: str, cond_dim: int) -> dict[str, Any]:
    """The identity the prior bundle records for its CLIP: with weights hashed when `clip` is a local directory or a
    packaged CLIP (loaded here); a Hub id is not fetched, so its weights are unverified (`weights_hash` None: loading
    the prior warns, and checks nothing else about that CLIP)."""
    if clip in clip_lib.PACKAGED or pathlib.Path(clip).is_dir():
        identity = precomputed.clip_identity(clip_lib.load(clip))
        if identity["embed_dim"] != cond_dim:
            raise ClipgenImportError(f"the CLIP {clip} makes {identity['embed_dim']}-d embeddings, but the GPT is "
                                     f"conditioned on {cond_dim}-d ones")
        return identity
    return {"name": clip, "weights_hash": None, "embed_dim": cond_dim}


def convert(vqgan_ckpt: str | pathlib.Path, gpt_ckpt: str | pathlib.Path, out_dir: str | pathlib.Path, *,
            num_heads: int | None = None, clip: str = DEFAULT_CLIP, reader: Reader = "auto") -> pathlib.Path:
    """Writes the official GPT as a prior bundle in `out_dir` (which must not exist yet) and the official VQGAN as a
    VQGAN bundle in `out_dir/vqgan`, which the prior's metadata names, with the CLIP `clip`. Returns `out_dir`."""
    vqgan_ckpt, gpt_ckpt, out_dir = pathlib.Path(vqgan_ckpt), pathlib.Path(gpt_ckpt), pathlib.Path(out_dir).absolute()
    # Checked before the (GB-sized) checkpoints are read; save_bundle checks again.
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose a new output directory or remove it")
    prior_model, params = _from_file(gpt_ckpt, reader, lambda state_dict: _prior(state_dict, num_heads))
    grid_side = math.isqrt(prior_model["num_tokens"])
    vqgan_model, vqgan_weights = _from_file(vqgan_ckpt, reader, lambda state_dict: _vqgan(state_dict, grid_side))
    if vqgan_model["codebook_size"] != prior_model["vocab_size"]:
        raise ClipgenImportError(f"the VQGAN {vqgan_ckpt} has {vqgan_model['codebook_size']} codes but the GPT "
                                 f"{gpt_ckpt} models {prior_model['vocab_size']}: they are not a pair")
    vqgan_path = out_dir / VQGAN_DIR
    identities = {"vqgan": precomputed.vqgan_identity(vqgan_path, vqgan_weights, vqgan_model),
                  "clip": clip_identity(clip, prior_model["cond_dim"])}
    source = {"format": "clipgen", "ckpt": str(gpt_ckpt.absolute()), "sha256": taming_import.file_sha256(gpt_ckpt)}
    metadata = pipeline.prior_metadata(
        {"model": prior_model, "clip": clip, "data": {}, "seed": None,
         "cond": {"source": "image", "noise": 0.0, "dropout": 0.0, "reconstruction_weight": 0.0}},
        vqgan_path=vqgan_path, step=0, identities=identities, bundle_dir=out_dir)
    checkpointing.save_bundle(out_dir, params, {**metadata, "source": source})
    try:
        checkpointing.save_bundle(vqgan_path, vqgan_weights, {
            "kind": "vqgan", "model": vqgan_model,
            "source": {"format": "clipgen", "ckpt": str(vqgan_ckpt.absolute()),
                       "sha256": taming_import.file_sha256(vqgan_ckpt)}})
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)  # a prior without its VQGAN is no use
        raise
    return out_dir


def _prior(state_dict: StateDict, num_heads: int | None) -> tuple[dict[str, Any], Any]:
    model_config = prior_config(state_dict, num_heads)
    if math.isqrt(model_config["num_tokens"]) ** 2 != model_config["num_tokens"]:
        raise ClipgenImportError(f"the GPT has {model_config['num_tokens']} positions, not a square grid of tokens")
    return model_config, prior_params(state_dict, model_config)


def _vqgan(state_dict: StateDict, grid_side: int) -> tuple[dict[str, Any], Any]:
    model_config = vqgan_config(state_dict, grid_side)
    return model_config, vqgan_params(state_dict, model_config)


def _from_file(path: pathlib.Path, reader: Reader, convert_state_dict) -> tuple[dict[str, Any], Any]:
    """(model config, params) of the checkpoint at `path`; an error names the file."""
    state_dict = taming_import.read_state_dict(path, reader=reader)
    try:
        return convert_state_dict(state_dict)
    except ClipgenImportError as error:
        raise ClipgenImportError(f"{path}: {error}") from None
