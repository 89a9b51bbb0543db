"""Scores of generated images: CLIP score, FD-CLIP and, on the Shapes world, the oracle's accuracies.

- CLIP score: 100 * max(cos, 0) between each generated image and its prompt, averaged over images.
- FD-CLIP: the Frechet distance between Gaussians fitted to the L2-normalised CLIP image embeddings of the generated
  and of the reference images. It is FID's formula on CLIP features, not FID (no Inception network is involved).
- Shapes oracle: per-attribute and all-attribute accuracy of one image per prompt (docs/SHAPES.md "Scores"), in the
  strict reading (an ambiguous shape is wrong) and the lenient one, and the distribution of the shape margins; over
  all prompts and over each named group of them (the held-out halves: test and tuning).
The CLIP that scores must not be the one that conditions and re-ranks the generator (on Shapes: "shapes-clip-eval").

A method is a `GenerateFn(texts, num_candidates, seed) -> uint8 images [len(texts), H, W, 3]`: the best image of
`num_candidates` for each text by the method's own ranking (one sample when `num_candidates` is 1). Each prompt is
repeated `images_per_prompt` times, so FD-CLIP and CLIP score see several independent images per prompt while the
oracle scores the first image of each prompt, as docs/SHAPES.md defines.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

from clipgen_jax.data import shapes

logger = logging.getLogger(__name__)

GenerateFn = Callable[[Sequence[str], int, int], np.ndarray]


def frechet_distance(features_a_ND: np.ndarray, features_b_MD: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64.

    The matrix square roots come from symmetric eigendecompositions (eigenvalues clipped at 0), which stay real and
    stable where scipy's general `sqrtm` returns complex noise for nearly singular covariances."""
    a, b = np.asarray(features_a_ND, np.float64), np.asarray(features_b_MD, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two feature sets [N, D] and [M, D] with N, M >= 2, got {a.shape} and {b.shape}")
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eigenvalues_a, eigenvectors_a = np.linalg.eigh(cov_a)
    sqrt_a = (eigenvectors_a * np.sqrt(np.clip(eigenvalues_a, 0, None))) @ eigenvectors_a.T
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def clip_scores(clip: Any, images_u8_NHWC: np.ndarray, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """100 * max(cos, 0) per (image, text) pair [N]; the CLIP sees the uint8 pixels a saved PNG holds."""
    if len(images_u8_NHWC) != len(texts):
        raise ValueError(f"{len(images_u8_NHWC)} images but {len(texts)} texts")
    return paired_clip_scores(embed_uint8(clip, images_u8_NHWC, batch_size),
                              clip.embed_texts(list(texts), batch_size=batch_size))


def paired_clip_scores(image_emb_ND: np.ndarray, text_emb_ND: np.ndarray) -> np.ndarray:
    """100 * max(cos, 0) of index-matched L2-normalised embeddings [N]."""
    return 100.0 * np.maximum(np.sum(image_emb_ND * text_emb_ND, axis=1), 0.0)


def embed_uint8(clip: Any, images_u8_NHWC: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """L2-normalised CLIP image embeddings of uint8 images [N, D]."""
    images_u8_NHWC = np.asarray(images_u8_NHWC)
    if images_u8_NHWC.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images_u8_NHWC.dtype}")
    return clip.embed_images(images_u8_NHWC.astype(np.float32) / 127.5 - 1.0, batch_size=batch_size)


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    values = np.asarray(values, np.float64)
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def evaluate_method(generate: GenerateFn, prompts: Sequence[str], *, eval_clip: Any,
                    reference_features_ND: np.ndarray | None, num_candidates: int, seeds: Sequence[int],
                    images_per_prompt: int, attributes: Sequence[shapes.Attributes] | None = None,
                    groups: dict[str, Sequence[int]] | None = None, feature_seeds: int | None = None,
                    keep_images: int = 0) -> dict:
    """One method's scores per seed and their mean / sample std over seeds.

    `reference_features_ND`: the eval CLIP's embeddings of the reference images (FD-CLIP is skipped when None);
    `attributes`: the Shapes combination of each prompt (the oracle is skipped when None); `groups`: named subsets of
    the prompts (their positions) whose oracle scores are also reported alone, as oracle_{name}_{score};
    `feature_seeds`: how many of the first seeds draw `images_per_prompt` images for CLIP score and FD-CLIP (default:
    all); the others draw one image per prompt, for the oracle only, which saves most of the sampling when a budget is
    tight; `keep_images`: how many prompts' first images of the first seed to return under "images" (for sample
    grids)."""
    if images_per_prompt < 1 or not seeds or not prompts:
        raise ValueError("need prompts, seeds and images_per_prompt >= 1")
    feature_seeds = len(seeds) if feature_seeds is None else feature_seeds
    if attributes is None and feature_seeds < len(seeds):
        raise ValueError("seeds without CLIP features are scored by the oracle alone: pass Shapes attributes")
    per_seed, kept = [], None
    for index, seed in enumerate(seeds):
        with_features = index < feature_seeds
        repeats = images_per_prompt if with_features else 1
        repeated = [prompt for prompt in prompts for _ in range(repeats)]
        logger.info("generating %d prompts x %d images (best of %d), seed %d", len(prompts), repeats,
                    num_candidates, seed)
        images_NHWC = np.asarray(generate(repeated, num_candidates, seed))
        if images_NHWC.shape[0] != len(repeated) or images_NHWC.dtype != np.uint8:
            raise ValueError(f"the method returned {images_NHWC.dtype}{list(images_NHWC.shape)}; expected uint8 "
                             f"[{len(repeated)}, H, W, 3]")
        first_PHWC = images_NHWC[::repeats]
        scores = {}
        if with_features:
            features_ND = embed_uint8(eval_clip, images_NHWC)
            scores["clip_score"] = float(np.mean(paired_clip_scores(features_ND, eval_clip.embed_texts(repeated))))
            if reference_features_ND is not None:
                scores["fd_clip"] = frechet_distance(features_ND, reference_features_ND)
        if attributes is not None:
            subsets = {"oracle_": range(len(prompts)),
                       **{f"oracle_{name}_": positions for name, positions in (groups or {}).items()}}
            for prefix, positions in subsets.items():
                oracle_scores = shapes.score_images(first_PHWC[list(positions)], [attributes[i] for i in positions])
                scores.update({prefix + key: value for key, value in oracle_scores.items()})
        per_seed.append(scores)
        if kept is None and keep_images:
            kept = first_PHWC[:keep_images]
    summary: dict = {"num_prompts": len(prompts), "images_per_prompt": images_per_prompt,
                     "feature_seeds": list(seeds[:feature_seeds]), "num_candidates": num_candidates,
                     "seeds": list(seeds), "per_seed": per_seed, "mean": {}, "std": {}}
    for key in dict.fromkeys(key for scores in per_seed for key in scores):
        summary["mean"][key], summary["std"][key] = _mean_std([s[key] for s in per_seed if key in s])
    if kept is not None:
        summary["images"] = kept
    return summary


# The oracle's columns of `markdown_table`: (score_images key, label).
ORACLE_COLUMNS = (("all", "all attributes"), *((name, name) for name in shapes.ATTRIBUTE_NAMES),
                  ("lenient_all", "all, lenient"), ("lenient_shape", "shape, lenient"),
                  ("margin_below_min", f"ambiguous (margin < {shapes.MIN_SHAPE_MARGIN:.2f})"),
                  ("margin_median", "margin median"), ("margin_p10", "margin 10th pct."))


def markdown_table(results: dict[str, dict], clip_name: str, group: str | None = None, features: bool = True) -> str:
    """A row per method, mean ± std over seeds: CLIP score and FD-CLIP (unless `features` is False), then the
    oracle's strict accuracies, the lenient ones and the shape margins of `group`'s prompts (all prompts when None);
    columns without scores are left out."""
    prefix = f"oracle_{group}_" if group else "oracle_"
    columns = [("clip_score", f"CLIP score ({clip_name})"), ("fd_clip", f"FD-CLIP ({clip_name})")] if features else []
    columns += [(prefix + key, label) for key, label in ORACLE_COLUMNS]
    columns = [(key, label) for key, label in columns if any(key in summary["mean"] for summary in results.values())]

    def cell(summary: dict, key: str) -> str:
        if key not in summary["mean"]:
            return "-"
        mean, std = summary["mean"][key], summary["std"][key]
        # FD of unit-norm features is small: 0.01-1.
        spec = (".3f" if key.endswith(("margin_median", "margin_p10")) else ".1%" if key.startswith("oracle_")
                else ".4f" if key == "fd_clip" else ".2f")
        return f"{mean:{spec}}" if std is None else f"{mean:{spec}} ± {std:{spec}}"

    lines = ["| method | " + " | ".join(label for _, label in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {method} | " + " | ".join(cell(summary, key) for key, _ in columns) + " |"
              for method, summary in results.items()]
    return "\n".join(lines)


def pipeline_method(pipe: Any, *, batch_size: int = 64, prompt_indices: Sequence[int] | None = None,
                    **sampling: Any) -> GenerateFn:
    """A `pipeline.Pipeline` as a method: its CLIP-best of `num_candidates` samples per text.

    `evaluate_method` repeats each prompt: repeat r of the p-th prompt (a run of equal texts is one prompt) draws
    candidates r * num_candidates ... (r + 1) * num_candidates - 1 of prompt index prompt_indices[p] (default p; on
    Shapes the held-out combination's index), so the image the oracle scores (repeat 0) is the one
    `tools/generate.py --prompts` keeps (keep 1) for that prompt at that line, seed and candidates."""
    def generate(texts: Sequence[str], num_candidates: int, seed: int) -> np.ndarray:
        texts = list(texts)
        starts_N = np.array([i == 0 or texts[i] != texts[i - 1] for i in range(len(texts))])
        run_N = np.cumsum(starts_N) - 1
        repeat_N = np.arange(len(texts)) - np.flatnonzero(starts_N)[run_N]
        prompt_index_N = run_N if prompt_indices is None else np.asarray(prompt_indices)[run_N]
        images_PKHWC, _ = pipe.generate(texts, num_candidates=num_candidates, keep=1, seed=seed,
                                        batch_size=batch_size, prompt_indices=prompt_index_N,
                                        first_candidates=repeat_N * num_candidates, **sampling)
        return images_PKHWC[:, 0]
    return generate


def evaluate_wordings(generate: GenerateFn, label: str, attributes: Sequence[shapes.Attributes], *,
                      num_candidates: int, **kwargs: Any) -> dict[str, dict]:
    """The oracle's scores (`evaluate_method`, one image per prompt) of `generate` prompted with the Shapes
    combinations `attributes` in each caption template but the canonical one (shapes.CAPTION_TEMPLATES[1:], which the
    Shapes CLIP is trained on too; the vocabulary's own words), a row per template labelled `label` and the wording."""
    return {f"{label}, wording {index}: '{template}'": evaluate_method(
                generate, [shapes.template_caption(a, template) for a in attributes], eval_clip=None,
                reference_features_ND=None, num_candidates=num_candidates, images_per_prompt=1, attributes=attributes,
                feature_seeds=0, **kwargs)
            for index, template in enumerate(shapes.CAPTION_TEMPLATES[1:], start=1)}


def evaluate_methods(methods: dict[str, tuple[GenerateFn, int]], prompts: Sequence[str], **kwargs: Any
                     ) -> dict[str, dict]:
    """`evaluate_method` for each named (method, num_candidates), with the same prompts, seeds and references."""
    return {name: evaluate_method(generate, prompts, num_candidates=num_candidates, **kwargs)
            for name, (generate, num_candidates) in methods.items()}
