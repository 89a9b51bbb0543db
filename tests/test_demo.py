"""`tools/demo.py --quick` as CI runs it: the whole demo on the tiny Shapes build, and a rerun that reuses it."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_demo_writes_results_and_reuses_finished_stages(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "tools" / "demo.py"), "--quick", f"--out={tmp_path}"]
    first = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    heldout = results["vqgan_heldout"]
    assert heldout["num_images"] == 96  # the tiny build's held-out split
    assert 0.0 < heldout["codebook_usage"] <= 1.0 and 0.0 <= heldout["oracle_agreement/all"] <= 1.0
    assert "| images | PSNR (dB)" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "vqgan" / "export" / "metadata.json").is_file()

    second = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    assert json.loads((tmp_path / "results.json").read_text())["vqgan_heldout"] == heldout
