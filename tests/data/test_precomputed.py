"""Reading a precomputed dataset back through grain: exactly the stored arrays, seeded shuffles, process sharding,
resumable state; and the identity check the prior's trainer runs."""

import json
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from clipgen_jax import checkpointing, precompute, training
from clipgen_jax.data import precomputed
from clipgen_jax.models import clip
from helpers import tiny_models

NAME = "tiny"


@pytest.fixture(scope="module")
def dataset(shapes_data_dir, tmp_path_factory):
    """The tiny preset (Shapes validation 128 + heldout 96) through a tiny random VQGAN and CLIP: (data_dir, config,
    CLIP) ."""
    root = tmp_path_factory.mktemp("precomputed")
    tiny_models(root)
    config = training.load_config("configs/precompute.py:tiny")
    config.update(vqgan=str(root / "vqgan"), clip=str(root / "clip"), embedding_dtype="float16")
    config.data.data_dir = str(shapes_data_dir)
    config.output.data_dir = str(root / "out")
    precompute.precompute(config)
    return root / "out", config


def _stored(data_dir, split):
    """Every record of a split as TFDS's own data source decodes it, stacked per feature."""
    source = tfds.builder_from_directory(str(precomputed.dataset_dir(data_dir, NAME))).as_data_source(split)
    records = [source[i] for i in range(len(source))]
    return {key: np.stack([np.asarray(r[key]) for r in records]) for key in records[0]}


def _concatenate(batches):
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def test_grain_batches_are_exactly_the_stored_arrays(dataset):
    data_dir, _ = dataset
    stored = _stored(data_dir, "heldout")
    iterator = precomputed.make_batch_iterator(data_dir, NAME, split="heldout", batch_size=40, seed=0, shuffle=False,
                                               num_epochs=1)
    batches = list(iterator)
    assert [len(b["tokens"]) for b in batches] == [40, 40, 16]
    read = _concatenate(batches)
    assert sorted(read) == sorted(stored) == ["background", "caption", "clip_image_embedding", "clip_text_embedding",
                                              "colour", "image_index", "position", "shape", "size", "tokens", "view"]
    for key in ("tokens", "clip_image_embedding", "clip_text_embedding"):
        assert read[key].dtype == stored[key].dtype
        assert read[key].tobytes() == stored[key].tobytes()
    assert read["tokens"].dtype == np.int16 and read["tokens"].shape == (96, 256)
    assert read["clip_image_embedding"].dtype == np.float16 and read["clip_image_embedding"].shape == (96, 16)
    np.testing.assert_allclose(np.linalg.norm(read["clip_image_embedding"].astype(np.float32), axis=-1), 1.0,
                               atol=2e-3)
    np.testing.assert_array_equal(read["image_index"], np.arange(96))
    assert list(read["caption"]) == [c.decode("utf-8") for c in stored["caption"]]
    np.testing.assert_array_equal(read["shape"], stored["shape"])


def test_shuffle_is_seeded_and_each_epoch_is_a_permutation(dataset):
    data_dir, _ = dataset
    stored = _stored(data_dir, "validation")

    def first_epoch(seed):
        iterator = precomputed.make_batch_iterator(data_dir, NAME, split="validation", batch_size=32, seed=seed,
                                                   keys=["image_index", "tokens"])
        return _concatenate([next(iterator) for _ in range(4)])

    epoch = first_epoch(0)
    assert sorted(epoch) == ["image_index", "tokens"]
    assert sorted(epoch["image_index"]) == list(range(128))
    assert list(epoch["image_index"]) != list(range(128))
    np.testing.assert_array_equal(epoch["tokens"], stored["tokens"][epoch["image_index"]])
    np.testing.assert_array_equal(first_epoch(0)["image_index"], epoch["image_index"])
    assert list(first_epoch(1)["image_index"]) != list(epoch["image_index"])


def test_processes_read_disjoint_halves(dataset):
    data_dir, _ = dataset
    seen = []
    for process_index in range(2):
        iterator = precomputed.make_batch_iterator(data_dir, NAME, split="heldout", batch_size=16, seed=0,
                                                   num_epochs=1, keys=["image_index"], process_index=process_index,
                                                   process_count=2)
        seen.append(sorted(_concatenate(list(iterator))["image_index"]))
    assert len(seen[0]) == len(seen[1]) == 48
    assert sorted(seen[0] + seen[1]) == list(range(96))


def test_state_resumes_the_same_stream(dataset):
    data_dir, _ = dataset

    def make():
        return precomputed.make_batch_iterator(data_dir, NAME, split="heldout", batch_size=40, seed=3)

    iterator = make()
    for _ in range(2):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    assert state == {"next_index": 80}
    expected = [next(iterator) for _ in range(2)]  # runs across the epoch boundary at 96
    resumed = make()
    resumed.set_state(state)
    for batch, want in zip([next(resumed) for _ in range(2)], expected):
        for key in want:
            np.testing.assert_array_equal(batch[key], want[key])
    assert resumed.get_state() == {"next_index": 160}


def test_in_memory_batches_equal_the_streamed_ones_and_need_no_files(dataset, tmp_path):
    """A split under memory_limit_bytes is read into memory when the iterator is made: its batches are the streamed
    ones (across epochs, for each process), and the files are no longer needed."""
    data_dir, _ = dataset
    for process_index in range(2):
        def make(directory, memory_limit_bytes):
            return precomputed.make_batch_iterator(directory, NAME, split="validation", batch_size=24, seed=2,
                                                   process_index=process_index, process_count=2,
                                                   memory_limit_bytes=memory_limit_bytes)

        streamed = make(data_dir, 0)
        expected = [next(streamed) for _ in range(6)]  # 144 records of this process's 64: three epochs
        copy = tmp_path / f"copy{process_index}"
        shutil.copytree(data_dir, copy)
        in_memory = make(copy, 1 << 20)  # ~110 KB: 64 records of 11 features, text counted as 1 KiB
        record_files = list(precomputed.dataset_dir(copy, NAME).glob("*.array_record*"))
        assert record_files
        for path in record_files:
            path.unlink()
        for want in expected:
            batch = next(in_memory)
            assert sorted(batch) == sorted(want)
            for key in want:
                assert batch[key].dtype == want[key].dtype
                np.testing.assert_array_equal(batch[key], want[key])
        with pytest.raises(Exception, match="array_record"):
            next(make(copy, 0))


def test_metadata_and_identity_check(dataset):
    data_dir, config = dataset
    metadata = precomputed.load_metadata(data_dir, NAME)
    _, params, bundle_metadata = checkpointing.load_vqgan(config.vqgan)
    vqgan_identity = precomputed.vqgan_identity(config.vqgan, params, bundle_metadata["model"])
    clip_identity = precomputed.clip_identity(clip.load(config.clip))
    assert metadata["embedding_dtype"] == "float16"
    precomputed.check_identity(metadata, vqgan=vqgan_identity, clip=clip_identity)
    # A moved model is the same model.
    precomputed.check_identity(metadata, vqgan={**vqgan_identity, "path": "/elsewhere"}, clip=clip_identity)

    other_clip = {**clip_identity, "name": "openai/clip-vit-base-patch32", "embed_dim": 512, "weights_hash": "f" * 64}
    with pytest.raises(precomputed.IdentityMismatchError,
                       match=r"precomputed with CLIP .*clip \(embed_dim 16\), but this run's CLIP "
                             r"openai/clip-vit-base-patch32 has embed_dim 512: precompute again with this CLIP"):
        precomputed.check_identity(metadata, vqgan=vqgan_identity, clip=other_clip)
    retrained = {**vqgan_identity, "weights_hash": "0" * 64}
    with pytest.raises(precomputed.IdentityMismatchError,
                       match=rf"weights_hash {vqgan_identity['weights_hash'][:12]}\), but .* has weights_hash "
                             r"000000000000: .*--config.vqgan="):
        precomputed.check_identity(metadata, vqgan=retrained, dataset="shapes_s32")
    with pytest.raises(precomputed.IdentityMismatchError, match="records no VQGAN identity"):
        precomputed.check_identity({}, vqgan=vqgan_identity)


def test_missing_and_unfinished_datasets_say_what_to_do(dataset, tmp_path):
    data_dir, _ = dataset
    with pytest.raises(FileNotFoundError, match=r"does not exist; run \(or rerun, which resumes\)"):
        precomputed.make_batch_iterator(tmp_path, NAME, split="train", batch_size=8, seed=0)
    unfinished = precomputed.dataset_dir(tmp_path, NAME)
    unfinished.mkdir(parents=True)
    (unfinished / precomputed.PLAN_FILE).write_text("{}")
    with pytest.raises(FileNotFoundError, match="is unfinished"):
        precomputed.load_metadata(tmp_path, NAME)
    with pytest.raises(KeyError, match=r"has no split 'train' \(it has \['heldout', 'validation'\]\)"):
        precomputed.make_batch_iterator(data_dir, NAME, split="train", batch_size=8, seed=0)
    with pytest.raises(KeyError, match=r"has no features \['pixels'\]"):
        precomputed.make_batch_iterator(data_dir, NAME, split="heldout", batch_size=8, seed=0, keys=["pixels"])
