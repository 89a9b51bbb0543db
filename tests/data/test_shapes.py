"""The Shapes world against docs/SHAPES.md: combinations, rendering, captions, the oracle and the splits."""

import itertools

import numpy as np
import pytest

from clipgen_jax.data import shapes
from clipgen_jax.data.shapes import Attributes


def test_vocabularies_follow_the_specification():
    assert shapes.NUM_CLASSES == {"shape": 3, "colour": 6, "size": 2, "position": 9, "background": 3}
    assert (shapes.POSITIONS[0], shapes.POSITIONS[4], shapes.POSITIONS[8]) == ("top left", "center", "bottom right")
    assert shapes.COLOUR_RGB[3] == (230, 210, 40) and shapes.BACKGROUND_RGB[2] == (128, 128, 128)
    assert len(shapes.COLOUR_RGB) == len(shapes.COLOURS) and len(shapes.BACKGROUND_RGB) == len(shapes.BACKGROUNDS)


def test_heldout_rule_gives_96_of_972_combinations():
    combinations = shapes.all_combinations()
    heldout = shapes.heldout_combinations()
    training = shapes.training_combinations()
    assert len(combinations) == 972 and combinations == sorted(combinations)
    assert len(heldout) == 96 and len(training) == 876
    assert heldout == sorted(heldout) and not set(heldout) & set(training)
    assert heldout[0] == Attributes(0, 0, 0, 0, 0) and shapes.is_heldout(Attributes(0, 0, 0, 0, 0))
    assert not shapes.is_heldout(Attributes(0, 0, 0, 0, 1))  # 13 % 10 != 0


def test_heldout_halves_split_the_heldout_combinations_by_position():
    tuning, test = shapes.heldout_half("tuning"), shapes.heldout_half("test")
    assert tuning[:3] == [0, 2, 4] and test[:3] == [1, 3, 5] and len(tuning) == len(test) == 48
    assert sorted(tuning + test) == list(range(96))
    assert not set(shapes.TUNING_SEEDS) & set(shapes.TEST_SEEDS)
    with pytest.raises(ValueError, match="unknown half"):
        shapes.heldout_half("even")


def test_every_value_and_pair_of_values_occurs_in_training():
    training = np.array(shapes.training_combinations())
    sizes = [shapes.NUM_CLASSES[name] for name in shapes.ATTRIBUTE_NAMES]
    for a, b in itertools.combinations(range(len(sizes)), 2):
        pairs = set(map(tuple, training[:, [a, b]].tolist()))
        assert pairs == set(itertools.product(range(sizes[a]), range(sizes[b]))), (a, b)


@pytest.mark.parametrize("image_size", [32, 64, 128, 256])
def test_render_geometry(image_size):
    """Bounding-box side 0.16 / 0.28 * S, box centre where asked, objects inside the image even at maximal jitter."""
    jitter = shapes.JITTER_FRACTION * image_size
    for position, size, (dx, dy) in itertools.product(range(9), range(2), [(-jitter, -jitter), (jitter, jitter)]):
        attrs = Attributes(shape=1, colour=0, size=size, position=position, background=0)  # a red square on black
        centre_x, centre_y = shapes.cell_centre(position, image_size)
        image = shapes.render_at(attrs, image_size, (centre_x + dx, centre_y + dy))
        assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
        coverage = image[..., 0] / 220.0
        side = shapes.SIZE_FRACTIONS[size] * image_size
        np.testing.assert_allclose(coverage.sum(), side ** 2, rtol=0.05)
        pixel_centres = np.arange(image_size) + 0.5
        assert abs(coverage.sum(axis=0) @ pixel_centres / coverage.sum() - (centre_x + dx)) <= 0.2
        assert abs(coverage.sum(axis=1) @ pixel_centres / coverage.sum() - (centre_y + dy)) <= 0.2


def test_render_areas_and_anti_aliasing():
    image_size = 256
    side = shapes.SIZE_FRACTIONS[1] * image_size
    for shape, area_fraction in zip(range(3), [np.pi / 4, 1.0, 0.5]):
        image = shapes.render_at(Attributes(shape, 0, 1, 4, 0), image_size, (128.0, 128.0))
        coverage = image[..., 0] / 220.0
        np.testing.assert_allclose(coverage.sum(), area_fraction * side ** 2, rtol=0.02)
    small = shapes.render_at(Attributes(0, 2, 0, 4, 1), 32, (16.0, 16.0))  # a blue circle on white
    assert len(np.unique(small.reshape(-1, 3), axis=0)) > 3  # edges are blended, not just object + background


def test_render_is_deterministic_for_a_generator():
    attrs = Attributes(2, 4, 0, 7, 2)
    first = shapes.render(attrs, 64, np.random.default_rng(3))
    second = shapes.render(attrs, 64, np.random.default_rng(3))
    np.testing.assert_array_equal(first, second)
    assert (first[0, 0] == shapes.BACKGROUND_RGB[2]).all()


# ----------------------------------------------------------------------------------------------------------------------
# Oracle


@pytest.mark.parametrize("image_size", [32, 64, 128, 256])
def test_oracle_reads_fresh_renders(image_size):
    """Every attribute right under the strict reading: the shape margin clears MIN_SHAPE_MARGIN too."""
    rng = np.random.default_rng(1000 + image_size)
    combinations = shapes.all_combinations()
    expected = [combinations[i] for i in rng.integers(len(combinations), size=2000)]
    images = np.stack([shapes.render(attrs, image_size, rng) for attrs in expected])
    scores = shapes.score_images(images, expected)
    print(f"S={image_size}: " + ", ".join(f"{name} {value:.4f}" for name, value in scores.items()))
    for name in shapes.ATTRIBUTE_NAMES:
        assert scores[name] >= 0.995, (name, scores)
    assert scores["margin_below_min"] <= 0.005 and scores["shape"] <= scores["lenient_shape"]
    assert scores["no_object"] == 0.0 and scores["several_objects"] == 0.0


def test_a_shape_between_two_shapes_is_ambiguous_and_wrong_in_the_strict_reading():
    attrs = Attributes(0, 0, 0, 4, 1)  # a small red circle in the center, on white
    centre = shapes.cell_centre(attrs.position, 32)
    circle = shapes.render_at(attrs, 32, centre)
    dome = circle.copy()  # round at the top, flat at the bottom
    dome[16:] = shapes.render_at(attrs._replace(shape=1), 32, centre)[16:]
    clear, ambiguous = shapes.oracle(circle), shapes.oracle(dome)
    assert clear.margin >= shapes.MIN_SHAPE_MARGIN and not clear.ambiguous
    assert ambiguous == shapes.OracleResult("ok", attrs) and ambiguous.margin < shapes.MIN_SHAPE_MARGIN
    assert ambiguous.ambiguous
    scores = shapes.score_images([circle, dome], [attrs, attrs])
    assert (scores["shape"], scores["all"], scores["lenient_shape"], scores["lenient_all"]) == (0.5, 0.5, 1.0, 1.0)
    assert scores["colour"] == scores["position"] == 1.0 and scores["margin_below_min"] == 0.5


@pytest.mark.parametrize("image_size", [32, 256])
def test_oracle_refuses_blank_images(image_size):
    for rgb in shapes.BACKGROUND_RGB:
        blank = np.full((image_size, image_size, 3), rgb, np.uint8)
        assert shapes.oracle(blank) == shapes.OracleResult("no object")
    speck = np.zeros((image_size, image_size, 3), np.uint8)
    speck[image_size // 2, image_size // 2] = shapes.COLOUR_RGB[0]
    assert shapes.oracle(speck).status == "no object"


@pytest.mark.parametrize("image_size", [32, 128])
def test_oracle_refuses_two_objects(image_size):
    first = shapes.render_at(Attributes(0, 0, 0, 0, 1), image_size, shapes.cell_centre(0, image_size))
    second = shapes.render_at(Attributes(1, 0, 0, 8, 1), image_size, shapes.cell_centre(8, image_size))
    both = np.where((second != 255).any(axis=-1, keepdims=True), second, first)
    assert shapes.oracle(both) == shapes.OracleResult("several objects")


def test_oracle_ignores_a_stray_pixel():
    attrs = Attributes(2, 1, 1, 4, 0)
    image = shapes.render(attrs, 32, np.random.default_rng(0))
    image[1, 30] = shapes.COLOUR_RGB[1]
    assert shapes.oracle(image) == shapes.OracleResult("ok", attrs)


def test_score_images_counts_refusals_as_wrong():
    attrs = Attributes(1, 3, 1, 5, 2)
    rendered = shapes.render(attrs, 32, np.random.default_rng(0))
    blank = np.full_like(rendered, 128)
    scores = shapes.score_images([rendered, blank], [attrs, attrs])
    margins = {key: scores.pop(key) for key in ("margin_median", "margin_p10", "margin_below_min")}
    assert scores == {"shape": 0.5, "colour": 0.5, "size": 0.5, "position": 0.5, "background": 0.5, "all": 0.5,
                      "lenient_shape": 0.5, "lenient_all": 0.5, "no_object": 0.5, "several_objects": 0.0}
    assert margins["margin_median"] == margins["margin_p10"] == shapes.oracle(rendered).margin  # the one read image
    assert margins["margin_below_min"] == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Captions


def test_canonical_caption():
    caption = shapes.canonical_caption
    assert caption(Attributes(0, 0, 0, 0, 0)) == "a small red circle in the top left on a black background"
    assert caption(Attributes(2, 5, 1, 4, 2)) == "a large cyan triangle in the center on a gray background"
    assert shapes.CAPTION_TEMPLATES[0] == "a {size} {colour} {shape} in the {position} on a {background} background"


def test_every_template_names_all_five_attributes():
    assert len(shapes.CAPTION_TEMPLATES) >= 6 and len(set(shapes.CAPTION_TEMPLATES)) == len(shapes.CAPTION_TEMPLATES)
    for template in shapes.CAPTION_TEMPLATES:
        assert shapes.template_fields(template) == set(shapes.ATTRIBUTE_NAMES), template
        for attrs in shapes.all_combinations()[::37]:
            caption = template.format(**{name: shapes.ATTRIBUTE_VALUES[name][value]
                                         for name, value in attrs._asdict().items()})
            assert all(shapes.ATTRIBUTE_VALUES[name][value] in caption for name, value in attrs._asdict().items())


def test_random_captions_vary_templates_and_synonyms():
    attrs = Attributes(0, 1, 0, 4, 2)  # circle, center and gray all have synonyms
    rng = np.random.default_rng(0)
    captions = {shapes.random_caption(attrs, rng) for _ in range(400)}
    assert shapes.canonical_caption(attrs) in captions
    assert len(captions) > 40
    assert any("disc" in c for c in captions) and any("grey" in c for c in captions)
    assert any("middle" in c for c in captions) and any("centre" in c for c in captions)
    assert all("green" in c and "small" in c for c in captions)
    same_seed = [shapes.random_caption(attrs, np.random.default_rng(5)) for _ in range(2)]
    assert same_seed[0] == same_seed[1]


# ----------------------------------------------------------------------------------------------------------------------
# Splits


# 2000 uniform draws from 876 combinations hit about 876 * (1 - exp(-2000 / 876)) = 787 distinct ones.
@pytest.mark.parametrize("split, num_examples, min_distinct", [("train", 20_000, 876), ("validation", 2_000, 750)])
def test_training_splits_never_draw_heldout_combinations(split, num_examples, min_distinct):
    combinations = shapes.split_combinations(split, num_examples, seed=0)
    assert len(combinations) == num_examples
    assert not any(shapes.is_heldout(c) for c in combinations)
    assert len(set(combinations)) >= min_distinct


def test_train_and_validation_use_different_streams():
    assert shapes.split_combinations("train", 100, 0) != shapes.split_combinations("validation", 100, 0)
    assert shapes.split_combinations("train", 100, 0) == shapes.split_combinations("train", 100, 0)
    assert shapes.split_combinations("train", 100, 0) != shapes.split_combinations("train", 100, 1)


def test_heldout_split_cycles_through_heldout_combinations_in_order():
    heldout = shapes.heldout_combinations()
    combinations = shapes.split_combinations("heldout", 2000, seed=0)
    assert combinations[:96] == heldout and combinations[96:192] == heldout
    counts = {c: combinations.count(c) for c in heldout}
    assert set(counts.values()) == {20, 21} and sum(counts.values()) == 2000
    assert [counts[c] for c in heldout] == [21] * 80 + [20] * 16


def test_generate_examples_is_deterministic_and_consistent():
    first = list(shapes.generate_examples("validation", 50, 32, seed=7))
    second = list(shapes.generate_examples("validation", 50, 32, seed=7))
    assert len(first) == 50
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
    assert set(first[0]) == {"image", "caption", *shapes.ATTRIBUTE_NAMES}
    expected = shapes.split_combinations("validation", 50, seed=7)
    for example, attrs in zip(first, expected):
        assert Attributes(*(example[name] for name in shapes.ATTRIBUTE_NAMES)) == attrs
        assert example["caption"] == shapes.canonical_caption(attrs)
        assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
        assert shapes.oracle(example["image"]) == shapes.OracleResult("ok", attrs)
