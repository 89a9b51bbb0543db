"""How well an image -> image model (an autoencoder, a VQGAN) keeps what matters: PSNR, SSIM, optionally LPIPS,
codebook statistics for tokenizers, and on Shapes whether the oracle reads the same five attributes from the
reconstruction as from the input (strict reading: an ambiguous reconstruction disagrees on shape; the lenient reading
beside it) and the shape-margin distributions of inputs and reconstructions."""

import logging
from typing import Callable, Iterable, Sequence

import jax
import numpy as np

from clipgen_jax import checkpointing
from clipgen_jax.data import images, shapes
from clipgen_jax.models import lpips
from clipgen_jax.evaluation import image_metrics

logger = logging.getLogger(__name__)

# images [B, H, W, 3] in [-1, 1] -> (reconstructions [B, H, W, 3], int token grids [B, h, w] or None)
Reconstructor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


def agreement(input_readings: Sequence[shapes.OracleResult], output_readings: Sequence[shapes.OracleResult], *,
              strict: bool = True) -> np.ndarray:
    """[N, 5] booleans: the oracle read attribute i of image n the same way from input and output (and refused
    neither); in the strict reading an ambiguous output (shape margin below shapes.MIN_SHAPE_MARGIN) disagrees on
    shape."""
    agree = np.zeros((len(input_readings), len(shapes.ATTRIBUTE_NAMES)), bool)
    for n, (a, b) in enumerate(zip(input_readings, output_readings, strict=True)):
        if a.status == b.status == "ok":
            agree[n] = np.equal(a.attributes, b.attributes)
            agree[n, 0] &= not (strict and b.ambiguous)
    return agree


def oracle_agreement(inputs_u8: np.ndarray, reconstructions_u8: np.ndarray,
                     input_readings: Sequence[shapes.OracleResult] | None = None) -> np.ndarray:
    """`agreement` (strict) of the oracle's readings of two image batches. `input_readings`: the oracle's results on
    `inputs_u8` where the caller has them already."""
    if input_readings is None:
        input_readings = shapes.oracle_batch(inputs_u8)
    return agreement(input_readings, shapes.oracle_batch(reconstructions_u8))


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
    background_exact, snapped_agreements, background_codes = [], [], set()
    readings: dict[str, list[shapes.OracleResult]] = {"inputs": [], "reconstructions": []}
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
            readings["inputs"] += input_readings
            readings["reconstructions"] += shapes.oracle_batch(reconstructions_u8)
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
        for prefix, agree in (("oracle_agreement", agreement(readings["inputs"], readings["reconstructions"])),
                              ("oracle_agreement_background_snapped", np.concatenate(snapped_agreements))):
            results.update({f"{prefix}/{name}": float(agree[:, i].mean())
                            for i, name in enumerate(shapes.ATTRIBUTE_NAMES)})
            results[f"{prefix}/all"] = float(agree.all(axis=1).mean())
        lenient = agreement(readings["inputs"], readings["reconstructions"], strict=False)
        results["oracle_agreement/lenient_shape"] = float(lenient[:, 0].mean())
        results["oracle_agreement/lenient_all"] = float(lenient.all(axis=1).mean())
        for images_name, results_read in readings.items():
            results.update({f"{images_name}_{key}": value
                            for key, value in shapes.margin_distribution(results_read).items()})
        results["background_exact"] = float(np.concatenate(background_exact).mean())
        if codebook_size:
            results["background_codes"] = len(background_codes)
    return results


def evaluate_vqgan(vqgan_path: str, data_config, *, split: str, batch_size: int = 100,
                   lpips_weights: str | None = None, with_lpips: bool = False) -> dict[str, float]:
    """Reconstruction metrics of a VQGAN bundle on every image of a split (center crops, no augmentation), also
    logged as `markdown_table`."""
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
    results = evaluate(lambda x: jax.device_get(apply(x)), batches, shapes_oracle=images.is_shapes(data_config),
                       codebook_size=model.codebook_size, perceptual=lpips_fn)
    logger.info("reconstructions of the %s split:\n%s", split, markdown_table(results))
    return results


def markdown_table(results: dict) -> str:
    """`evaluate`'s results as markdown: the image and code metrics, and on Shapes the oracle's agreement (strict and
    lenient rows) and the shape-margin distributions of the inputs and the reconstructions."""
    metrics = [("psnr", "PSNR (dB)", ".2f"), ("ssim", "SSIM", ".3f"), ("lpips", "LPIPS", ".4f"),
               ("codebook_usage", "codebook usage", ".1%"), ("perplexity", "perplexity", ".0f")]
    metrics = [metric for metric in metrics if metric[0] in results]
    lines = ["| images | " + " | ".join(label for _, label, _ in metrics) + " |", "|---" * (len(metrics) + 1) + "|",
             f"| {results['num_images']} | " + " | ".join(f"{results[key]:{spec}}" for key, _, spec in metrics) + " |"]
    if "oracle_agreement/all" not in results:
        return "\n".join(lines)
    strict = {name: results[f"oracle_agreement/{name}"] for name in ("all", *shapes.ATTRIBUTE_NAMES)}
    lenient = {**strict, "all": results["oracle_agreement/lenient_all"],
               "shape": results["oracle_agreement/lenient_shape"]}
    lines += ["", "| oracle agreement | " + " | ".join(strict) + " |", "|---" * (len(strict) + 1) + "|",
              *(f"| {reading} | " + " | ".join(f"{value:.1%}" for value in agree.values()) + " |"
                for reading, agree in (("strict", strict), ("lenient", lenient))),
              "", "| shape margin | median | 10th pct. | ambiguous (margin < "
              f"{shapes.MIN_SHAPE_MARGIN:.2f}) |", "|---|---|---|---|",
              *(f"| {images_name} | {results[f'{images_name}_margin_median']:.3f} | "
                f"{results[f'{images_name}_margin_p10']:.3f} | {results[f'{images_name}_margin_below_min']:.1%} |"
                for images_name in ("inputs", "reconstructions")),
              "", f"Diagnostics, not scores: {results['background_exact']:.1%} of the background pixels are "
              f"reconstructed exactly; {results['oracle_agreement_background_snapped/all']:.1%} agree on all five "
              f"after reconstruction pixels within L1 {BACKGROUND_SNAP_L1} (of 765) of the background are set to it "
              "(how much of the disagreement faint background noise explains)."]
    return "\n".join(lines)
