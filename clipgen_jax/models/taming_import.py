"""Imports a taming-transformers VQGAN (a PyTorch Lightning `.ckpt` and its model YAML) as an inference bundle; the
reader and the state-dict mapping are shared with clipgen_jax.models.clipgen_import (CLIP-GEN's official models).

Three steps, each usable alone:
- `read_state_dict`: the checkpoint's state dict (its `state_dict` or `model` entry, or the whole file) as numpy
  arrays. With torch installed,
  `torch.load(weights_only=True)` reads it; otherwise, or when torch refuses the file (taming's released checkpoints
  hold a Lightning callback class, which `weights_only` rejects), a restricted unpickler reads the zip archive
  itself. That reader resolves only tensor-rebuild functions and storage-type names, all bound to this module's own
  numpy stand-ins, so no code named by the file is ever run.
- `model_config_from_yaml`: taming's `model.params` (ddconfig, n_embed, embed_dim) as this project's VQGAN fields.
- `params_from_state_dict`: the state dict laid onto the VQGAN param tree (conv kernels transposed to HWIO), with a
  clear error for missing, unexpected or mis-shaped entries.
`convert` runs all three and writes a bundle that `clipgen_jax.checkpointing.load_vqgan` reads.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
import pickle
import re
import zipfile
from typing import Any, Callable, Literal, Mapping

import flax
import jax
import ml_dtypes
import numpy as np
import yaml

from clipgen_jax import checkpointing, safe_pickle
from clipgen_jax.models import vqgan

logger = logging.getLogger(__name__)

Reader = Literal["auto", "torch", "restricted"]
READERS = ("auto", "torch", "restricted")  # for command-line flags
READER_HELP = ("How to read the checkpoint: torch.load(weights_only=True), the restricted reader (no torch needed), or "
               "auto (torch when installed and it accepts the file).")
StateDict = dict[str, np.ndarray]
# Where a param comes from: the state-dict key, that tensor's shape there, and the function from it to the param.
Source = tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]

# taming's VQModel builds its VectorQuantizer2 with beta 0.25 and the default legacy=True (beta on the codebook term).
TAMING_BETA = 0.25
TAMING_LEGACY_BETA = True
# The discriminator and LPIPS weights of taming's training loss: not part of the tokenizer.
IGNORED_KEYS = re.compile(r"loss\.")
SUPPORTED_TARGETS = ("taming.models.vqgan.VQModel",)


class CheckpointImportError(ValueError):
    """A torch checkpoint that cannot be read, or whose tensors do not match the model it should hold."""


class TamingImportError(CheckpointImportError):
    """The checkpoint or config is not a taming VQGAN that this project's VQGAN can reproduce."""


def _some(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------------------------------
# Reading the checkpoint.

# Storage types name the element type of the raw bytes that follow; each stands in as its numpy dtype.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


def _rebuild_tensor(storage: np.ndarray, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    requires_grad: bool, backward_hooks: Any, metadata: Any = None) -> np.ndarray:
    """Stand-in for `torch._utils._rebuild_tensor_v2`: a read-only strided view of the storage. The bounds are
    checked first, since a strided view past the storage would read arbitrary memory."""
    del requires_grad, backward_hooks
    if metadata:
        raise pickle.UnpicklingError(f"tensors with conjugate/negative bits ({metadata}) are not supported")
    layout = (storage_offset, *size, *stride) if isinstance(size, tuple) and isinstance(stride, tuple) else (None,)
    if (not isinstance(storage, np.ndarray) or len(size) != len(stride)
            or not all(isinstance(n, int) and n >= 0 for n in layout)):
        raise pickle.UnpicklingError(f"invalid tensor: offset {storage_offset!r}, size {size!r}, stride {stride!r}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise pickle.UnpicklingError(f"tensor of size {size} (offset {storage_offset}, stride {stride}) reaches past "
                                     f"its storage of {storage.size} elements")
    return np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=size,
                                           strides=[s * storage.itemsize for s in stride], writeable=False)


def _rebuild_parameter(data: np.ndarray, requires_grad: bool, backward_hooks: Any) -> np.ndarray:
    """Stand-in for `torch._utils._rebuild_parameter`: a parameter is just its data here."""
    del requires_grad, backward_hooks
    return data


class _IgnoredLightningClass:
    """Stand-in for the Lightning callback classes that Lightning < 1.5 used as dict keys in a checkpoint's
    `callbacks` entry (taming's released checkpoints have `ModelCheckpoint`). Only referenced, never called."""


_RESTRICTED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): dtype for name, dtype in _STORAGE_DTYPES.items()},
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"): _IgnoredLightningClass,
    ("pytorch_lightning.callbacks.early_stopping", "EarlyStopping"): _IgnoredLightningClass,
}


# The entries that hold the model's state dict beside training state (optimizer, epoch, ...): Lightning's, and
# `torch.save({'model': state_dict, ...})`'s (CLIP-GEN's releases).
_STATE_DICT_ENTRIES = ("state_dict", "model")


def _state_dict_of(checkpoint: Any, path: pathlib.Path) -> Mapping[str, Any]:
    """The checkpoint's `state_dict` or `model` entry, or the checkpoint itself when it is a bare state dict."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointImportError(f"{path} holds no state dict (a {type(checkpoint).__name__}, not a dict)")
    for entry in _STATE_DICT_ENTRIES:
        if isinstance(checkpoint.get(entry), Mapping):
            return checkpoint[entry]
    return checkpoint


def _read_restricted(path: pathlib.Path) -> Mapping[str, Any]:
    """The state dict, unpickled with `_RESTRICTED_GLOBALS` only; tensors come back as numpy arrays."""
    if not zipfile.is_zipfile(path):
        raise CheckpointImportError(
            f"{path} is not a zip-format torch checkpoint, the only format the restricted reader reads (torch < 1.6 "
            f"wrote a legacy format, which only the torch reader reads)")
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        pickles = [name for name in names if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointImportError(f"{path} is a zip file but not a torch checkpoint (no single <name>/data.pkl)")
        prefix = pickles[0].removesuffix("data.pkl")
        big_endian = f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() == b"big"
        storages: dict[str, np.ndarray] = {}

        def load_storage(pid: Any) -> np.ndarray:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                    and isinstance(pid[1], np.dtype)):
                raise safe_pickle.UnsafePickleError(f"{path} has an unknown persistent id {pid!r}")
            _, dtype, key, _location, numel = pid
            if f"{prefix}data/{key}" not in names:
                raise pickle.UnpicklingError(f"{path} has no storage {key!r}")
            if key not in storages:
                data = archive.read(f"{prefix}data/{key}")
                if len(data) != numel * dtype.itemsize:
                    raise pickle.UnpicklingError(
                        f"{path}: storage {key} holds {len(data)} bytes, expected {numel} x {dtype.itemsize}")
                storages[key] = np.frombuffer(data, dtype.newbyteorder(">" if big_endian else "<"))
            return storages[key]

        checkpoint = safe_pickle.restricted_load(archive.read(pickles[0]), _RESTRICTED_GLOBALS, source=str(path),
                                      persistent_load=load_storage)
    return _state_dict_of(checkpoint, path)


def _read_with_torch(path: pathlib.Path) -> Mapping[str, Any]:
    """The state dict via `torch.load(weights_only=True)`, tensors converted to numpy arrays."""
    import torch

    def to_numpy(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        value = value.detach()
        return value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()

    state_dict = _state_dict_of(torch.load(path, weights_only=True, map_location="cpu"), path)
    return {key: to_numpy(value) for key, value in state_dict.items()}


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def read_state_dict(ckpt_path: str | pathlib.Path, *, reader: Reader = "auto") -> StateDict:
    """The state dict of a Lightning `.ckpt`, of a `torch.save({'model': state_dict, ...})` file or a bare state dict
    saved with `torch.save`, as numpy arrays (the restricted reader's are read-only views of the file's storages).
    The file's other entries (optimizer state, epoch, ...) are read but not returned.

    `reader`: "torch" (`torch.load(weights_only=True)`), "restricted" (this module's own reader, no torch needed) or
    "auto" (torch when installed and it accepts the file, else the restricted reader).
    """
    path = pathlib.Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if reader == "torch" or (reader == "auto" and _torch_available()):
        try:
            state_dict = _read_with_torch(path)
        except pickle.UnpicklingError:
            if reader == "torch":
                raise
            logger.info("torch.load(weights_only=True) refused %s; reading it with the restricted reader", path)
            state_dict = _read_restricted(path)
    elif reader in ("auto", "restricted"):
        state_dict = _read_restricted(path)
    else:
        raise ValueError(f"reader {reader!r} is not one of 'auto', 'torch', 'restricted'")
    not_arrays = sorted(k for k, v in state_dict.items() if not isinstance(v, np.ndarray))
    if not_arrays:
        raise CheckpointImportError(f"{path}: the state dict has non-tensor entries: {_some(not_arrays)}")
    return dict(state_dict)


# ---------------------------------------------------------------------------------------------------------------------
# The model config.

# ddconfig settings this project's VQGAN has no field for: (key, taming's default, the only value it implements).
_FIXED_DDCONFIG = (("double_z", True, False), ("in_channels", None, 3), ("out_ch", None, 3),
                   ("resamp_with_conv", True, True), ("give_pre_end", False, False), ("tanh_out", False, False),
                   ("use_linear_attn", False, False), ("attn_type", "vanilla", "vanilla"))


def _setting(section: Mapping[str, Any], key: str, where: str, default: Any = None) -> Any:
    """An integer (or list of integers) setting of the YAML; required unless it has a default."""
    value = section.get(key, default)
    if value is None:
        raise TamingImportError(f"the config has no {where}.{key}")
    values = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TamingImportError(f"{where}.{key} is {value!r}; expected integers")
    return list(value) if isinstance(value, (list, tuple)) else value


def model_config_from_taming(taming_config: Any) -> dict[str, Any]:
    """This project's VQGAN fields (see `vqgan.VQGAN`) for a parsed taming model YAML. Settings that the VQGAN
    cannot reproduce (double_z, index remapping, other channel counts, other model classes) are refused."""
    model = taming_config.get("model") if isinstance(taming_config, Mapping) else None
    params = model.get("params") if isinstance(model, Mapping) else None
    dd = params.get("ddconfig") if isinstance(params, Mapping) else None
    if not isinstance(dd, Mapping):
        raise TamingImportError("the config has no model.params.ddconfig section (expected taming's model YAML)")
    target = model.get("target", SUPPORTED_TARGETS[0])
    if target not in SUPPORTED_TARGETS:
        raise TamingImportError(f"model.target {target} is not supported (only {', '.join(SUPPORTED_TARGETS)})")
    for key, default, supported in _FIXED_DDCONFIG:
        if dd.get(key, default) != supported:
            raise TamingImportError(
                f"model.params.ddconfig.{key} is {dd.get(key, default)!r}; only {supported!r} is supported")
    if params.get("remap") is not None:
        raise TamingImportError("model.params.remap (codebook index remapping) is not supported")
    where = "model.params.ddconfig"
    return {
        "ch": _setting(dd, "ch", where),
        "ch_mult": _setting(dd, "ch_mult", where, default=[1, 2, 4, 8]),
        "num_res_blocks": _setting(dd, "num_res_blocks", where),
        "attn_resolutions": _setting(dd, "attn_resolutions", where),
        "z_channels": _setting(dd, "z_channels", where),
        "resolution": _setting(dd, "resolution", where),
        "codebook_size": _setting(params, "n_embed", "model.params"),
        "code_dim": _setting(params, "embed_dim", "model.params"),
        "quantizer": "vq",
        "beta": TAMING_BETA,
        "legacy_beta": TAMING_LEGACY_BETA,
    }


def model_config_from_yaml(config_path: str | pathlib.Path) -> dict[str, Any]:
    """`model_config_from_taming` of a YAML file (parsed with `yaml.safe_load`: plain data only)."""
    path = pathlib.Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist")
    try:
        taming_config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TamingImportError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    try:
        return model_config_from_taming(taming_config)
    except TamingImportError as e:
        raise TamingImportError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Mapping the state dict onto the param tree.

# This project's submodule names -> taming's module paths (names not listed are the same in both).
_MODULE_NAMES = [
    (re.compile(r"^(down|up)_(\d+)_(block|attn)_(\d+)$"), r"\1.\2.\3.\4"),
    (re.compile(r"^down_(\d+)_downsample$"), r"down.\1.downsample.conv"),
    (re.compile(r"^up_(\d+)_upsample$"), r"up.\1.upsample.conv"),
    (re.compile(r"^mid_(block|attn)_(\d+)$"), r"mid.\1_\2"),
]
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "codebook": "embedding.weight"}
# Flax conv kernels are [kh, kw, in, out]; torch's are [out, in, kh, kw].
_KERNEL_FROM_TORCH = (2, 3, 1, 0)
_KERNEL_TO_TORCH = (3, 2, 0, 1)


def taming_name(param_path: tuple[str, ...]) -> str:
    """The taming state-dict key of a VQGAN param, e.g. ("encoder", "down_0_block_1", "conv1", "kernel") ->
    "encoder.down.0.block.1.conv1.weight"."""
    *modules, leaf = param_path
    names = []
    for module in modules:
        for pattern, replacement in _MODULE_NAMES:
            module = pattern.sub(replacement, module)
        names.append(module)
    return ".".join(names + [_LEAF_NAMES[leaf]])


def _taming_source(param_path: tuple[str, ...], shape: tuple[int, ...]) -> Source:
    if param_path[-1] == "kernel":
        return (taming_name(param_path), tuple(shape[i] for i in _KERNEL_TO_TORCH),
                lambda value: np.transpose(value, _KERNEL_FROM_TORCH))
    return taming_name(param_path), tuple(shape), lambda value: value


def gather_params(state_dict: Mapping[str, np.ndarray], abstract_params: Any,
                  source: Callable[[tuple[str, ...], tuple[int, ...]], Source], *, ignored: re.Pattern,
                  error: type[CheckpointImportError], what: str) -> Any:
    """The params shaped as `abstract_params` (a nested dict of float32 numpy arrays), each from
    `source(param path, param shape)` of the state dict. Every source key must be present with its shape and every
    state-dict entry used, except keys that `ignored` matches; otherwise `error` lists what is missing, mis-shaped
    and unexpected, on one line."""
    params, missing, misshaped, used = {}, set(), set(), set()
    for path, leaf in flax.traverse_util.flatten_dict(abstract_params).items():
        key, expected, to_param = source(path, tuple(leaf.shape))
        if key not in state_dict:
            missing.add(key)
            continue
        used.add(key)
        value = state_dict[key]
        if tuple(value.shape) != expected:
            misshaped.add(f"{key} {tuple(value.shape)} (expected {expected})")
            continue
        # A float32 copy: the reader's arrays may be read-only views, and in float16.
        params[path] = np.array(to_param(np.asarray(value, np.float32)), dtype=np.float32, order="C")
    unexpected = [k for k in state_dict if k not in used and not ignored.match(k)]
    problems = [f"{label}: {_some(sorted(names))}"
                for label, names in (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected))
                if names]
    if problems:
        raise error(f"the state dict does not match {what}: " + "; ".join(problems))
    return flax.traverse_util.unflatten_dict(params)


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], model_config: Mapping[str, Any]) -> Any:
    """The VQGAN params (nested dict of float32 numpy arrays) for a taming state dict. Every VQGAN param must be
    present with its shape and every state-dict entry used, except the training loss's (`loss.*`)."""
    model = vqgan.from_config(model_config)
    abstract = jax.eval_shape(lambda: vqgan.init_params(model, jax.random.PRNGKey(0)))
    return gather_params(state_dict, abstract, _taming_source, ignored=IGNORED_KEYS, error=TamingImportError,
                         what="the VQGAN described by the config")


# ---------------------------------------------------------------------------------------------------------------------
# The whole conversion.

def file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(ckpt_path: str | pathlib.Path, config_path: str | pathlib.Path, out_dir: str | pathlib.Path, *,
            reader: Reader = "auto") -> pathlib.Path:
    """Writes the taming VQGAN (`ckpt_path` + its model YAML `config_path`) as a VQGAN bundle in `out_dir`, which must
    not exist yet. Returns the bundle's path."""
    ckpt_path, out_dir = pathlib.Path(ckpt_path), pathlib.Path(out_dir)
    # Checked before the (possibly GB-sized) checkpoint is read; save_bundle checks again.
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose a new output directory or remove it")
    model_config = model_config_from_yaml(config_path)
    params = params_from_state_dict(read_state_dict(ckpt_path, reader=reader), model_config)
    metadata = {"kind": "vqgan", "model": model_config,
                "source": {"format": "taming", "ckpt": str(ckpt_path), "sha256": file_sha256(ckpt_path)}}
    return checkpointing.save_bundle(out_dir, params, metadata)
