"""Training curves from the `metrics.jsonl` every run writes (training/writer.py), plotted to PNG."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str | pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (steps, values), sorted by step. A run resumed after a kill logs some steps again: the last line for
    a step wins, as it comes from the run whose checkpoints were kept."""
    by_name: dict[str, dict[int, float]] = {}
    path = pathlib.Path(workdir) / METRICS_FILE
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of a killed run may be cut short
            continue
        step = int(record.pop("step"))
        for name, value in record.items():
            by_name.setdefault(name, {})[step] = float(value)
    return {name: (np.array(sorted(points)), np.array([points[s] for s in sorted(points)]))
            for name, points in by_name.items()}


# A panel: (title, y label, [(legend label, workdir, metric name)]); a line whose run lacks the metric is left out.
Panel = tuple[str, str, Sequence[tuple[str, pathlib.Path, str]]]


def plot_curves(panels: Sequence[Panel], path: str | pathlib.Path, columns: int = 2) -> list[str]:
    """Draws one subplot per panel into the PNG `path`; returns the titles of the panels that had data."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    from matplotlib import pyplot as plt

    metrics = {workdir: read_metrics(workdir) for _, _, lines in panels for _, workdir, _ in lines
               if (pathlib.Path(workdir) / METRICS_FILE).is_file()}
    drawn = [(title, ylabel, [(label, *metrics[w][name]) for label, w, name in lines
                              if name in metrics.get(w, {})]) for title, ylabel, lines in panels]
    drawn = [panel for panel in drawn if panel[2]]
    if not drawn:
        raise ValueError(f"no metric of {[title for title, _, _ in panels]} was found in the runs' {METRICS_FILE}")
    rows = -(-len(drawn) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.6 * rows), squeeze=False)
    for ax, (title, ylabel, lines) in zip(axes.flat, drawn):
        for label, steps, values in lines:
            ax.plot(steps, values, marker="." if len(steps) < 20 else None, label=label)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    for ax in axes.flat[len(drawn):]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return [title for title, _, _ in drawn]
