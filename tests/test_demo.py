"""`tools/demo.py --quick` as CI runs it: the whole chain (Shapes, VQGAN, CLIP, precompute, prior, generation and the
oracle's scores) on the tiny Shapes build, the output layout of docs/SHAPES.md, and a rerun that reuses it."""

import json
import pathlib
import subprocess
import sys

import pytest
from PIL import Image
from helpers import tiny_models

from clipgen_jax import demo
from clipgen_jax.data import shapes
from clipgen_jax.evaluation import curves

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = ["build_shapes", "train_vqgan", "evaluate_vqgan", "precompute", "train_prior", "generate_evaluate"]


def _demo(out: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO_ROOT / "tools" / "demo.py"), "--quick", f"--out={out}", *flags]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _check_prior_scores(prior: dict) -> None:
    assert prior["num_prompts"] == 96 and prior["num_candidates"] == demo.QUICK_CANDIDATES
    assert prior["seeds"] == list(demo.QUICK_SEEDS) and prior["train_steps"] == demo.QUICK_PRIOR_STEPS
    assert prior["eval_clip"] == demo.EVAL_CLIP and prior["num_reference_images"] == 96
    assert prior["images_per_prompt"] == demo.QUICK_IMAGES_PER_PROMPT
    for method in ("reranked", "single"):
        assert len(prior[method]["per_seed"]) == len(demo.QUICK_SEEDS)
        for key in ("all",) + shapes.ATTRIBUTE_NAMES:
            assert 0.0 <= prior[method]["mean"][f"oracle_{key}"] <= 1.0
            assert prior[method]["std"][f"oracle_{key}"] is None  # one seed: no spread
        for half in shapes.HELDOUT_HALVES:  # the strict reading never scores above the lenient one
            mean = prior[method]["mean"]
            assert 0.0 <= mean[f"oracle_{half}_all"] <= mean[f"oracle_{half}_lenient_all"] <= 1.0
        assert 0.0 <= prior[method]["mean"]["clip_score"] <= 100.0 and prior[method]["mean"]["fd_clip"] > 0.0


def _check_layout(out: pathlib.Path) -> None:
    assert (out / "vqgan" / "export" / "metadata.json").is_file()
    assert (out / "data" / "clipgen_shapes" / "tiny" / "1.0.0" / "dataset_info.json").is_file()  # the Shapes source
    assert (out / "data" / "tiny" / "1.0.0" / "dataset_info.json").is_file()  # the precomputed dataset beside it
    assert (out / "prior" / "export" / "metadata.json").is_file()
    grid = Image.open(out / demo.GRID_FILE)
    assert grid.mode == "RGB" and grid.height > demo.GRID_PROMPTS * 33 and grid.width >= demo.QUICK_CANDIDATES * 33
    assert Image.open(out / demo.CURVES_FILE).width > 500


@pytest.mark.slow
def test_quick_demo_writes_results_and_reuses_finished_stages(tmp_path):
    _, clip_dir = tiny_models(tmp_path / "models")  # a tiny random CLIP (16-d), as the packaged one is passed
    out = tmp_path / "demo"
    _demo(out, f"--clip={clip_dir}")
    results = json.loads((out / "results.json").read_text())
    heldout = results["vqgan_heldout"]
    assert heldout["num_images"] == 96  # the tiny build's held-out split
    assert 0.0 < heldout["codebook_usage"] <= 1.0 and 0.0 <= heldout["oracle_agreement/all"] <= 1.0
    assert heldout["oracle_agreement/all"] <= heldout["oracle_agreement/lenient_all"]
    assert heldout["inputs_margin_below_min"] <= 0.05 and heldout["inputs_margin_p10"] >= shapes.MIN_SHAPE_MARGIN
    assert list(results["seconds"]) == STAGES and results["reused"] == []
    assert all(seconds > 0 for name, seconds in results["seconds"].items() if name != "build_shapes")
    assert results["clip"]["name"] == str(clip_dir) and results["clip"]["embed_dim"] == 16
    assert not results["clip"]["trained_by_demo"]
    _check_prior_scores(results["prior"])
    budget = {line["stage"]: line for line in results["budget"]}
    assert [line["limit_minutes"] for line in results["budget"]] == [12, 2, 10, 6, 30]
    assert budget["total"]["measured_minutes"] == pytest.approx(sum(results["seconds"].values()) / 60, abs=0.01)
    assert budget["prior"]["measured_minutes"] == pytest.approx(results["seconds"]["train_prior"] / 60, abs=0.01)
    _check_layout(out)
    text = (out / "results.md").read_text()
    for heading in ("| images | PSNR (dB)", "## CLIP", "| method | CLIP score (shapes-clip-eval) | FD-CLIP",
                    "| CLIP-GEN, CLIP re-ranking (best of 4)", "| CLIP-GEN, no re-ranking", "| strict |",
                    "| reconstructions |", "Test half (48 prompts), the headline:", "Tuning half (48 prompts)",
                    "| stage | budget | measured | within |", "| generation + evaluation | 6 |"):
        assert heading in text

    second = _demo(out, f"--clip={clip_dir}")
    assert "resumed from" in second.stderr
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["vqgan_heldout"] == heldout and rerun["prior"] == results["prior"]
    assert rerun["reused"] == ["build_shapes", "train_vqgan", "precompute", "train_prior", "generate_evaluate"]
    for name in rerun["reused"]:  # a reused stage keeps the time of the run that did it
        assert rerun["seconds"][name] == results["seconds"][name]

    _demo(out, f"--clip={clip_dir}", "--compare")
    compared = json.loads((out / "results.json").read_text())
    labels = [label for _, label, _, _ in demo.COMPARE_PRIORS]
    vqgan_clip_label = (f"VQGAN+CLIP (optimisation, {demo.QUICK_VQGAN_CLIP_STEPS} steps, best of "
                        f"{demo.VQGAN_CLIP_CANDIDATES})")
    assert list(compared["compare"]) == ["CLIP-GEN, CLIP re-ranking (best of 4)", "CLIP-GEN, no re-ranking", *labels,
                                         vqgan_clip_label]
    vqgan_clip_row = compared["compare"][vqgan_clip_label]
    assert vqgan_clip_row["num_candidates"] == demo.VQGAN_CLIP_CANDIDATES
    assert 0.0 <= vqgan_clip_row["mean"]["oracle_all"] <= 1.0 and vqgan_clip_row["mean"]["fd_clip"] > 0.0
    assert compared["compare"]["CLIP-GEN, no re-ranking"]["mean"] == results["prior"]["single"]["mean"]
    for key, label, cond, _ in demo.COMPARE_PRIORS:
        metadata = json.loads((out / "compare" / key / "export" / "metadata.json").read_text())
        assert {k: metadata["cond"][k] for k in cond} == cond
        assert 0.0 <= compared["compare"][label]["mean"]["oracle_all"] <= 1.0
        assert compared["compare"][label]["num_candidates"] == demo.QUICK_CANDIDATES
    assert compared["budget"][-1]["stage"] == "total with --compare"
    assert "## Comparison (`--compare`)" in (out / "results.md").read_text()
    drawn = curves.plot_curves(demo.curve_panels(out, [key for key, *_ in demo.COMPARE_PRIORS]), tmp_path / "c.png")
    assert drawn == ["VQGAN", "VQGAN reconstruction", "prior", "prior: held-out tuning half, Shapes oracle"]


@pytest.mark.slow
def test_quick_demo_trains_its_own_clip(tmp_path):
    _demo(tmp_path, "--train-clip")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["clip"]["trained_by_demo"] and results["clip"]["name"] == str(tmp_path / "clip" / "export")
    assert (tmp_path / "clip" / "export" / "config.json").is_file()
    assert list(results["seconds"]) == STAGES[:3] + ["train_clip"] + STAGES[3:]
    assert results["budget"][-1]["measured_minutes"] == pytest.approx(sum(results["seconds"].values()) / 60,
                                                                      abs=0.01)
    _check_prior_scores(results["prior"])
    _check_layout(tmp_path)


def test_a_stage_reused_without_a_recorded_time_leaves_its_budget_lines_unknown():
    # A run stopped before writing results.json leaves finished stages whose time nobody recorded.
    seconds = {"build_shapes": 0.0, "train_vqgan": None, "evaluate_vqgan": 17.1, "precompute": 9.5,
               "train_prior": 689.8, "generate_evaluate": 365.3}
    lines = {line["stage"]: line for line in demo.budget(seconds)}
    for stage in ("VQGAN (train + evaluate)", "total"):
        assert lines[stage]["measured_minutes"] is None and lines[stage]["within"] is None
    assert (lines["prior"]["measured_minutes"], lines["prior"]["within"]) == (11.5, False)
    assert (lines["precompute"]["measured_minutes"], lines["precompute"]["within"]) == (0.16, True)
    assert demo.budget({**seconds, "train_vqgan": 540.0})[-1] == {
        "stage": "total", "stages": sorted(seconds), "limit_minutes": 30, "measured_minutes": 27.03, "within": True}
