"""The Shapes world: procedural captioned images, held-out combinations and an oracle (specified in docs/SHAPES.md).

Pretrained CLIP weights and COCO cannot be downloaded on the project's machines, so every stage of CLIP-GEN is trained
and measured on this small world instead: one object (shape, colour, size, position) on a plain background, captions
naming all five attributes, and an oracle that reads the attributes back out of any image so that generated images can
be scored. Pure numpy + Pillow, so data tools and graders do not need jax.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import string
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

# Attribute vocabularies, in the specification's index order (the integer labels index into these).
SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
COLOUR_RGB = ((220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 210, 40), (200, 50, 200), (40, 200, 210))
SIZES = ("small", "large")
SIZE_FRACTIONS = (0.16, 0.28)  # bounding-box side as a fraction of the image side
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS = ("black", "white", "gray")
BACKGROUND_RGB = ((0, 0, 0), (255, 255, 255), (128, 128, 128))

ATTRIBUTE_NAMES = ("shape", "colour", "size", "position", "background")
ATTRIBUTE_VALUES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS,
                    "background": BACKGROUNDS}
NUM_CLASSES = {name: len(values) for name, values in ATTRIBUTE_VALUES.items()}

SUPERSAMPLING = 4  # objects are drawn at 4x resolution and box-filtered down, which anti-aliases their edges
JITTER_FRACTION = 0.02  # the bounding-box centre moves uniformly by up to this fraction of the side, per axis

SPLITS = ("train", "validation", "heldout")


class Attributes(NamedTuple):
    """One combination, as 0-based indices into the vocabularies above (a tuple, so it hashes and sorts)."""

    shape: int
    colour: int
    size: int
    position: int
    background: int


# ----------------------------------------------------------------------------------------------------------------------
# Held-out combinations


def is_heldout(attrs: Attributes) -> bool:
    """Whether no training stage may ever see this combination (the specification's fixed rule)."""
    i, j, k, p, b = attrs
    return (3 * i + 5 * j + 11 * k + 7 * p + 13 * b) % 10 == 0


def all_combinations() -> list[Attributes]:
    """All 972 combinations in lexicographic index order (shape, colour, size, position, background)."""
    return [Attributes(*c) for c in itertools.product(*(range(NUM_CLASSES[n]) for n in ATTRIBUTE_NAMES))]


def training_combinations() -> list[Attributes]:
    """The 876 combinations that training may use, in index order."""
    return [c for c in all_combinations() if not is_heldout(c)]


def heldout_combinations() -> list[Attributes]:
    """The 96 held-out combinations, in index order (the evaluation prompts, and the `heldout` split's cycle)."""
    return [c for c in all_combinations() if is_heldout(c)]


# Evaluation protocol: settings are chosen on the tuning half of the held-out combinations at TUNING_SEEDS; the figure
# reported is the test half's at TEST_SEEDS.
HELDOUT_HALVES = {"test": 1, "tuning": 0}  # each half: every second position of heldout_combinations() from this one
TUNING_SEEDS = (0, 1, 2)
TEST_SEEDS = (100, 101, 102)


def heldout_half(half: str) -> list[int]:
    """Positions in `heldout_combinations()` of one half: "tuning" the even ones, "test" the odd ones (48 each)."""
    if half not in HELDOUT_HALVES:
        raise ValueError(f"unknown half {half!r}; expected one of {tuple(HELDOUT_HALVES)}")
    return list(range(HELDOUT_HALVES[half], len(heldout_combinations()), 2))


# ----------------------------------------------------------------------------------------------------------------------
# Rendering


def _round_half_up(value: float) -> int:
    return int(np.floor(value + 0.5))


def _side_hr(size: int, image_size: int) -> int:
    """Bounding-box side in supersampled pixels."""
    return _round_half_up(SUPERSAMPLING * SIZE_FRACTIONS[size] * image_size)


@functools.lru_cache(maxsize=None)
def _silhouette_hr(shape: int, side_hr: int) -> np.ndarray:
    """The shape's supersampled mask filling a `side_hr` square box (bool [side_hr, side_hr])."""
    canvas = Image.new("1", (side_hr, side_hr), 0)
    draw = ImageDraw.Draw(canvas)
    last = side_hr - 1  # Pillow's boxes include their last pixel
    if SHAPES[shape] == "circle":
        draw.ellipse((0, 0, last, last), fill=1)
    elif SHAPES[shape] == "square":
        draw.rectangle((0, 0, last, last), fill=1)
    else:  # upright isosceles triangle: base at the bottom, apex at the top centre
        draw.polygon([(0, last), (last, last), (last / 2, 0)], fill=1)
    return np.array(canvas, dtype=bool)


@functools.lru_cache(maxsize=None)
def _silhouette_centroid_hr(shape: int, side_hr: int) -> tuple[float, float]:
    """(x, y) centroid of the supersampled mask, relative to its box's top-left corner.

    The oracle places candidate silhouettes by their centroid because that is what it can measure in an image; using
    the drawn mask's own centroid (for the triangle one third of its half-height below the box centre, as the
    specification says) also absorbs Pillow's rasterisation conventions.
    """
    rows, cols = np.nonzero(_silhouette_hr(shape, side_hr))
    return float(cols.mean() + 0.5), float(rows.mean() + 0.5)


@functools.lru_cache(maxsize=None)
def _coverage_at_phase(shape: int, side_hr: int, phase_x: int, phase_y: int) -> np.ndarray:
    """Box-filtered coverage (float32, in [0, 1]) of a silhouette whose top-left corner sits `phase` supersampled
    pixels into an output pixel; only SUPERSAMPLING**2 phases exist per silhouette, so they are cached."""
    height = -(-(phase_y + side_hr) // SUPERSAMPLING) * SUPERSAMPLING
    width = -(-(phase_x + side_hr) // SUPERSAMPLING) * SUPERSAMPLING
    canvas = np.zeros((height, width), np.float32)
    canvas[phase_y:phase_y + side_hr, phase_x:phase_x + side_hr] = _silhouette_hr(shape, side_hr)
    coverage = canvas.reshape(height // SUPERSAMPLING, SUPERSAMPLING, width // SUPERSAMPLING, SUPERSAMPLING)
    coverage = coverage.mean(axis=(1, 3))
    coverage.flags.writeable = False
    return coverage


@dataclasses.dataclass(frozen=True)
class _Patch:
    """A coverage map of one object and the output pixel where its top-left corner goes."""

    coverage: np.ndarray
    row: int
    col: int


def _object_patch(shape: int, size: int, image_size: int, left_hr: int, top_hr: int) -> _Patch:
    """Coverage of a silhouette whose bounding box starts at supersampled pixel (left_hr, top_hr)."""
    side_hr = _side_hr(size, image_size)
    # Objects stay inside the image.
    left_hr = min(max(left_hr, 0), SUPERSAMPLING * image_size - side_hr)
    top_hr = min(max(top_hr, 0), SUPERSAMPLING * image_size - side_hr)
    coverage = _coverage_at_phase(shape, side_hr, left_hr % SUPERSAMPLING, top_hr % SUPERSAMPLING)
    return _Patch(coverage, top_hr // SUPERSAMPLING, left_hr // SUPERSAMPLING)


def cell_centre(position: int, image_size: int) -> tuple[float, float]:
    """(x, y) centre of a 3x3 grid cell, in pixels (pixel i spans [i, i + 1))."""
    row, col = divmod(position, 3)
    return (col + 0.5) * image_size / 3, (row + 0.5) * image_size / 3


def render_at(attrs: Attributes, image_size: int, centre_xy: tuple[float, float]) -> np.ndarray:
    """The image (uint8 [S, S, 3]) with the object's bounding-box centre at `centre_xy` (pixels, no jitter added).

    Compositing the box-filtered coverage over the background equals box-filtering the supersampled two-colour image.
    """
    side_hr = _side_hr(attrs.size, image_size)
    left_hr = _round_half_up(SUPERSAMPLING * centre_xy[0] - side_hr / 2)
    top_hr = _round_half_up(SUPERSAMPLING * centre_xy[1] - side_hr / 2)
    patch = _object_patch(attrs.shape, attrs.size, image_size, left_hr, top_hr)
    background = np.asarray(BACKGROUND_RGB[attrs.background], np.float32)
    colour = np.asarray(COLOUR_RGB[attrs.colour], np.float32)
    image = np.empty((image_size, image_size, 3), np.uint8)
    image[...] = BACKGROUND_RGB[attrs.background]
    height, width = patch.coverage.shape
    blended = background + patch.coverage[..., None] * (colour - background)
    image[patch.row:patch.row + height, patch.col:patch.col + width] = np.rint(blended).astype(np.uint8)
    return image


def render(attrs: Attributes, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """A fresh image (uint8 [S, S, 3]) of `attrs`, its bounding-box centre jittered around its grid cell's centre."""
    centre_x, centre_y = cell_centre(attrs.position, image_size)
    jitter_x, jitter_y = rng.uniform(-JITTER_FRACTION * image_size, JITTER_FRACTION * image_size, size=2)
    return render_at(attrs, image_size, (centre_x + jitter_x, centre_y + jitter_y))


# ----------------------------------------------------------------------------------------------------------------------
# Captions

CAPTION_TEMPLATES = (
    "a {size} {colour} {shape} in the {position} on a {background} background",  # canonical: evaluation uses only this
    "a {colour} {shape}, {size}, in the {position} of a {background} image",
    "{background} background with a {size} {colour} {shape} in the {position}",
    "in the {position} there is a {size} {shape} coloured {colour} on {background}",
    "a {shape} that is {size} and {colour}, placed in the {position} of a {background} picture",
    "on a {background} background, a {colour} {size} {shape} sits in the {position}",
    "{position}: {size} {colour} {shape}, {background} background",
)

# Fixed alternative words for training captions, so the text encoder does not tie an attribute to one spelling.
SYNONYMS = {"gray": ("grey",), "center": ("centre", "middle"), "circle": ("disc",)}


def _attribute_words(attrs: Attributes) -> dict[str, str]:
    return {name: ATTRIBUTE_VALUES[name][index] for name, index in zip(ATTRIBUTE_NAMES, attrs)}


def canonical_caption(attrs: Attributes) -> str:
    """The canonical caption, e.g. `a small red circle in the top left on a black background`."""
    return template_caption(attrs, CAPTION_TEMPLATES[0])


def template_caption(attrs: Attributes, template: str) -> str:
    """`attrs` in one caption template, with the vocabulary's own words (no synonyms)."""
    return template.format(**_attribute_words(attrs))


def random_caption(attrs: Attributes, rng: np.random.Generator) -> str:
    """A training caption for the small CLIP: a random template, each word possibly replaced by a fixed synonym.

    Evaluation (prompts, scores) uses only `canonical_caption`; these variants exist so CLIP does not learn one layout.
    """
    return random_captions([attrs], rng)[0]


def random_captions(combinations: Sequence[Attributes], rng: np.random.Generator) -> list[str]:
    """Training captions of several combinations in ONE random wording (the same template, the same synonym picks),
    so captions of combinations that differ in one attribute differ only in that attribute's words."""
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    synonym_draw = {name: rng.random() for name in ATTRIBUTE_NAMES}
    captions = []
    for attrs in combinations:
        words = {}
        for name, word in _attribute_words(attrs).items():
            choices = (word,) + SYNONYMS.get(word, ())
            words[name] = choices[int(synonym_draw[name] * len(choices))]
        captions.append(template.format(**words))
    return captions


def hard_negative_combinations(attrs: Attributes, count: int, rng: np.random.Generator,
                               attribute_weights: Sequence[float] | None = None) -> list[Attributes]:
    """`count` distinct TRAINING combinations that each differ from `attrs` in exactly one attribute: contrastive hard
    negatives that never name a held-out combination, as docs/SHAPES.md requires of everything a training stage sees.

    The changed attribute is drawn with `attribute_weights` (in ATTRIBUTE_NAMES order; default uniform), then its
    new value uniformly.
    """
    weights_by_name = dict(zip(ATTRIBUTE_NAMES, attribute_weights or [1.0] * len(ATTRIBUTE_NAMES)))
    candidates, weights = [], []
    for index, name in enumerate(ATTRIBUTE_NAMES):
        neighbours = [attrs._replace(**{name: value}) for value in range(NUM_CLASSES[name]) if value != attrs[index]]
        neighbours = [n for n in neighbours if not is_heldout(n)]
        if not neighbours:  # e.g. the one other size makes a held-out combination
            continue
        candidates += neighbours
        weights += [weights_by_name[name] / len(neighbours)] * len(neighbours)
    weights = np.asarray(weights, np.float64)
    if count > np.count_nonzero(weights):
        raise ValueError(f"{count} hard negatives requested, but {attrs} has only {np.count_nonzero(weights)} "
                         "training neighbours with a non-zero attribute weight")
    chosen = rng.choice(len(candidates), size=count, replace=False, p=weights / weights.sum())
    return [candidates[i] for i in chosen]


def template_fields(template: str) -> set[str]:
    """The attribute names a caption template fills in."""
    return {field for _, field, _, _ in string.Formatter().parse(template) if field}


# ----------------------------------------------------------------------------------------------------------------------
# Oracle

NO_OBJECT_FRACTION = 0.01  # less coverage than this fraction of the image means there is no object
HIGH_CONTRAST_FRACTION = 0.8  # pixels at least this far (relative) from the background give the object's colour
BLOB_THRESHOLD = 0.5  # coverage at which a pixel counts as part of a blob when separating objects
# A blob smaller than half the smallest object (a small triangle) is a speck, not a second object; this keeps stray
# pixels in generated images from turning them into "several objects".
MIN_BLOB_FRACTION = 0.5 * (0.5 * SIZE_FRACTIONS[0] ** 2)  # half of a small triangle's share of the image
# A shape read with a smaller margin (see `_match_shape_and_size`) is ambiguous: wrong on shape in the strict reading.
# Fixed once, never retuned: clean renders stay above it (none below, minimum 0.215 at S = 32-256, median 0.28;
# docs/experiments.md); blobs between two shapes fall below.
MIN_SHAPE_MARGIN = 0.10

_COLOUR_PALETTE = np.asarray(COLOUR_RGB, np.float32)
_BACKGROUND_PALETTE = np.asarray(BACKGROUND_RGB, np.float32)


@dataclasses.dataclass(frozen=True)
class OracleResult:
    """What the oracle read: `status` is "ok", "no object" or "several objects"; attributes and the shape margin only
    when "ok". Two results are equal when they read the same (the margin, how clearly, is not compared)."""

    status: str
    attributes: Attributes | None = None
    margin: float | None = dataclasses.field(default=None, compare=False)

    @property
    def ambiguous(self) -> bool:
        """Read, but with a shape margin below MIN_SHAPE_MARGIN."""
        return self.status == "ok" and self.margin < MIN_SHAPE_MARGIN


def _nearest(palette: np.ndarray, rgb: np.ndarray) -> int:
    return int(np.abs(palette - rgb).sum(axis=1).argmin())


def _blob_sizes(mask: np.ndarray) -> np.ndarray:
    """Pixel counts of the 8-connected components of a boolean mask.

    Works on horizontal runs of pixels (one per row for a convex object) joined by a small union-find, so it stays fast
    at S = 256 without scipy.
    """
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # run i covers columns [starts[i], ends[i]) of row rows[i]
    # Row-major keys are sorted over all runs, and so are the ends, because runs in a row are disjoint and ordered.
    # A run in the next row touches run i (diagonals included) iff it ends at or after starts[i] and starts at or
    # before ends[i]; those runs are a contiguous range.
    stride = mask.shape[1] + 2
    first = np.searchsorted(rows * stride + ends, (rows + 1) * stride + starts, side="left")
    stop = np.searchsorted(rows * stride + starts, (rows + 1) * stride + ends, side="right")
    counts = np.maximum(stop - first, 0)
    upper = np.repeat(np.arange(len(rows)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)  # 0, 1, ... within each range
    lower = np.repeat(first, counts) + offsets

    parent = list(range(len(rows)))

    def find(run: int) -> int:
        while parent[run] != run:
            parent[run] = parent[parent[run]]
            run = parent[run]
        return run

    for a, b in zip(upper.tolist(), lower.tolist()):
        parent[find(a)] = find(b)
    roots = np.array([find(run) for run in range(len(rows))], dtype=np.int64)
    sizes = np.bincount(roots, weights=ends - starts, minlength=len(rows))
    return sizes[sizes > 0]


def _match_shape_and_size(coverage: np.ndarray, centroid_xy: tuple[float, float]) -> tuple[int, int, float]:
    """The (shape, size) whose silhouette, centred on the measured centroid, differs least (L1) from the coverage,
    and its shape margin: how much larger the lowest error of any other shape (either size) is, per unit of coverage."""
    image_size = coverage.shape[0]
    candidates = {}
    for shape, size in itertools.product(range(len(SHAPES)), range(len(SIZES))):
        side_hr = _side_hr(size, image_size)
        offset_x, offset_y = _silhouette_centroid_hr(shape, side_hr)
        left_hr = _round_half_up(SUPERSAMPLING * centroid_xy[0] - offset_x)
        top_hr = _round_half_up(SUPERSAMPLING * centroid_xy[1] - offset_y)
        candidates[shape, size] = _object_patch(shape, size, image_size, left_hr, top_hr)
    # Compare on the union of the candidates' footprints: coverage outside it costs every candidate the same.
    top = min(p.row for p in candidates.values())
    left = min(p.col for p in candidates.values())
    bottom = max(p.row + p.coverage.shape[0] for p in candidates.values())
    right = max(p.col + p.coverage.shape[1] for p in candidates.values())
    window = coverage[top:bottom, left:right]
    errors = {}
    for key, patch in candidates.items():
        template = np.zeros_like(window)
        height, width = patch.coverage.shape
        template[patch.row - top:patch.row - top + height, patch.col - left:patch.col - left + width] = patch.coverage
        errors[key] = float(np.abs(template - window).sum())
    shape, size = min(errors, key=errors.get)
    runner_up = min(error for (other, _), error in errors.items() if other != shape)
    return shape, size, (runner_up - errors[shape, size]) / float(coverage.sum())


def border_median(image: np.ndarray) -> np.ndarray:
    """Per-channel median [3] of an image's border pixels (float32): its background colour on a Shapes image."""
    pixels = np.asarray(image, np.float32)
    return np.median(np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]]), axis=0)


def oracle(image: np.ndarray) -> OracleResult:
    """Read the attributes back out of one image (uint8 [S, S, 3]).

    Background: the palette background nearest to the per-channel median of the border pixels. Coverage: each pixel's
    L1 distance to the background over the object colour's, clipped to [0, 1], so anti-aliased edges count
    fractionally. Colour: the palette colour nearest to the median of the high-contrast pixels. Position: the grid cell
    of the coverage-weighted centroid. Shape and size: the best-matching silhouette placed at that centroid; the
    margin says by how much (per unit of coverage) it beats the best silhouette of another shape.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != image.shape[1] or image.shape[2] != 3:
        raise ValueError(f"expected a square RGB image [S, S, 3], got shape {image.shape}")
    image_size = image.shape[0]
    pixels = image.astype(np.float32)

    background = _nearest(_BACKGROUND_PALETTE, border_median(pixels))
    background_rgb = _BACKGROUND_PALETTE[background]

    distance = np.abs(pixels - background_rgb).sum(axis=-1)
    high_contrast = distance >= HIGH_CONTRAST_FRACTION * distance.max()
    colour = _nearest(_COLOUR_PALETTE, np.median(pixels[high_contrast], axis=0))
    coverage = np.clip(distance / np.abs(_COLOUR_PALETTE[colour] - background_rgb).sum(), 0.0, 1.0)

    area = float(coverage.sum())
    if area < NO_OBJECT_FRACTION * image_size ** 2:
        return OracleResult("no object")
    blob_sizes = _blob_sizes(coverage >= BLOB_THRESHOLD)
    if np.count_nonzero(blob_sizes >= MIN_BLOB_FRACTION * image_size ** 2) > 1:
        return OracleResult("several objects")

    centres = np.arange(image_size, dtype=np.float32) + 0.5
    centroid_x = float(coverage.sum(axis=0) @ centres) / area
    centroid_y = float(coverage.sum(axis=1) @ centres) / area
    row = min(int(3 * centroid_y / image_size), 2)
    col = min(int(3 * centroid_x / image_size), 2)
    shape, size, margin = _match_shape_and_size(coverage, (centroid_x, centroid_y))
    return OracleResult("ok", Attributes(shape, colour, size, 3 * row + col, background), margin)


def oracle_batch(images: np.ndarray | Sequence[np.ndarray]) -> list[OracleResult]:
    """`oracle` on each image of a batch (uint8 [N, S, S, 3])."""
    return [oracle(image) for image in images]


def margin_distribution(results: Sequence[OracleResult]) -> dict[str, float]:
    """The shape margins of the images the oracle read: median, 10th percentile and the fraction below
    MIN_SHAPE_MARGIN (ambiguous); NaN when it read none."""
    margins = np.asarray([r.margin for r in results if r.status == "ok"], np.float64)
    if not len(margins):
        return {"margin_median": float("nan"), "margin_p10": float("nan"), "margin_below_min": float("nan")}
    return {"margin_median": float(np.median(margins)), "margin_p10": float(np.percentile(margins, 10)),
            "margin_below_min": float(np.mean(margins < MIN_SHAPE_MARGIN))}


def score_images(images: np.ndarray | Sequence[np.ndarray], expected: Sequence[Attributes]) -> dict[str, float]:
    """Per-attribute accuracy, all-attribute accuracy ("all"), the fractions the oracle refused and the margin
    distribution (`margin_distribution`).

    Strict reading (the scores): an ambiguous image is wrong on shape. "lenient_shape" and "lenient_all" are the
    same accuracies with any shape read counting. An image the oracle refuses ("no object", "several objects") is
    wrong on every attribute.
    """
    results = oracle_batch(images)
    if len(results) != len(expected):
        raise ValueError(f"{len(results)} images but {len(expected)} expected attribute sets")
    if not results:
        raise ValueError("no images to score")
    correct = np.zeros((len(results), len(ATTRIBUTE_NAMES)), bool)
    for row, (result, target) in enumerate(zip(results, expected)):
        if result.status == "ok":
            correct[row] = np.equal(result.attributes, target)
    lenient_shape = correct[:, 0].copy()
    correct[:, 0] &= [not r.ambiguous for r in results]
    scores = {name: float(correct[:, i].mean()) for i, name in enumerate(ATTRIBUTE_NAMES)}
    scores["all"] = float(correct.all(axis=1).mean())
    scores["lenient_shape"] = float(lenient_shape.mean())
    scores["lenient_all"] = float((lenient_shape & correct[:, 1:].all(axis=1)).mean())
    scores["no_object"] = sum(r.status == "no object" for r in results) / len(results)
    scores["several_objects"] = sum(r.status == "several objects" for r in results) / len(results)
    scores.update(margin_distribution(results))
    return scores


# ----------------------------------------------------------------------------------------------------------------------
# Dataset splits


def _split_seed(seed: int, split: str, purpose: int) -> np.random.SeedSequence:
    """Independent streams per split (so train and validation differ for one seed) and per purpose (so the
    combinations can be drawn without rendering)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return np.random.SeedSequence([seed, SPLITS.index(split), purpose])


def split_combinations(split: str, num_examples: int, seed: int) -> list[Attributes]:
    """The combinations of a split, without rendering: `train` / `validation` draw training combinations uniformly at
    random; `heldout` cycles through the 96 held-out combinations in index order."""
    if split == "heldout":
        heldout = heldout_combinations()
        return [heldout[i % len(heldout)] for i in range(num_examples)]
    training = training_combinations()
    indices = np.random.default_rng(_split_seed(seed, split, 0)).integers(len(training), size=num_examples)
    return [training[i] for i in indices]


def generate_examples(split: str, num_examples: int, image_size: int, seed: int) -> Iterator[dict]:
    """Examples of a split (deterministic for `seed`): `image` (uint8 [S, S, 3]), `caption` (canonical) and the five
    integer labels."""
    rng = np.random.default_rng(_split_seed(seed, split, 1))
    for attrs in split_combinations(split, num_examples, seed):
        example = {"image": render(attrs, image_size, rng), "caption": canonical_caption(attrs)}
        example.update(attrs._asdict())
        yield example
