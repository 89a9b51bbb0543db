"""FID proper, through an established implementation (clean-fid, Parmar et al.), between two folders of images.

FID needs the Inception-v3 weights of the TensorFlow FID code. No package ships them and the project's machines cannot
download them, so this module only hands the folders to clean-fid: `pip install clean-fid` with a torchvision that
matches your torch, then either let clean-fid download its `inception-2015-12-05.pt` or put that file in its cache
directory yourself. When the package or the weights are missing the error says which and what to do. FD-CLIP
(`generation.frechet_distance` on CLIP features) is this project's own offline metric and is never called FID.

A folder written by `tools/generate.py` (it holds `samples.json`) contributes only its numbered samples, not its
grid.png; any other folder contributes every image file clean-fid finds in it.
"""

from __future__ import annotations

import pathlib
import re
import tempfile
import urllib.error
from typing import Any

SAMPLE_PATTERN = re.compile(r"^\d{4}_\d{2}\.png$")  # pipeline.sample_file_name: OUT/{prompt:04d}_{rank:02d}.png
INCEPTION_FILE = "inception-2015-12-05.pt"  # clean-fid's TorchScript port of the TensorFlow FID Inception
INCEPTION_DIR = "/tmp"  # where clean-fid (0.1.x) looks for it, and downloads it to, on Linux
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")


class FidUnavailable(RuntimeError):
    """FID cannot be computed here: the implementation or its weights are missing."""


def _load_clean_fid():
    try:
        from cleanfid import fid
    except ImportError as error:
        raise FidUnavailable(f"FID needs clean-fid ({error}): pip install clean-fid, with the torchvision build that "
                             "matches your torch") from None
    return fid


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory of images")
    if (folder / "samples.json").is_file():
        files = sorted(p for p in folder.iterdir() if SAMPLE_PATTERN.match(p.name))
    else:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} holds no images")
    return files


def compute_fid(generated_dir: str | pathlib.Path, reference_dir: str | pathlib.Path, *, mode: str = "clean",
                device: str = "cpu", batch_size: int = 32, feature_extractor: Any = None) -> dict[str, Any]:
    """{"fid", "mode", "implementation", "num_generated", "num_reference"} for the images of two folders.

    `feature_extractor`: clean-fid's `custom_feat_extractor` (a callable on uint8 NCHW torch batches), replacing
    Inception; for checking the wiring only, since a number from another network is not FID."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: clean-fid's modes are {', '.join(MODES)}")
    fid = _load_clean_fid()
    import torch

    folders = []
    with tempfile.TemporaryDirectory() as staging:
        for name, folder in (("generated", generated_dir), ("reference", reference_dir)):
            files = _image_files(pathlib.Path(folder))
            linked = pathlib.Path(staging) / name  # exactly the chosen files, under names clean-fid globs
            linked.mkdir()
            for index, path in enumerate(files):
                (linked / f"{index:08d}{path.suffix.lower()}").symlink_to(path.absolute())
            folders.append((linked, len(files)))
        try:
            value = fid.compute_fid(str(folders[0][0]), str(folders[1][0]), mode=mode, batch_size=batch_size,
                                    device=torch.device(device), num_workers=0, use_dataparallel=False,
                                    custom_feat_extractor=feature_extractor, verbose=False)
        except (urllib.error.URLError, ConnectionError) as error:
            raise FidUnavailable(f"clean-fid could not fetch the Inception weights ({error}); download "
                                 f"{INCEPTION_FILE} elsewhere and put it in {INCEPTION_DIR}/") from None
    return {"fid": float(value), "mode": mode,
            "implementation": "clean-fid" + (" with a custom feature extractor (not FID)" if feature_extractor
                                             else ""),
            "num_generated": folders[0][1], "num_reference": folders[1][1]}
