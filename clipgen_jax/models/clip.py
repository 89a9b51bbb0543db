"""The frozen CLIP: a thin adapter over transformers' FlaxCLIPModel.

`load(name_or_path)` takes a Hugging Face Hub id (e.g. `openai/clip-vit-base-patch32`), a local directory written by
`save_pretrained` (Flax msgpack or PyTorch-named safetensors, which load without torch), or the name of a CLIP shipped
with this package (`PACKAGED`). Images enter as the project's [-1, 1] floats of any size and are preprocessed on
device exactly like transformers' `CLIPImageProcessor`; embeddings leave L2-normalised.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import transformers

from clipgen_jax import checkpointing, numerics, packaged, parallel
from clipgen_jax.models import clip_tokenizer

logger = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# CLIPs trained on the Shapes world by configs/clip.py and shipped as package data (see clipgen_jax/assets/clip/).
# "shapes-clip" conditions and re-ranks; "shapes-clip-eval" (another seed and data order) only scores, so that
# evaluation never uses the CLIP the generator was trained against.
PACKAGED = {"shapes-clip": "assets/clip/shapes_clip", "shapes-clip-eval": "assets/clip/shapes_clip_eval"}

WEIGHT_FILES = ("model.safetensors", "flax_model.msgpack")


class ClipNotFoundError(FileNotFoundError):
    pass


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What CLIPImageProcessor does for CLIP: resize the shorter side (bicubic, antialiased), center crop, normalise."""

    shortest_edge: int
    crop_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    @classmethod
    def from_processor(cls, processor: transformers.CLIPImageProcessor) -> Preprocessing:
        if not (processor.do_resize and processor.do_center_crop and processor.do_normalize and processor.do_rescale):
            raise ValueError("only CLIPImageProcessors that resize, center crop, rescale and normalise are supported")
        crop = processor.crop_size
        if crop["height"] != crop["width"]:
            raise ValueError(f"non-square CLIP crop {crop} is not supported")
        return cls(shortest_edge=int(processor.size["shortest_edge"]), crop_size=int(crop["height"]),
                   mean=tuple(processor.image_mean), std=tuple(processor.image_std))

    def to_processor(self) -> transformers.CLIPImageProcessor:
        return transformers.CLIPImageProcessor(size={"shortest_edge": self.shortest_edge},
                                               crop_size={"height": self.crop_size, "width": self.crop_size},
                                               image_mean=list(self.mean), image_std=list(self.std))

    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """The output size of transformers' shortest-edge resize (the longer side truncated, as it does)."""
        if height <= width:
            return self.shortest_edge, int(self.shortest_edge * width / height)
        return int(self.shortest_edge * height / width), self.shortest_edge

    def __call__(self, images_BHWC: jax.Array, *, round_to_uint8: bool = True) -> jax.Array:
        """[-1, 1] images -> CLIP pixel values (float32, [B, 3, crop, crop], the layout FlaxCLIPModel takes).

        `round_to_uint8` reproduces the processor's 8-bit intermediate image (it resizes through PIL); the
        differentiable path turns it off, which changes values by at most half a grey level.
        """
        _, height, width, _ = images_BHWC.shape
        x_BHWC = (images_BHWC.astype(jnp.float32) + 1.0) * 127.5
        if round_to_uint8:
            x_BHWC = jnp.clip(jnp.round(x_BHWC), 0.0, 255.0)
        new_h, new_w = self.resized_hw(height, width)
        # Two separable passes, width then height, each rounded to 8 bits when exact: what PIL does.
        if new_w != width:
            x_BHWC = jnp.einsum("ow,bhwc->bhoc", jnp.asarray(pil_bicubic_weights(width, new_w)), x_BHWC)
            x_BHWC = jnp.clip(jnp.round(x_BHWC), 0.0, 255.0) if round_to_uint8 else x_BHWC
        if new_h != height:
            x_BHWC = jnp.einsum("oh,bhwc->bowc", jnp.asarray(pil_bicubic_weights(height, new_h)), x_BHWC)
            x_BHWC = jnp.clip(jnp.round(x_BHWC), 0.0, 255.0) if round_to_uint8 else x_BHWC
        if min(new_h, new_w) < self.crop_size:
            raise ValueError(f"resize to shortest edge {self.shortest_edge} is smaller than the crop {self.crop_size}")
        top, left = (new_h - self.crop_size) // 2, (new_w - self.crop_size) // 2
        x_BHWC = x_BHWC[:, top:top + self.crop_size, left:left + self.crop_size]
        x_BHWC = (x_BHWC / 255.0 - jnp.asarray(self.mean)) / jnp.asarray(self.std)
        return jnp.transpose(x_BHWC, (0, 3, 1, 2))


def _bicubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic kernel (a = -0.5)."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def pil_bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] resampling matrix of PIL's antialiased bicubic resize along one axis (Pillow's ImagingResample:
    the kernel is stretched by the downscale factor, and each row's weights sum to one)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    weights = np.zeros((out_size, in_size), np.float64)
    for out in range(out_size):
        centre = (out + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), in_size)
        taps = _bicubic((np.arange(lo, hi) - centre + 0.5) / filter_scale)
        weights[out, lo:hi] = taps / taps.sum()
    return weights.astype(np.float32)


@dataclasses.dataclass
class CLIP:
    """A loaded CLIP: the Flax module, its params, the tokenizer and the image preprocessing."""

    model: transformers.FlaxCLIPModel
    params: Any
    tokenizer: transformers.PreTrainedTokenizerBase
    preprocessing: Preprocessing
    name: str

    def __post_init__(self):
        self._image_fn = jax.jit(lambda params, images: self.image_features(params, images))
        self._text_fn = jax.jit(self.text_features)

    @property
    def embed_dim(self) -> int:
        return self.model.config.projection_dim

    @property
    def context_length(self) -> int:
        return self.model.config.text_config.max_position_embeddings

    # Pure functions of (params, inputs): what training and the prior's CLIP loss differentiate through.

    def image_features(self, params: Any, images_BHWC: jax.Array, *, round_to_uint8: bool = True) -> jax.Array:
        """[-1, 1] images of any size -> L2-normalised image embeddings [B, D] (float32)."""
        pixels_BCHW = self.preprocessing(images_BHWC, round_to_uint8=round_to_uint8)
        return numerics.l2_normalise(self.model.get_image_features(pixels_BCHW, params=params).astype(jnp.float32))

    def text_features(self, params: Any, input_ids_BL: jax.Array, attention_mask_BL: jax.Array) -> jax.Array:
        features_BD = self.model.get_text_features(input_ids_BL, attention_mask_BL, params=params)
        return numerics.l2_normalise(features_BD.astype(jnp.float32))

    # Batched host-side entry points.

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, padded to the context length; over-long texts are truncated with a warning."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        for index, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text {index} is empty ({text!r}); CLIP needs a non-empty prompt")
        full_lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False).input_ids]
        for text, length in zip(texts, full_lengths):
            if length > self.context_length:
                logger.warning("prompt truncated to CLIP's %d tokens (it has %d): %r", self.context_length, length,
                               text)
        encoded = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.context_length,
                                 return_tensors="np")
        return encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int32)

    def embed_images(self, images_BHWC: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """[-1, 1] images -> L2-normalised embeddings [N, D], in batches sharded over every device."""
        return _batched(lambda batch: self._image_fn(self.params, batch), [np.asarray(images_BHWC)], batch_size)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> L2-normalised embeddings [N, D]."""
        ids, mask = self.tokenize(texts)
        return _batched(lambda ids, mask: self._text_fn(self.params, ids, mask), [ids, mask], batch_size)

    def weights_hash(self) -> str:
        """The identity precomputed data records (`checkpointing.params_hash`)."""
        return checkpointing.params_hash(self.params)

    def save(self, directory: str | os.PathLike[str], *, dtype: str = "float32") -> pathlib.Path:
        """Writes a directory that `load` (and transformers' FlaxCLIPModel.from_pretrained) reads."""
        return export(self.model, self.params, self.tokenizer, self.preprocessing, directory, dtype=dtype)


def _batched(fn, arrays: list[np.ndarray], batch_size: int) -> np.ndarray:
    """Applies a jitted per-batch function over the leading axis, padding every batch to one shape (one compile)
    that splits evenly over the devices."""
    num = len(arrays[0])
    num_devices = jax.device_count()
    batch_size = max(num_devices, -(-min(batch_size, max(num, 1)) // num_devices) * num_devices)
    mesh = parallel.make_mesh() if num_devices > 1 else None
    outputs = []
    for start in range(0, num, batch_size):
        chunk = [a[start:start + batch_size] for a in arrays]
        valid = len(chunk[0])
        if valid < batch_size:
            chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - valid, axis=0)]) for c in chunk]
        if mesh is not None:
            chunk = [jax.device_put(c, parallel.batch_sharding(mesh)) for c in chunk]
        outputs.append(parallel.to_host(fn(*chunk))[:valid])  # gathers rows from every process's devices
    if not outputs:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(outputs)


# ----------------------------------------------------------------------------------------------------------------------
# Loading and exporting.


def packaged_path(name: str) -> pathlib.Path:
    return packaged.path(PACKAGED[name])


def resolve(name_or_path: str | os.PathLike[str]) -> tuple[str, bool]:
    """(what to hand from_pretrained, whether it is a local directory)."""
    name = str(name_or_path)
    if name in PACKAGED:
        path = packaged_path(name)
        if not (path / "config.json").is_file():
            raise ClipNotFoundError(f"the packaged CLIP {name!r} is missing from {path}; reinstall clipgen_jax "
                                    "(or train one: python tools/train.py --config=configs/clip.py:shapes)")
        return str(path), True
    if os.path.isdir(name):
        return name, True
    if os.path.exists(name):
        raise ClipNotFoundError(f"{name} is a file; a CLIP is a directory (config.json + weights), a Hub id or one "
                                f"of {sorted(PACKAGED)}")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ClipNotFoundError(f"CLIP directory {name} does not exist; pass a directory written by save_pretrained, "
                                f"a Hub id such as openai/clip-vit-base-patch32, or one of {sorted(PACKAGED)}")
    return name, False


def load(name_or_path: str | os.PathLike[str], *, dtype: Any = jnp.float32) -> CLIP:
    """Loads a CLIP by Hub id, local directory or packaged name (see the module docstring).

    `dtype` is the computation dtype (bfloat16 on accelerators); parameters stay as stored, cast to float32.
    """
    source, is_local = resolve(name_or_path)
    if is_local:
        _check_directory(pathlib.Path(source))
    try:
        model, params = _load_model(source, is_local, dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=is_local)
        try:
            processor = transformers.CLIPImageProcessor.from_pretrained(source, local_files_only=is_local)
            preprocessing = Preprocessing.from_processor(processor)
        except OSError:
            size = model.config.vision_config.image_size
            logger.warning("%s has no preprocessor_config.json; using OpenAI's CLIP preprocessing at %d px", source,
                           size)
            preprocessing = Preprocessing(shortest_edge=size, crop_size=size)
    except OSError as error:
        if is_local:
            raise ClipNotFoundError(f"cannot load the CLIP in {source}: {error}") from None
        raise ClipNotFoundError(
            f"cannot load CLIP {source!r} from the Hugging Face Hub or its local cache ({type(error).__name__}). "
            f"On a machine with internet: `huggingface-cli download {source} --local-dir DIR --include '*.json' "
            f"'*.txt' model.safetensors`, then pass DIR (or copy the cache to $HF_HOME)") from None
    return CLIP(model=model, params=params, tokenizer=tokenizer, preprocessing=preprocessing, name=str(name_or_path))


def _check_directory(path: pathlib.Path) -> None:
    if not (path / "config.json").is_file():
        raise ClipNotFoundError(f"{path} has no config.json; a CLIP directory is what save_pretrained writes "
                                "(config.json, model.safetensors or flax_model.msgpack, tokenizer files)")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        found = sorted(p.name for p in path.iterdir())
        hint = " (pytorch_model.bin needs torch: convert it to safetensors)" if "pytorch_model.bin" in found else ""
        raise ClipNotFoundError(f"{path} has no CLIP weights ({' or '.join(WEIGHT_FILES)}); it holds {found}{hint}")


def _load_model(source: str, is_local: bool, dtype: Any) -> tuple[transformers.FlaxCLIPModel, Any]:
    local = pathlib.Path(source) if is_local else None
    # Flax weights when present; otherwise PyTorch-named safetensors, which transformers converts without torch.
    from_pt = local is not None and not (local / "flax_model.msgpack").is_file()
    # transformers warns, per parameter, that float16 weights load as float16; they are cast to float32 below.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = transformers.FlaxCLIPModel.from_pretrained(source, from_pt=from_pt, dtype=dtype,
                                                           local_files_only=is_local)
    finally:
        transformers.logging.set_verbosity(verbosity)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), model.params)
    return model, params


def export(model: transformers.FlaxCLIPModel, params: Any, tokenizer: transformers.PreTrainedTokenizerBase,
           preprocessing: Preprocessing, directory: str | os.PathLike[str], *, dtype: str = "float32",
           metadata: dict | None = None) -> pathlib.Path:
    """Writes config.json, PyTorch-named model.safetensors (`dtype`: float32 or float16), tokenizer and preprocessor
    files: the layout of a Hub CLIP, loadable by `load` and by transformers (Flax without torch, or PyTorch)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if dtype not in ("float32", "float16"):
        raise ValueError(f"export dtype {dtype!r} is not float32 or float16")
    model.config.save_pretrained(str(directory))
    tensors = {name: array.astype(dtype) for name, array in pytorch_state_dict(params).items()}
    safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(directory))
    preprocessing.to_processor().save_pretrained(str(directory))
    if metadata is not None:
        (directory / "clipgen_metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return directory


def pytorch_state_dict(params: Any) -> dict[str, np.ndarray]:
    """FlaxCLIPModel params -> transformers' PyTorch CLIPModel state dict (numpy arrays; no torch needed).

    The renaming transformers applies when it converts between the two: Dense `kernel` -> `weight` transposed,
    the patch Conv kernel HWIO -> OIHW, LayerNorm `scale` and Embed `embedding` -> `weight`.
    """
    state = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [str(getattr(k, "key", k)) for k in path]
        array = np.asarray(leaf, np.float32)
        if keys[-1] == "kernel":
            array = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
            keys[-1] = "weight"
        elif keys[-1] in ("scale", "embedding"):
            keys[-1] = "weight"
        state[".".join(keys)] = np.array(array, order="C")  # (ascontiguousarray would make a scalar 1-d)
    return state


def openai_vit_b32_config() -> transformers.CLIPConfig:
    """OpenAI's ViT-B/32 CLIPConfig (the public config.json of openai/clip-vit-base-patch32), for tests and timing."""
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=clip_tokenizer.VOCAB_SIZE, hidden_size=512, intermediate_size=2048,
                         num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                         hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1),
        vision_config=dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
                           num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"),
        projection_dim=512, logit_scale_init_value=2.6592)
