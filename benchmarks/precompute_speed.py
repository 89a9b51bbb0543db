"""Precompute speed: images/s end to end, and of each part alone, to say what bounds it.

  python benchmarks/precompute_speed.py                    # CPU: the Shapes preset (s32, all three splits)
  python benchmarks/precompute_speed.py --preset=imagenet  # accelerator: 256 px JPEGs, the paper's f16 VQGAN, ViT-B/32

Models have random weights (speed does not depend on them): the `shapes` preset uses configs/vqgan.py:shapes and the
architecture of the shipped Shapes CLIP (configs/clip.py:shapes); `imagenet` uses configs/vqgan.py:imagenet_f16_16384
and OpenAI's ViT-B/32. Data: the Shapes s32 build (made in --data_dir if missing), or for `imagenet` a folder of
--num_images synthetic 500 x 375 JPEGs (ImageNet's typical size), written once to --data_dir.

Parts, each timed alone over the same images: `decode` (read, decode, crop: the grain pipeline precompute uses),
`device` (the jitted VQGAN encode + CLIP image and text embedding of one batch, steady state), `write` (TFDS
serialisation and array_record writing of that many examples). The end-to-end run overlaps decode (grain threads or
--workers processes) and device work with serialisation; the slowest part is what bounds it. Results are appended as
one JSON line to --out with the device and date.
"""

import datetime
import pathlib
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from absl import app, flags
from array_record.python import array_record_module
from PIL import Image
from tensorflow_datasets.core import example_serializer

import clipgen_jax  # noqa: F401  (registers the Shapes TFDS builder)
from clipgen_jax import checkpointing, parallel, precompute, training
from clipgen_jax.data import images, precomputed, shapes_tfds
from clipgen_jax.models import clip, clip_tokenizer, vqgan
from clipgen_jax.training import clip as clip_training

import results_file  # benchmarks/results_file.py (this script's folder is on sys.path)

_PRESET = flags.DEFINE_enum("preset", "shapes", ["shapes", "imagenet"], "What to time (see the docstring).")
_SPLITS = flags.DEFINE_list("splits", None, "Shapes splits to precompute (default: train, validation, heldout).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 4096, "imagenet: synthetic JPEGs to precompute.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Images per device step (default: the preset's).")
_WORKERS = flags.DEFINE_integer("workers", None, "grain decoding processes (0: threads of the main process; "
                                "default: the preset's).")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", list(precompute.COMPUTE_DTYPES), "Compute dtype.")
_DATA_DIR = flags.DEFINE_string("data_dir", str(pathlib.Path(tempfile.gettempdir()) / "precompute_speed"),
                                "Where the input data is made once and kept.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/precompute_speed.jsonl", "JSON-lines results file.")


def _random_models(preset: str, directory: pathlib.Path) -> tuple[str, str]:
    """A random-weight VQGAN bundle and CLIP directory of the preset's architectures; their paths."""
    vqgan_config = training.load_config(
        "configs/vqgan.py:" + ("shapes" if preset == "shapes" else "imagenet_f16_16384")).model.to_dict()
    params = vqgan.init_params(vqgan.from_config(vqgan_config), jax.random.PRNGKey(0))
    checkpointing.save_bundle(directory / "vqgan", params, {"kind": "vqgan", "model": vqgan_config})
    if preset == "shapes":
        model_config = training.load_config("configs/clip.py:shapes").model
        clip_config, size, context = clip_training.clip_config(model_config), 32, model_config.context_length
    else:
        clip_config, size, context = clip.openai_vit_b32_config(), 224, 77
    model = transformers.FlaxCLIPModel(clip_config, seed=0)
    clip.export(model, model.params, clip_tokenizer.openai_tokenizer(context), clip.Preprocessing(size, size),
                directory / "clip")
    return str(directory / "vqgan"), str(directory / "clip")


def _synthetic_jpegs(folder: pathlib.Path, count: int) -> None:
    """Smooth colour fields with noise: JPEG sizes and decode costs like photographs, unlike pure noise."""
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == count:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500] / 500.0
    for index in range(count):
        phase = rng.uniform(0, 2 * np.pi, 3)
        field = 127 + 100 * np.sin(6 * x[..., None] + 4 * y[..., None] + phase)
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:06d}.jpg", quality=90)
        (folder / f"{index:06d}.txt").write_text(f"a synthetic photograph number {index}")


def _config(preset: str, vqgan_path: str, clip_path: str, output: pathlib.Path):
    config = training.load_config(f"configs/precompute.py:{preset}")
    config.update(vqgan=vqgan_path, clip=clip_path, compute_dtype=_COMPUTE_DTYPE.value)
    config.output.data_dir = str(output)
    if _WORKERS.value is not None:
        config.data.worker_count = _WORKERS.value
    data_dir = pathlib.Path(_DATA_DIR.value)
    if preset == "shapes":
        config.data.data_dir = str(data_dir)
        config.splits = tuple(_SPLITS.value or ("train", "validation", "heldout"))
    else:
        _synthetic_jpegs(data_dir / "jpegs", _NUM_IMAGES.value)
        config.data.update(source="folder", folder=str(data_dir / "jpegs"))
        config.update(splits=("train",), captions="sidecar", views=1)
    config.batch_size = _BATCH_SIZE.value or config.batch_size
    return config


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1)


def _time_parts(config, vqgan_path: str, clip_path: str) -> dict[str, float]:
    """images/s of decode, device and write alone, over the first split's images (at most 4096). Uses precompute's
    own (private) loader, reader and writer, so that each part is timed as it runs there."""
    split = config.splits[0]
    source = images.make_source(config.data, split, with_captions=config.captions == "sidecar")
    count = min(len(source), 4096)
    caption_key = precompute.resolve_caption_key(config.captions, config.data, source[0])
    loader = precompute._LoadViews(
        source=source, image_key=config.data.image_key, caption_key=caption_key,
        label_keys=(), image_size=config.data.image_size, views=1, seed=0,
        max_image_pixels=config.data.max_image_pixels)
    start = time.perf_counter()
    records = list(precompute._records(loader, 0, count, config.data.worker_count))
    decode_seconds = time.perf_counter() - start

    model, params, metadata = checkpointing.load_vqgan(vqgan_path, dtype=jnp.dtype(config.compute_dtype))
    loaded = clip.load(clip_path, dtype=jnp.dtype(config.compute_dtype))
    mesh = parallel.make_mesh(devices=jax.local_devices())
    with_text = caption_key is not None
    tokens_dtype = precompute.token_dtype(metadata["model"]["codebook_size"])
    encode = precompute.make_encode_fn(model, loaded, tokens_dtype=tokens_dtype,
                                       embedding_dtype=np.dtype(config.embedding_dtype), with_text=with_text)
    batch = config.batch_size
    images_BHWC = np.stack([records[i % count]["images"][0] for i in range(batch)])
    ids_BL, mask_BL = loaded.tokenize(["a small red circle in the top left on a blue background"] * batch)
    arguments = [jax.device_put(params, parallel.replicated(mesh)), jax.device_put(loaded.params,
                                                                                   parallel.replicated(mesh))]
    arguments += [jax.device_put(a, parallel.batch_sharding(mesh)) for a in (images_BHWC, ids_BL, mask_BL)]
    outputs = jax.block_until_ready(encode(*arguments))
    steps = max(2, -(-count // batch) // 4)
    start = time.perf_counter()
    for _ in range(steps):
        outputs = encode(*arguments)
    outputs = jax.tree.map(np.asarray, jax.block_until_ready(outputs))
    device_seconds = (time.perf_counter() - start) / steps

    grid = 2 ** (len(metadata["model"]["ch_mult"]) - 1)
    side = metadata["model"]["resolution"] // grid
    plan = {"grid_shape": [side, side], "clip": {"embed_dim": loaded.embed_dim}, "token_dtype": tokens_dtype.name,
            "embedding_dtype": config.embedding_dtype, "caption_key": caption_key, "labels": []}
    features = precompute.make_features(plan)
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    with tempfile.TemporaryDirectory() as scratch:
        writer = array_record_module.ArrayRecordWriter(str(pathlib.Path(scratch) / "shard"), "group_size:1")
        start = time.perf_counter()
        for first in range(0, count, batch):  # what precompute does with each batch's outputs
            rows = [(records[index], 0) for index in range(first, min(first + batch, count))]
            precompute._write_batch(writer, serializer, features, rows, outputs, ())
        writer.close()
        write_seconds = time.perf_counter() - start
    return {"decode": _rate(count, decode_seconds), "device": _rate(batch, device_seconds),
            "write": _rate(count, write_seconds)}


def main(argv):
    del argv
    host_setting = results_file.set_up_host()
    preset = _PRESET.value
    if preset == "shapes":
        shapes_tfds.prepare("s32", data_dir=_DATA_DIR.value)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = pathlib.Path(scratch)
        vqgan_path, clip_path = _random_models(preset, scratch)
        config = _config(preset, vqgan_path, clip_path, scratch / "out")
        start = time.perf_counter()
        directory = precompute.precompute(config)
        end_to_end_seconds = time.perf_counter() - start
        metadata = precomputed.load_metadata(config.output.data_dir, config.output.name)
        num_images = sum(split["num_images"] for split in metadata["splits"].values())
        parts = _time_parts(config, vqgan_path, clip_path)
        size_bytes = sum(path.stat().st_size for path in directory.iterdir())
    result = {
        "date": datetime.date.today().isoformat(),
        "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "local_device_count": jax.local_device_count(), "preset": preset, "splits": list(config.splits),
        **host_setting,
        "num_images": num_images, "batch_size": config.batch_size, "workers": config.data.worker_count,
        "compute_dtype": config.compute_dtype,
        "end_to_end_seconds": round(end_to_end_seconds, 1),  # model loading, hashing and compilation included
        "end_to_end_images_per_second": _rate(num_images, end_to_end_seconds),
        "part_images_per_second": parts, "bound_by": min(parts, key=parts.get),
        "dataset_megabytes": round(size_bytes / 2**20, 1),
    }
    results_file.append(_OUT.value, result)


if __name__ == "__main__":
    app.run(main)
