"""How good a CLIP is: retrieval on any captioned split, and on the Shapes world zero-shot attribute accuracy.

Shapes scores (the bars of the shipped Shapes CLIP):
- zero-shot accuracy per attribute on the `heldout` images: for each image and attribute, the canonical captions that
  differ from the true one only in that attribute are ranked by similarity; right when the true one is first;
- text -> image retrieval: the canonical captions of the 96 held-out combinations query the gallery of every
  `validation` + `heldout` image; top-k is right when one of the k most similar images has the whole combination.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from clipgen_jax.data import captions, images, shapes


def read_split(data_config: ml_collections.ConfigDict, split: str, batch_size: int,
               with_captions: bool = False) -> dict[str, np.ndarray]:
    """Every example of a split, in order, as stacked arrays ("image" in [-1, 1], labels, captions)."""
    iterator = images.make_batch_iterator(data_config, split=split, batch_size=batch_size, seed=0, shuffle=False,
                                          num_epochs=1, with_captions=with_captions)
    batches = list(iterator)
    iterator.close()
    return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


def top_k_hits(similarity_QG: np.ndarray, is_match_QG: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Fraction of queries with a matching gallery item among their k most similar, for each k."""
    order = np.argsort(-similarity_QG, axis=1, kind="stable")
    ranked_matches = np.take_along_axis(is_match_QG, order, axis=1)
    return {k: float(np.mean(ranked_matches[:, :k].any(axis=1))) for k in ks}


def paired_retrieval(image_emb_ND: np.ndarray, text_emb_ND: np.ndarray) -> dict[str, float]:
    """Retrieval between index-matched image and caption embeddings (pair i is the only right answer for i)."""
    similarity = image_emb_ND @ text_emb_ND.T
    identity = np.eye(len(similarity), dtype=bool)
    image_to_text = top_k_hits(similarity, identity)
    text_to_image = top_k_hits(similarity.T, identity)
    return {"image_to_text_top1": image_to_text[1], "image_to_text_top5": image_to_text[5],
            "text_to_image_top1": text_to_image[1], "text_to_image_top5": text_to_image[5]}


def _labels(split_arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([split_arrays[name] for name in shapes.ATTRIBUTE_NAMES], axis=1).astype(np.int64)


def shapes_zero_shot(image_emb_ND: np.ndarray, labels_N5: np.ndarray, caption_emb_CD: np.ndarray) -> dict[str, float]:
    """Per-attribute zero-shot accuracy; `caption_emb_CD` embeds the canonical captions of `all_combinations()`."""
    index = {combination: i for i, combination in enumerate(shapes.all_combinations())}
    similarity = image_emb_ND @ caption_emb_CD.T
    scores = {}
    for position, name in enumerate(shapes.ATTRIBUTE_NAMES):
        right = 0
        for row, label in enumerate(labels_N5):
            candidates = []
            for value in range(shapes.NUM_CLASSES[name]):
                varied = label.copy()
                varied[position] = value
                candidates.append(index[shapes.Attributes(*map(int, varied))])
            right += int(np.argmax(similarity[row, candidates]) == label[position])
        scores[f"zero_shot_{name}"] = right / len(labels_N5)
    scores["zero_shot_mean"] = float(np.mean([scores[f"zero_shot_{n}"] for n in shapes.ATTRIBUTE_NAMES]))
    return scores


def shapes_scores(clip: Any, data_config: ml_collections.ConfigDict, *, batch_size: int = 256) -> dict[str, float]:
    """Both Shapes measures for a loaded `models.clip.CLIP` (see the module docstring)."""
    eval_config = data_config.copy_and_resolve_references()
    eval_config.crop, eval_config.flip = "center", False
    combinations = shapes.all_combinations()
    caption_emb = clip.embed_texts([shapes.canonical_caption(c) for c in combinations], batch_size=batch_size)
    heldout = read_split(eval_config, "heldout", batch_size)
    validation = read_split(eval_config, "validation", batch_size)
    heldout_emb = clip.embed_images(heldout["image"], batch_size=batch_size)
    validation_emb = clip.embed_images(validation["image"], batch_size=batch_size)
    heldout_labels = _labels(heldout)
    scores = shapes_zero_shot(heldout_emb, heldout_labels, caption_emb)

    gallery_emb = np.concatenate([validation_emb, heldout_emb])
    gallery_labels = np.concatenate([_labels(validation), heldout_labels])
    queries = np.asarray(shapes.heldout_combinations(), np.int64)
    query_emb = caption_emb[[combinations.index(shapes.Attributes(*map(int, q))) for q in queries]]
    is_match = (gallery_labels[None, :, :] == queries[:, None, :]).all(axis=2)
    hits = top_k_hits(query_emb @ gallery_emb.T, is_match)
    scores["text_to_image_top1"], scores["text_to_image_top5"] = hits[1], hits[5]
    return scores


def evaluate_clip(clip: Any, data_config: ml_collections.ConfigDict, *, split: str,
                  caption_config: ml_collections.ConfigDict | None = None, batch_size: int = 256) -> dict[str, Any]:
    """`tools/evaluate.py clip`: Shapes scores on Shapes, otherwise paired retrieval on `split`'s captions."""
    if images.is_shapes(data_config):
        return shapes_scores(clip, data_config, batch_size=batch_size)
    images_NHWC, texts = read_captioned_split(data_config, split, batch_size, caption_config)
    results = paired_retrieval(clip.embed_images(images_NHWC, batch_size=batch_size),
                               clip.embed_texts(texts, batch_size=batch_size))
    return {"num_pairs": len(texts), **results}


def read_captioned_split(data_config: ml_collections.ConfigDict, split: str, batch_size: int,
                         caption_config: ml_collections.ConfigDict | None = None) -> tuple[np.ndarray, list[str]]:
    """Every image of a captioned split ([-1, 1]) and its caption (a TFDS feature or a sidecar .txt file)."""
    caption_config = caption_config or captions.default_caption_config()
    source = captions.resolve_source(data_config, caption_config)
    arrays = read_split(data_config, split, batch_size, with_captions=source == "sidecar")
    return arrays["image"], [str(t) for t in arrays["caption" if source == "sidecar" else caption_config.key]]
