"""The emoji example (real images with their names) end to end at a tiny size, as the README runs it: glyphs
rendered by tools/make_emoji_folder.py, then the emoji presets of configs/ (shrunk) train a VQGAN, a domain CLIP and an
evaluation CLIP, precompute, train a prior, and tools/evaluate.py scores the VQGAN and generation for the names of the
folder's validation part, which no stage trained on. Needs Debian's fonts-noto-color-emoji (.ci/run installs it)."""

import json
import pathlib
import subprocess
import sys

import pytest

from clipgen_jax import precompute, training
from clipgen_jax.data import images, precomputed
from clipgen_jax.models import lpips

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
NUM_GLYPHS = 48

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not pathlib.Path(FONT).is_file(),
                                 reason=f"no {FONT}: apt-get install fonts-noto-color-emoji (.ci/run does)")]


def _tool(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / name), *args], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _config(preset: str, folder: pathlib.Path, **train):
    config = training.load_config(f"configs/{preset}")
    config.data.folder = str(folder)
    config.train.update(log_every=2, eval_every=train["steps"], checkpoint_every=train["steps"], **train)
    config.optimizer.warmup_steps = 1
    return config


def test_emoji_example_at_a_tiny_size(tmp_path):
    folder = tmp_path / "images"
    assert f"wrote {NUM_GLYPHS} images" in _tool("make_emoji_folder.py", f"--out={folder}", f"--limit={NUM_GLYPHS}")
    assert (folder / "u00a9.txt").read_text() == "copyright sign\n"
    config = _config("vqgan.py:emoji", folder, steps=4, batch_size=8, eval_batch_size=8)
    config.model.update(ch=16, codebook_size=32)
    validation = images.make_source(config.data, "validation")
    assert 0 < len(validation) < NUM_GLYPHS // 4  # the preset's 10% (by the hash of the file name)

    training.train(config, str(tmp_path / "vqgan"))
    # The workdir records the fraction; resuming with another one (a workdir made before folders had parts records
    # none: 0) is refused in one line that says what to do.
    recorded = json.loads((tmp_path / "vqgan" / "config.json").read_text())
    assert recorded["data"]["validation_fraction"] == 0.1
    del recorded["data"]["validation_fraction"]
    (tmp_path / "vqgan" / "config.json").write_text(json.dumps(recorded))
    config.train.steps = 6
    with pytest.raises(ValueError, match=r"resume it with --config.data.validation_fraction=0.0, or train into"):
        training.train(config, str(tmp_path / "vqgan"))

    clips = {}
    for preset in ("emoji", "emoji_eval"):
        clip_config = _config(f"clip.py:{preset}", folder, steps=2, batch_size=8, eval_batch_size=8)
        clip_config.model.update(vision_width=32, vision_layers=1, vision_heads=2, text_width=32, text_layers=1,
                                 text_heads=2, projection_dim=16)
        clips[preset] = tmp_path / preset
        training.train(clip_config, str(clips[preset]))

    pre = training.load_config("configs/precompute.py:emoji")
    pre.data.folder = str(folder)
    pre.update(vqgan=str(tmp_path / "vqgan"), clip=str(clips["emoji"] / "export"), batch_size=16)
    pre.output.data_dir = str(tmp_path / "precomputed")
    precompute.precompute(pre)
    metadata = precomputed.load_metadata(pre.output.data_dir, "emoji32")
    assert metadata["num_examples"] == {"train": NUM_GLYPHS - len(validation), "validation": len(validation)}

    prior = _config("prior.py:emoji", folder, steps=2, batch_size=8, eval_batch_size=8)
    prior.data.data_dir = pre.output.data_dir
    prior.update(vqgan=pre.vqgan, clip=pre.clip)
    prior.model.update(vocab_size=32, cond_dim=16, width=32, depth=1, num_heads=2)
    prior.train.eval_every = 0  # tools/evaluate.py samples below
    training.train(prior, str(tmp_path / "prior"))

    out = tmp_path / "vqgan_eval.json"
    scores = json.loads(_tool("evaluate.py", "vqgan", f"--vqgan={tmp_path / 'vqgan'}", f"--out={out}"))
    assert scores["split"] == "validation" and scores["num_images"] == len(validation)
    assert scores["data"] == f"folder:{folder} (validation part, 10%)"
    assert ("lpips" in scores) == lpips.default_weights_path().is_file()

    out = tmp_path / "generation.json"
    _tool("evaluate.py", "prior", f"--prior={tmp_path / 'prior'}", f"--eval_clip={clips['emoji_eval'] / 'export'}",
          "--seeds=0", "--images_per_prompt=1", "--num_candidates=2", f"--out={out}")
    results = json.loads(out.read_text())
    assert results["reference"] == f"folder:{folder} (validation part, 10%)"
    assert results["num_reference_images"] == len(validation)
    methods = results["methods"]
    assert all(summary["num_prompts"] == len(validation) for summary in methods.values())
    assert {"real images of the prompts (reference)", "real images of other prompts (mismatched)"} <= set(methods)
