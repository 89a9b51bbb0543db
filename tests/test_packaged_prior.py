"""The Shapes prior and VQGAN shipped in the package (clipgen_jax/assets/shapes/): `tools/generate.py --text ...` with
no --prior, where no runs/shapes/prior exists, generates with them."""

import json
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_generate_without_a_prior_uses_the_packaged_shapes_prior(tmp_path):
    out = tmp_path / "out"
    prompt = "a large blue square in the center on a white background"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "generate.py"), f"--text={prompt}",
                             "--num_candidates=2", f"--out={out}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    image = np.asarray(Image.open(out / "0000_00.png"))
    assert image.shape == (32, 32, 3) and image.std() > 0
    (record,) = json.loads((out / "samples.json").read_text())
    assert record["prompt"] == prompt and np.isfinite(record["clip_score"])
