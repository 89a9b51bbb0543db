"""`tools/generate.py` as a user runs it: the docs/SHAPES.md output layout from a prompts file, variations of an
image, and one-line errors for bad prompts, files and priors that leave no OUT behind."""

import json
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clipgen_jax import pipeline
from clipgen_jax.data import shapes

from helpers import PROMPTS, check_two_prompts_two_kept, save_prior_bundle, tiny_models

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOL = str(REPO_ROOT / "tools" / "generate.py")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate_tool")
    vqgan_path, clip_path = tiny_models(root)
    return save_prior_bundle(root / "prior", vqgan_path, clip_path)


def _run(*args, cwd=REPO_ROOT):
    return subprocess.run([sys.executable, TOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_prompts_file_gives_the_shapes_layout(bundle, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    result = _run(f"--prompts={prompts_file}", f"--prior={bundle}", "--num_candidates=3", "--keep=2", "--seed=3",
                  "--batch_size=4", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    records = check_two_prompts_two_kept(out)
    # The same images and scores as the library gives for these settings.
    images, scores = pipeline.Pipeline.load(bundle).generate(PROMPTS, num_candidates=3, keep=2, seed=3, batch_size=4)
    for record in records:
        saved = np.asarray(Image.open(out / record["file"]))
        np.testing.assert_array_equal(saved, images[record["prompt_index"], record["rank"]])
        assert record["clip_score"] == pytest.approx(float(scores[record["prompt_index"], record["rank"]]), abs=1e-6)
    assert records[0]["clip_score"] >= records[1]["clip_score"] and records[2]["clip_score"] >= records[3]["clip_score"]
    assert np.asarray(Image.open(out / "grid.png")).shape == (2 * 33 + 1, 2 * 33 + 1, 3)


def test_image_variations_with_the_command_a_front_end_reports(bundle, tmp_path):
    source = tmp_path / "source.png"
    Image.fromarray(shapes.render(shapes.Attributes(0, 0, 1, 4, 0), 48, np.random.default_rng(0))).save(source)
    pipe = pipeline.Pipeline.load(bundle)
    with Image.open(source) as image:
        embedding = pipe.clip.embed_images(pipeline.image_pixels(image)[None])[0]
    expected = pipe.generate_one(image_embedding=embedding, image_path=str(source), num_candidates=2, seed=2,
                                 temperature=0.9, top_p=0.9)
    out = tmp_path / "variations"
    result = _run(*shlex.split(expected.command)[2:], f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["0000_00.png", "grid.png", "samples.json"]
    (record,) = json.loads((out / "samples.json").read_text())
    assert record["image"] == str(source) and "prompt" not in record and -1.0 <= record["clip_score"] <= 1.0
    assert record["clip_score"] == pytest.approx(float(expected.scores_K[0]), abs=1e-6)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "0000_00.png")), expected.images_KHWC[0])
    assert expected.images_KHWC[0].shape == (32, 32, 3)  # the model's native resolution


def test_official_preset_clips_top_k_to_the_vocabulary_and_yields_to_explicit_flags(bundle, tmp_path):
    out = tmp_path / "official"
    result = _run(f"--text={PROMPTS[0]}", f"--prior={bundle}", "--preset=official", "--num_candidates=8", "--seed=1",
                  f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: --preset=official top_k 500 clipped to the prior's vocabulary size 64" in result.stderr
    records = json.loads((out / "samples.json").read_text())
    images, scores = pipeline.Pipeline.load(bundle).generate(PROMPTS[:1], num_candidates=8, keep=8, seed=1,
                                                             temperature=1.0, top_k=64, top_p=0.95)
    assert len(records) == 8  # the preset's keep
    for record in records:
        np.testing.assert_array_equal(np.asarray(Image.open(out / record["file"])), images[0, record["rank"]])


@pytest.mark.parametrize("case", ["empty_line", "empty_text", "unreadable_file", "too_long", "two_sources",
                                  "missing_prior", "guidance_without_null_embedding"])
def test_prompt_problems_are_one_line_errors_and_leave_no_output(case, bundle, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    out = tmp_path / "out"
    args, cwd, expected = {
        "empty_line": ([f"--prompts={prompts_file}"], REPO_ROOT, "line 2 of the prompts file .* is empty"),
        "empty_text": (["--text=a red circle", "--text= "], REPO_ROOT, "--text number 2 is empty"),
        "unreadable_file": ([f"--prompts={tmp_path / 'missing.txt'}"], REPO_ROOT,
                            "cannot read the prompts file .*missing.txt: No such file"),
        "too_long": ([f"--text={PROMPTS[0]} next to a green square"], REPO_ROOT,
                     "prompt 0 is too long: .* at most 16 fit"),
        "two_sources": ([f"--text={PROMPTS[0]}", f"--prompts={prompts_file}"], REPO_ROOT,
                        "give exactly one of --text, --prompts and --image .got --text and --prompts."),
        "missing_prior": ([f"--text={PROMPTS[0]}", f"--prior={tmp_path / 'nothing'}"], REPO_ROOT,
                          "no prior at .*nothing: train one"),
        "guidance_without_null_embedding": ([f"--text={PROMPTS[0]}", "--guidance_scale=2"], REPO_ROOT,
                                            r"guidance_scale=2.0 needs a prior trained with condition dropout"),
    }[case]
    if case != "missing_prior":
        args.append(f"--prior={bundle}")
    result = _run(*args, f"--out={out}", cwd=cwd)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and "Traceback" not in result.stderr
    assert re.search(expected, last_line), last_line
    assert not out.exists() and not list(tmp_path.glob(".out*"))
