"""Run logging: scalars to TensorBoard event files and `metrics.jsonl`, image grids as PNG and to TensorBoard.

Only process 0 writes; other processes get a writer whose methods do nothing, so callers never branch on it.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib

import jax
import numpy as np
from PIL import Image

from clipgen_jax.evaluation import image_metrics


def image_grid(images_NHWC: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Tiles [-1, 1] float (or uint8) images into one uint8 [H, W, 3] grid with a 1-pixel gap."""
    images = np.asarray(images_NHWC)
    if images.dtype != np.uint8:
        images = image_metrics.to_uint8(images)
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, columns)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = image
    return grid


class MetricWriter:
    """Writes scalars and images of one run into its workdir."""

    def __init__(self, workdir: str | pathlib.Path):
        self._enabled = jax.process_index() == 0
        if not self._enabled:
            return
        from tensorboardX import SummaryWriter  # imported here: only process 0 needs it

        self._workdir = pathlib.Path(workdir)
        self._images_dir = self._workdir / "images"
        self._images_dir.mkdir(parents=True, exist_ok=True)
        self._tensorboard = SummaryWriter(str(self._workdir / "tensorboard"))
        self._jsonl = open(self._workdir / "metrics.jsonl", "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if not self._enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        for name, value in scalars.items():
            self._tensorboard.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()

    def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """Each value is a batch [N, H, W, 3] in [-1, 1] (or uint8), saved as one grid."""
        if not self._enabled:
            return
        for name, batch in images.items():
            grid = image_grid(batch)
            Image.fromarray(grid).save(self._images_dir / f"{name.replace('/', '_')}_{step:08d}.png")
            self._tensorboard.add_image(name, grid, step, dataformats="HWC")
        self._tensorboard.flush()

    def close(self) -> None:
        if self._enabled:
            self._tensorboard.close()
            self._jsonl.close()


def configure_console_logging() -> None:
    """INFO from this package, WARNING and above from libraries (Orbax and TFDS log every file they touch at INFO)."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("clipgen_jax").setLevel(logging.INFO)
