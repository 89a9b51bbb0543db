"""`tools/evaluate.py prior` as a user runs it: CLIP score and FD-CLIP from another CLIP than the prior's, against
a split's images, with and without re-ranking; the prior's own CLIP is refused as the scorer; the oracle's scores of
one held-out half; --wordings only on the Shapes combinations."""

import json
import pathlib
import subprocess
import sys

import pytest
import transformers
from helpers import CONTEXT_LENGTH, save_prior_bundle, small_clip_config, tiny_models

from clipgen_jax.data import shapes
from clipgen_jax.models import clip, clip_tokenizer

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOL = str(REPO_ROOT / "tools" / "evaluate.py")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_tool")
    vqgan_path, clip_path = tiny_models(root)
    model = transformers.FlaxCLIPModel(small_clip_config(), seed=7)
    clip.export(model, model.params, clip_tokenizer.openai_tokenizer(CONTEXT_LENGTH), clip.Preprocessing(32, 32),
                root / "eval_clip")
    return save_prior_bundle(root / "prior", vqgan_path, clip_path), root / "eval_clip", clip_path


def _run(*args):
    return subprocess.run([sys.executable, TOOL, "prior", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_prior_scores_with_another_clip_against_the_split(models, shapes_data_dir, tmp_path):
    prior, eval_clip, _ = models
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "scores.json"
    data = ["--source=shapes", "--name=tiny", f"--data_dir={shapes_data_dir}", "--split=heldout"]
    result = _run(f"--prior={prior}", f"--eval_clip={eval_clip}", f"--prompts={prompts}", "--num_candidates=2",
                  "--seeds=0,1", "--images_per_prompt=3", f"--out={out}", *data)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["num_reference_images"] == 96 and results["eval_clip"] == str(eval_clip)
    reranked, single = results["methods"].values()
    assert reranked["num_candidates"] == 2 and single["num_candidates"] == 1
    for summary in (reranked, single):
        assert summary["images_per_prompt"] == 3 and summary["seeds"] == [0, 1]
        assert set(summary["mean"]) == {"clip_score", "fd_clip"}  # no oracle for free-form prompts
        assert 0 <= summary["mean"]["clip_score"] <= 100 and summary["mean"]["fd_clip"] > 0
        assert summary["std"]["fd_clip"] is not None
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[0].startswith(f"| method | CLIP score ({eval_clip}) | FD-CLIP ({eval_clip})") and len(table) == 4


def test_the_prior_s_own_clip_cannot_score(models, shapes_data_dir, tmp_path):
    prior, _, own_clip = models
    result = _run(f"--prior={prior}", f"--eval_clip={own_clip}", "--source=shapes", "--name=tiny",
                  f"--data_dir={shapes_data_dir}", f"--out={tmp_path / 'scores.json'}")
    assert result.returncode != 0
    assert "is the CLIP that conditions and re-ranks the prior" in result.stderr
    assert not (tmp_path / "scores.json").exists()


def test_prior_scores_training_combinations_with_the_oracle(models, shapes_data_dir, tmp_path):
    prior, eval_clip, _ = models
    out = tmp_path / "scores.json"
    result = _run(f"--prior={prior}", f"--eval_clip={eval_clip}", "--combinations=training", "--num_candidates=1",
                  "--seeds=0", "--images_per_prompt=1", f"--out={out}", "--source=shapes", "--name=tiny",
                  f"--data_dir={shapes_data_dir}", "--split=heldout")
    assert result.returncode == 0, result.stderr[-3000:]
    for summary in json.loads(out.read_text())["methods"].values():
        assert summary["num_prompts"] == 96 and 0.0 <= summary["mean"]["oracle_all"] <= 1.0


def test_prior_scores_one_heldout_half_at_its_seeds(models, shapes_data_dir, tmp_path):
    prior, eval_clip, _ = models
    out = tmp_path / "scores.json"
    result = _run(f"--prior={prior}", f"--eval_clip={eval_clip}", "--half=tuning", "--num_candidates=1",
                  "--images_per_prompt=1", f"--out={out}", "--source=shapes", "--name=tiny",
                  f"--data_dir={shapes_data_dir}", "--split=heldout")
    assert result.returncode == 0, result.stderr[-3000:]
    for summary in json.loads(out.read_text())["methods"].values():
        assert summary["num_prompts"] == 48 and summary["seeds"] == list(shapes.TUNING_SEEDS)  # the tuning defaults
        mean = summary["mean"]
        assert mean["oracle_tuning_all"] == mean["oracle_all"] and "oracle_test_all" not in mean
        assert 0.0 <= mean["oracle_tuning_all"] <= mean["oracle_tuning_lenient_all"] <= 1.0
    table = out.with_suffix(".md").read_text()
    assert table.startswith("tuning half:\n\n| method | CLIP score") and "| all, lenient |" in table
    assert table in result.stderr  # printed too


def test_wordings_need_the_shapes_combinations(models, tmp_path):
    prior, eval_clip, _ = models
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    result = _run(f"--prior={prior}", f"--eval_clip={eval_clip}", f"--prompts={prompts}", "--wordings")
    assert result.returncode != 0 and "--wordings writes the Shapes combinations" in result.stderr
