"""notebooks/*.ipynb, executed as a user runs them (a Jupyter kernel, cell by cell, with nbclient) in their quick mode
on the CPU, so that they never fall behind the code; and the stored notebooks are kept free of outputs."""

import json
import os
import pathlib
import shutil
import tarfile

import nbformat
import pytest
from helpers import save_prior_bundle, tiny_models

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO_ROOT / "notebooks"
QUICK_ENV = "CLIPGEN_NOTEBOOK_QUICK"
CELL_TIMEOUT_S = 600
# The Colab notebook trains on every device; on the CPU, virtual devices stand in for the TPU cores, so that the
# sharded path (each batch split over the mesh) is the one executed. Two cost about 10% more time than one device.
VIRTUAL_DEVICES_FLAG = "--xla_force_host_platform_device_count=2"


def _execute(name: str, cwd: pathlib.Path, monkeypatch, **env: str) -> nbformat.NotebookNode:
    """Runs the notebook in a fresh kernel whose working directory is `cwd` and whose environment has the quick flag
    and `env`; a cell that raises fails the test with that cell's traceback."""
    from nbclient import NotebookClient

    monkeypatch.setenv(QUICK_ENV, "1")  # the kernel inherits this process's environment (and conftest's JAX cache)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


def _shown_images(notebook: nbformat.NotebookNode) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.outputs)


def _samples(out: pathlib.Path, num_prompts: int, keep: int) -> list[dict]:
    """The records of a save_samples output, checked: every image written, CLIP similarities in [-1, 1]."""
    records = json.loads((out / "samples.json").read_text())
    assert len(records) == num_prompts * keep and (out / "grid.png").is_file()
    for record in records:
        assert (out / record["file"]).is_file() and -1.0 <= record["clip_score"] <= 1.0
    return records


@pytest.mark.parametrize("name", ["colab_tpu_shapes.ipynb", "generate_with_checkpoint.ipynb"])
def test_notebooks_are_stored_without_outputs_and_have_a_quick_parameters_cell(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    assert "parameters" in code[0].metadata.get("tags", []) and QUICK_ENV in code[0].source


@pytest.mark.slow
def test_colab_notebook_trains_the_shapes_chain_on_every_device_and_generates(tmp_path, monkeypatch):
    flags = f"{os.environ.get('XLA_FLAGS', '')} {VIRTUAL_DEVICES_FLAG}".strip()
    notebook = _execute("colab_tpu_shapes.ipynb", tmp_path, monkeypatch, XLA_FLAGS=flags)
    outputs = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "training mesh: {'data': 2, 'fsdp': 1}" in outputs
    out = tmp_path / "runs" / "shapes_colab"
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] and results["prior"]["num_prompts"] == 96
    for method in ("reranked", "single"):
        assert 0.0 <= results["prior"][method]["mean"]["oracle_all"] <= 1.0
    records = _samples(out / "generated", num_prompts=4, keep=4)
    assert records[0]["prompt"] == "a small red circle in the top left on a black background"
    assert _shown_images(notebook) == 3  # the held-out grid, the training curves and the Pipeline's grid
    assert outputs.count("the oracle reads") == 4


@pytest.mark.slow
def test_checkpoint_notebook_downloads_a_prior_and_generates_with_the_given_clip(tmp_path, monkeypatch):
    # A tiny random prior and VQGAN packed as a run directory, served by a file:// URL; the originals are removed so
    # that the prior can only find its VQGAN through the path it records relative to itself. The CLIP stays apart,
    # as the Hub's OpenAI CLIP does.
    models = tmp_path / "models"
    vqgan_path, clip_path = tiny_models(models)
    save_prior_bundle(models / "prior", vqgan_path, clip_path)
    archive = tmp_path / "tiny_run.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for part in ("vqgan", "prior"):
            tar.add(models / part, arcname=f"tiny_run/{part}")
            shutil.rmtree(models / part)
    work = tmp_path / "work"
    work.mkdir()
    # The last section converts tiny official-format CLIP-GEN files conditioned on 16-d embeddings, as the tiny CLIP's.
    official = REPO_ROOT / "tests" / "fixtures" / "clipgen"
    notebook = _execute("generate_with_checkpoint.ipynb", work, monkeypatch,
                        CLIPGEN_NOTEBOOK_CHECKPOINT=archive.as_uri(), CLIPGEN_NOTEBOOK_CLIP=str(clip_path),
                        CLIPGEN_NOTEBOOK_OFFICIAL_VQGAN=str(official / "single_attention_vqgan.pt"),
                        CLIPGEN_NOTEBOOK_OFFICIAL_GPT=str(official / "single_attention_gpt.pt"),
                        CLIPGEN_NOTEBOOK_OFFICIAL_HEADS="4")
    assert (work / "checkpoints" / "tiny_run" / "tiny_run" / "prior" / "metadata.json").is_file()
    records = _samples(work / "generated", num_prompts=4, keep=2)
    assert [r["prompt"] for r in records[::2]] == ["a photo of a golden retriever", "a red sports car on a road",
                                                    "a bowl of fruit on a table", "a lighthouse by the sea"]
    assert [r["prompt"] for r in _samples(work / "generated_clipgen_coco", num_prompts=2, keep=2)[::2]] == [
        "A city bus driving on the city street", "A train being operated on a train track"]
    assert _shown_images(notebook) == 2
