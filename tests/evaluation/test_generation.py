"""Scores of generated images: known answers for FD-CLIP, CLIP score and the oracle through `evaluate_method`."""

import numpy as np
import pytest
import scipy.linalg

from clipgen_jax.data import shapes
from clipgen_jax.evaluation import generation


def test_fd_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(500, 16))
    assert generation.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)


def test_fd_of_a_translated_set_is_the_squared_shift():
    features = np.random.default_rng(1).normal(size=(300, 8))
    shift = np.arange(8) / 10.0
    assert generation.frechet_distance(features, features + shift) == pytest.approx(np.sum(shift ** 2), rel=1e-6)


def test_fd_matches_the_closed_form_for_gaussians():
    # Diagonal Gaussians: FD = |mu_a - mu_b|^2 + sum_i (sigma_a,i - sigma_b,i)^2.
    rng = np.random.default_rng(2)
    mean_a, mean_b = np.array([0.0, 1.0, -1.0]), np.array([0.5, 1.0, 0.0])
    sigma_a, sigma_b = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    a = rng.normal(mean_a, sigma_a, size=(400_000, 3))
    b = rng.normal(mean_b, sigma_b, size=(400_000, 3))
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((sigma_a - sigma_b) ** 2)  # 1.25 + 2.0
    assert generation.frechet_distance(a, b) == pytest.approx(expected, rel=0.01)


def test_fd_equals_the_sqrtm_formula_on_correlated_features():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.3
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b).real))
    assert generation.frechet_distance(a, b) == pytest.approx(reference, rel=1e-6)


def test_fd_refuses_mismatched_features():
    with pytest.raises(ValueError, match=r"\[N, D\] and \[M, D\]"):
        generation.frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))


class _AxisClip:
    """A stand-in CLIP: an image's embedding is a unit vector at the angle its first pixel's red value gives;
    a text's at the angle written in it. Cosines are then known exactly."""

    def embed_images(self, images_NHWC, batch_size=256):
        angles = (np.asarray(images_NHWC)[:, 0, 0, 0] + 1.0) * 127.5 / 255.0 * np.pi
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)

    def embed_texts(self, texts, batch_size=256):
        angles = np.asarray([float(t) for t in texts])
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def test_clip_scores_are_100_times_the_clamped_cosine():
    images = np.zeros((3, 2, 2, 3), np.uint8)  # every image at angle 0
    scores = generation.clip_scores(_AxisClip(), images, ["0", str(np.pi / 3), str(np.pi)])
    np.testing.assert_allclose(scores, [100.0, 50.0, 0.0], atol=1e-9)  # cos pi = -1 clamps to 0
    assert ((scores >= 0) & (scores <= 100)).all()


def _render_method(wrong_shape_prompts: set[str]):
    """Renders each prompt's combination (as a perfect generator would), with the shape changed for some prompts."""
    by_caption = {shapes.canonical_caption(a): a for a in shapes.heldout_combinations()}

    def generate(texts, num_candidates, seed):
        rng = np.random.default_rng(seed)
        out = []
        for text in texts:
            attrs = by_caption[text]
            if text in wrong_shape_prompts:
                attrs = attrs._replace(shape=(attrs.shape + 1) % len(shapes.SHAPES))
            out.append(shapes.render(attrs, 32, rng))
        return np.stack(out)
    return generate


class _SummingClip:
    """Image embeddings from mean colour, text embeddings constant: enough to exercise the plumbing."""

    def embed_images(self, images_NHWC, batch_size=256):
        features = np.concatenate([np.asarray(images_NHWC).mean(axis=(1, 2)), np.ones((len(images_NHWC), 1))], 1)
        return features / np.linalg.norm(features, axis=1, keepdims=True)

    def embed_texts(self, texts, batch_size=256):
        return np.tile([0.5, 0.5, 0.5, 0.5], (len(texts), 1))


def test_evaluate_method_scores_renders_with_the_oracle_and_summarises_seeds():
    attributes = shapes.heldout_combinations()[:12]
    prompts = [shapes.canonical_caption(a) for a in attributes]
    wrong = set(prompts[:3])  # 3 of 12 prompts get the wrong shape: shape and all-attribute accuracy 75%
    clip = _SummingClip()
    summary = generation.evaluate_method(
        _render_method(wrong), prompts, eval_clip=clip, reference_features_ND=np.random.default_rng(0).normal(
            size=(50, 4)), num_candidates=4, seeds=[0, 1], images_per_prompt=3, attributes=attributes,
        groups={"even": range(0, 12, 2), "odd": range(1, 12, 2)}, keep_images=2)
    assert summary["mean"]["oracle_shape"] == pytest.approx(0.75)
    assert summary["mean"]["oracle_all"] == summary["mean"]["oracle_lenient_all"] == pytest.approx(0.75)
    assert summary["mean"]["oracle_even_all"] == pytest.approx(4 / 6)  # prompts 0 and 2 are wrong
    assert summary["mean"]["oracle_odd_shape"] == pytest.approx(5 / 6)  # prompt 1
    assert summary["mean"]["oracle_margin_below_min"] == 0.0 and summary["mean"]["oracle_odd_margin_p10"] > 0.1
    assert summary["mean"]["oracle_colour"] == summary["mean"]["oracle_position"] == 1.0
    assert summary["std"]["oracle_shape"] == 0.0  # both seeds render the same combinations
    assert len(summary["per_seed"]) == 2 and summary["images"].shape == (2, 32, 32, 3)
    assert 0.0 <= summary["mean"]["clip_score"] <= 100.0 and summary["mean"]["fd_clip"] > 0


def test_each_other_wording_gets_a_row_of_oracle_scores():
    attributes = shapes.heldout_combinations()[:6]
    by_caption = {shapes.template_caption(a, t): a for a in attributes for t in shapes.CAPTION_TEMPLATES}
    wrong = shapes.template_caption(attributes[0], shapes.CAPTION_TEMPLATES[2])  # wording 2 misdraws one shape

    def generate(texts, num_candidates, seed):
        rng = np.random.default_rng(seed)
        return np.stack([shapes.render(by_caption[t]._replace(shape=(by_caption[t].shape + 1) % 3) if t == wrong
                                       else by_caption[t], 32, rng) for t in texts])

    rows = generation.evaluate_wordings(generate, "method", attributes, num_candidates=2, seeds=[3],
                                        groups={"first": [0, 1]})
    templates = shapes.CAPTION_TEMPLATES[1:]
    assert list(rows) == [f"method, wording {i}: '{t}'" for i, t in enumerate(templates, start=1)]
    assert [row["mean"]["oracle_all"] for row in rows.values()] == [1.0, 5 / 6, 1.0, 1.0, 1.0, 1.0]
    assert rows["method, wording 2: '" + templates[1] + "'"]["mean"]["oracle_first_shape"] == 0.5
    assert all("clip_score" not in row["mean"] and row["num_candidates"] == 2 for row in rows.values())


def test_the_oracle_scores_ground_truth_renders_at_every_attribute():
    attributes = shapes.heldout_combinations()
    renders = [shapes.render(a, 32, np.random.default_rng(i)) for i, a in enumerate(attributes)]
    scores = shapes.score_images(np.stack(renders), attributes)
    assert all(scores[name] >= 0.995 for name in (*shapes.ATTRIBUTE_NAMES, "all"))


def test_markdown_table_shows_a_group_s_strict_and_lenient_scores_and_margins():
    summary = {"mean": {"clip_score": 30.0, "oracle_all": 0.25, "oracle_test_all": 0.5, "oracle_test_lenient_all": 0.75,
                        "oracle_test_margin_below_min": 0.25, "oracle_test_margin_median": 0.2},
               "std": {"clip_score": None, "oracle_all": None, "oracle_test_all": 0.1, "oracle_test_lenient_all": None,
                       "oracle_test_margin_below_min": None, "oracle_test_margin_median": 0.01}}
    lines = generation.markdown_table({"a": summary}, "eval-clip", group="test", features=False).splitlines()
    assert lines[0] == "| method | all attributes | all, lenient | ambiguous (margin < 0.10) | margin median |"
    assert lines[2] == "| a | 50.0% ± 10.0% | 75.0% | 25.0% | 0.200 ± 0.010 |"


def test_markdown_table_has_a_row_per_method_with_mean_and_spread():
    summary = {"mean": {"clip_score": 30.0, "fd_clip": 0.5, "oracle_all": 0.25},
               "std": {"clip_score": 1.0, "fd_clip": None, "oracle_all": 0.05}}
    table = generation.markdown_table({"a": summary, "b": summary}, "eval-clip")
    lines = table.splitlines()
    assert lines[0] == "| method | CLIP score (eval-clip) | FD-CLIP (eval-clip) | all attributes |"
    assert lines[2] == "| a | 30.00 ± 1.00 | 0.5000 | 25.0% ± 5.0% |" and len(lines) == 4


def test_seeds_past_feature_seeds_draw_one_image_per_prompt_for_the_oracle_alone():
    attributes = shapes.heldout_combinations()[:4]
    prompts = [shapes.canonical_caption(a) for a in attributes]
    calls = []
    render = _render_method(set())

    def generate(texts, num_candidates, seed):
        calls.append((len(texts), seed))
        return render(texts, num_candidates, seed)

    summary = generation.evaluate_method(generate, prompts, eval_clip=_SummingClip(),
                                         reference_features_ND=np.random.default_rng(0).normal(size=(20, 4)),
                                         num_candidates=2, seeds=[5, 6, 7], images_per_prompt=3, attributes=attributes,
                                         feature_seeds=1)
    assert calls == [(12, 5), (4, 6), (4, 7)]
    assert "fd_clip" in summary["per_seed"][0] and "fd_clip" not in summary["per_seed"][1]
    assert summary["std"]["fd_clip"] is None and summary["mean"]["oracle_all"] == 1.0
    assert summary["std"]["oracle_all"] == 0.0 and summary["feature_seeds"] == [5]
    with pytest.raises(ValueError, match="pass Shapes attributes"):
        generation.evaluate_method(generate, prompts, eval_clip=_SummingClip(), reference_features_ND=None,
                                   num_candidates=1, seeds=[0, 1], images_per_prompt=2, feature_seeds=1)
