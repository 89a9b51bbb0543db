"""How well an image -> image model (an autoencoder, a VQGAN) keeps what matters: PSNR, and on Shapes whether the
oracle reads the same five attributes from the reconstruction as from the input."""

from typing import Callable, Iterable

import numpy as np

from clipgen_jax.data import shapes
from clipgen_jax.evaluation import image_metrics


def oracle_agreement(inputs_u8: np.ndarray, reconstructions_u8: np.ndarray) -> np.ndarray:
    """[N, 5] booleans: the oracle reads attribute i of image n the same way from both (and refuses neither)."""
    agree = np.zeros((len(inputs_u8), len(shapes.ATTRIBUTE_NAMES)), bool)
    for n, (a, b) in enumerate(zip(shapes.oracle_batch(inputs_u8), shapes.oracle_batch(reconstructions_u8))):
        if a.status == b.status == "ok":
            agree[n] = np.equal(a.attributes, b.attributes)
    return agree


def evaluate(reconstruct: Callable[[np.ndarray], np.ndarray], batches: Iterable[dict], *,
             shapes_oracle: bool) -> dict[str, float]:
    """Mean PSNR (dB, on the saved uint8 pixels) over every image of `batches`; with `shapes_oracle`, per-attribute and
    all-attribute oracle agreement between input and reconstruction."""
    psnrs, agreements = [], []
    for batch in batches:
        inputs_u8 = image_metrics.to_uint8(batch["image"])
        reconstructions_u8 = image_metrics.to_uint8(reconstruct(batch["image"]))
        psnrs.append(np.asarray(image_metrics.psnr(inputs_u8 / 127.5 - 1.0, reconstructions_u8 / 127.5 - 1.0)))
        if shapes_oracle:
            agreements.append(oracle_agreement(inputs_u8, reconstructions_u8))
    results = {"num_images": int(sum(len(p) for p in psnrs)), "psnr": float(np.concatenate(psnrs).mean())}
    if shapes_oracle:
        agree = np.concatenate(agreements)
        results.update({f"oracle_agreement/{name}": float(agree[:, i].mean())
                        for i, name in enumerate(shapes.ATTRIBUTE_NAMES)})
        results["oracle_agreement/all"] = float(agree.all(axis=1).mean())
    return results
