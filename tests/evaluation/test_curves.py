import json

import numpy as np
import pytest
from PIL import Image

from clipgen_jax.evaluation import curves


def _write_metrics(workdir, lines):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / curves.METRICS_FILE).write_text("".join(line + "\n" for line in lines))


def test_read_metrics_sorts_by_step_and_the_last_line_of_a_step_wins(tmp_path):
    # A run killed after logging step 20 (its last line cut short), resumed from step 10, which logs 20 again.
    _write_metrics(tmp_path, [json.dumps({"step": 10, "train/loss": 3.0, "eval/psnr": 20.0}),
                              json.dumps({"step": 20, "train/loss": 2.5}),
                              '{"step": 30, "train/lo',
                              json.dumps({"step": 20, "train/loss": 2.0}),
                              json.dumps({"step": 15, "train/loss": 2.8})])
    metrics = curves.read_metrics(tmp_path)
    steps, values = metrics["train/loss"]
    np.testing.assert_array_equal(steps, [10, 15, 20])
    np.testing.assert_array_equal(values, [3.0, 2.8, 2.0])
    np.testing.assert_array_equal(metrics["eval/psnr"][0], [10])


def test_plot_curves_draws_the_panels_with_data_and_skips_the_rest(tmp_path):
    _write_metrics(tmp_path / "a", [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in range(1, 30)])
    _write_metrics(tmp_path / "b", [json.dumps({"step": s, "eval/acc": s / 10}) for s in range(1, 4)])
    panels = [("loss", "nats", [("a", tmp_path / "a", "train/loss"), ("b", tmp_path / "b", "train/loss")]),
              ("accuracy", "fraction", [("b", tmp_path / "b", "eval/acc"), ("c", tmp_path / "c", "eval/acc")]),
              ("absent", "-", [("a", tmp_path / "a", "eval/nothing")])]
    drawn = curves.plot_curves(panels, tmp_path / "curves.png")
    assert drawn == ["loss", "accuracy"]
    image = np.asarray(Image.open(tmp_path / "curves.png").convert("RGB"))
    assert image.shape == (360, 1100, 3) and image.std() > 10  # two panels side by side, with lines drawn


def test_plot_curves_with_no_data_at_all_is_an_error_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="no metric of"):
        curves.plot_curves([("loss", "nats", [("a", tmp_path / "missing", "train/loss")])], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()
