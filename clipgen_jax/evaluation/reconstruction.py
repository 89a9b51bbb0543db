"""How well an image -> image model (an autoencoder, a VQGAN) keeps what matters: PSNR, SSIM, optionally LPIPS,
codebook statistics for tokenizers, and on Shapes whether the oracle reads the same five attributes from the
reconstruction as from the input."""

from typing import Callable, Iterable, Sequence

import jax
import numpy as np

from clipgen_jax import checkpointing
from clipgen_jax.data import images, shapes
from clipgen_jax.models import lpips
from clipgen_jax.evaluation import image_metrics

# images [B, H, W, 3] in [-1, 1] -> (reconstructions [B, H, W, 3], int token grids [B, h, w] or None)
Reconstructor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


def oracle_agreement(inputs_u8: np.ndarray, reconstructions_u8: np.ndarray,
                     input_readings: Sequence[shapes.OracleResult] | None = None) -> np.ndarray:
    """[N, 5] booleans: the oracle reads attribute i of image n the same way from both (and refuses neither).
    `input_readings`: the oracle's results on `inputs_u8` where the caller has them already."""
    if input_readings is None:
        input_readings = shapes.oracle_batch(inputs_u8)
    agree = np.zeros((len(inputs_u8), len(shapes.ATTRIBUTE_NAMES)), bool)
    for n, (a, b) in enumerate(zip(input_readings, shapes.oracle_batch(reconstructions_u8), strict=True)):
        if a.status == b.status == "ok":
            agree[n] = np.equal(a.attributes, b.attributes)
    return agree


# Diagnostic only: reconstruction pixels within this L1 distance (summed over RGB, of 765) of the input's background
# colour count as background in `oracle_agreement_background_snapped/*`.
BACKGROUND_SNAP_L1 = 12


def _backgrounds(inputs_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each Shapes image's background colour [N, 1, 1, 3] (the border median, as the oracle reads it) and which of its
    pixels have exactly that colour [N, H, W]."""
    background_N113 = np.stack([shapes.border_median(image) for image in inputs_u8])[:, None, None, :]
    return background_N113, np.all(inputs_u8 == background_N113, axis=-1)


def background_diagnostics(inputs_u8: np.ndarray, reconstructions_u8: np.ndarray,
                           input_readings: Sequence[shapes.OracleResult] | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Where oracle disagreement comes from on Shapes: ([N] fraction of each input's background pixels reconstructed
    exactly, [N, 5] oracle agreement after snapping near-background reconstruction pixels to the background).

    The oracle's coverage map counts every pixel's distance from the background, so faint noise spread over the
    ~1,000 background pixels moves the coverage-weighted centroid at which the shape silhouettes are matched. The
    snapped agreement says how much of the disagreement that noise explains; it is not the score."""
    background_N113, is_background_NHW = _backgrounds(inputs_u8)
    distance_NHW = np.abs(reconstructions_u8.astype(np.float32) - background_N113).sum(axis=-1)
    exact_N = (((distance_NHW == 0) & is_background_NHW).sum(axis=(1, 2))
               / np.maximum(is_background_NHW.sum(axis=(1, 2)), 1))
    snapped = np.where((distance_NHW <= BACKGROUND_SNAP_L1)[..., None], background_N113, reconstructions_u8)
    return exact_N, oracle_agreement(inputs_u8, snapped.astype(np.uint8), input_readings)


def background_token_codes(inputs_u8: np.ndarray, tokens_Bhw: np.ndarray) -> np.ndarray:
    """The codes of the tokens whose image patch is all background (Shapes: the input's border colour). A tokenizer
    that gives a plain background a few codes leaves the prior little to model there; one whose background codes
    also describe the rest of the image gives it many."""
    batch, height, width, _ = inputs_u8.shape
    grid_h, grid_w = tokens_Bhw.shape[1:]
    _, is_background_BHW = _backgrounds(inputs_u8)
    patches = is_background_BHW.reshape(batch, grid_h, height // grid_h, grid_w, width // grid_w)
    return np.asarray(tokens_Bhw)[patches.all(axis=(2, 4))]


def evaluate(reconstruct: Reconstructor, batches: Iterable[dict], *, shapes_oracle: bool,
             codebook_size: int | None = None,
             perceptual: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> dict[str, float]:
    """Means over every image of `batches`, measured on the uint8 pixels a saved PNG would hold."""
    per_image: dict[str, list] = {"psnr": [], "ssim": []}
    if perceptual is not None:
        per_image["lpips"] = []
    agreements, background_exact, snapped_agreements, background_codes = [], [], [], set()
    token_counts = np.zeros(codebook_size or 0, np.int64)
    for batch in batches:
        inputs_u8 = image_metrics.to_uint8(batch["image"])
        reconstructions, tokens = reconstruct(batch["image"])
        reconstructions_u8 = image_metrics.to_uint8(reconstructions)
        inputs, outputs = inputs_u8 / 127.5 - 1.0, reconstructions_u8 / 127.5 - 1.0
        per_image["psnr"].append(np.asarray(image_metrics.psnr(outputs, inputs)))
        per_image["ssim"].append(np.asarray(image_metrics.ssim(outputs, inputs)))
        if perceptual is not None:
            per_image["lpips"].append(np.asarray(perceptual(inputs, outputs)))
        if codebook_size:
            token_counts += np.bincount(np.asarray(tokens).reshape(-1), minlength=codebook_size)
        if shapes_oracle:
            input_readings = shapes.oracle_batch(inputs_u8)
            agreements.append(oracle_agreement(inputs_u8, reconstructions_u8, input_readings))
            exact, snapped = background_diagnostics(inputs_u8, reconstructions_u8, input_readings)
            background_exact.append(exact)
            snapped_agreements.append(snapped)
            if tokens is not None:
                background_codes.update(background_token_codes(inputs_u8, tokens).tolist())
    results = {"num_images": int(sum(len(v) for v in per_image["psnr"]))}
    results.update({name: float(np.concatenate(values).mean()) for name, values in per_image.items()})
    if codebook_size:
        results.update(image_metrics.code_statistics(token_counts))
    if shapes_oracle:
        for prefix, parts in (("oracle_agreement", agreements),
                              ("oracle_agreement_background_snapped", snapped_agreements)):
            agree = np.concatenate(parts)
            results.update({f"{prefix}/{name}": float(agree[:, i].mean())
                            for i, name in enumerate(shapes.ATTRIBUTE_NAMES)})
            results[f"{prefix}/all"] = float(agree.all(axis=1).mean())
        results["background_exact"] = float(np.concatenate(background_exact).mean())
        if codebook_size:
            results["background_codes"] = len(background_codes)
    return results


def evaluate_vqgan(vqgan_path: str, data_config, *, split: str, batch_size: int = 100,
                   lpips_weights: str | None = None, with_lpips: bool = False) -> dict[str, float]:
    """Reconstruction metrics of a VQGAN bundle on every image of a split (center crops, no augmentation)."""
    model, params, _ = checkpointing.load_vqgan(vqgan_path)
    if data_config.image_size != model.resolution:
        raise ValueError(f"data.image_size={data_config.image_size} but the VQGAN takes {model.resolution} px images")
    data_config = data_config.copy_and_resolve_references()
    data_config.crop, data_config.flip = "center", False
    apply = jax.jit(lambda x: model.apply({"params": params}, x)[:2])
    lpips_fn = None
    if with_lpips:
        lpips_params = lpips.load_params(lpips_weights)
        lpips_fn = jax.jit(lambda x, y: lpips.lpips_distance(lpips_params, x, y))
    batches = images.make_batch_iterator(data_config, split=split, batch_size=batch_size, seed=0, shuffle=False,
                                         num_epochs=1)
    return evaluate(lambda x: jax.device_get(apply(x)), batches, shapes_oracle=images.is_shapes(data_config),
                    codebook_size=model.codebook_size, perceptual=lpips_fn)
