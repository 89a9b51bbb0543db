"""The FID wiring (clipgen_jax/evaluation/fid.py). clean-fid itself cannot run here: it needs a torchvision whose
compiled ops match the CPU torch, and its Inception weights cannot be downloaded. A stand-in with clean-fid's
`compute_fid` signature and its offline behaviour (no weights: urlopen fails) checks what reaches it and what comes
back, with a known-answer feature extractor."""

import glob
import os
import subprocess
import sys
import types
import urllib.error

import numpy as np
import pytest
from PIL import Image

from clipgen_jax.evaluation import fid, generation

torch = pytest.importorskip("torch")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _stand_in_compute_fid(fdir1, fdir2, *, mode, batch_size, device, num_workers, use_dataparallel,
                          custom_feat_extractor, verbose):
    if custom_feat_extractor is None:  # clean-fid would now download inception-2015-12-05.pt
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    def features(folder):
        files = sorted(glob.glob(os.path.join(folder, "**", "*.png"), recursive=True))
        batch = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
        return custom_feat_extractor(batch.permute(0, 3, 1, 2)).numpy()
    return generation.frechet_distance(features(fdir1), features(fdir2))


@pytest.fixture
def stand_in_clean_fid(monkeypatch):
    module = types.ModuleType("cleanfid")
    module.fid = types.SimpleNamespace(compute_fid=_stand_in_compute_fid)
    monkeypatch.setitem(sys.modules, "cleanfid", module)


def _mean_colour(batch_NCHW):
    return batch_NCHW.float().mean(dim=(2, 3))


def _save(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(path)


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    generated, reference = tmp_path / "generated", tmp_path / "reference"
    colours = {"generated": rng.integers(0, 256, (6, 3)), "reference": rng.integers(0, 256, (7, 3))}
    for index, colour in enumerate(colours["generated"]):  # tools/generate.py's layout: 3 prompts x 2 kept
        _save(generated / f"{index // 2:04d}_{index % 2:02d}.png", colour)
    _save(generated / "grid.png", (255, 255, 255))
    (generated / "samples.json").write_text("[]")
    for index, colour in enumerate(colours["reference"]):
        _save(reference / f"part{index % 2}" / f"ref{index}.png", colour)
    return generated, reference, colours


def test_fid_sees_the_numbered_samples_and_every_reference_image(stand_in_clean_fid, folders):
    generated, reference, colours = folders
    result = fid.compute_fid(generated, reference, feature_extractor=_mean_colour)
    expected = generation.frechet_distance(colours["generated"].astype(np.float64),
                                           colours["reference"].astype(np.float64))
    assert result["fid"] == pytest.approx(expected, rel=1e-5) and expected > 100
    assert (result["num_generated"], result["num_reference"]) == (6, 7)  # grid.png left out
    assert result["mode"] == "clean" and result["implementation"].endswith("(not FID)")


def test_missing_inception_weights_are_named_with_what_to_do(stand_in_clean_fid, folders):
    generated, reference, _ = folders
    with pytest.raises(fid.FidUnavailable, match=f"put it in {fid.INCEPTION_DIR}/") as error:
        fid.compute_fid(generated, reference)
    assert fid.INCEPTION_FILE in str(error.value)


def test_bad_folders_and_modes_are_refused(stand_in_clean_fid, folders, tmp_path):
    generated, reference, _ = folders
    with pytest.raises(FileNotFoundError, match="not a directory"):
        fid.compute_fid(tmp_path / "nowhere", reference)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        fid.compute_fid(generated, tmp_path / "empty")
    with pytest.raises(ValueError, match="clean-fid's modes"):
        fid.compute_fid(generated, reference, mode="fast")


def test_the_tool_without_clean_fid_says_how_to_install_it(folders):
    generated, reference, _ = folders
    if subprocess.run([sys.executable, "-c", "import cleanfid"], capture_output=True).returncode == 0:
        pytest.skip("clean-fid is installed here")
    result = subprocess.run([sys.executable, "tools/evaluate.py", "fid", f"--generated={generated}",
                             f"--reference={reference}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: FID needs clean-fid")
    assert "pip install clean-fid" in result.stderr and result.stdout == ""
