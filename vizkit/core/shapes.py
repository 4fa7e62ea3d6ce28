"""The *shapes* data set: procedurally generated, cluttered images of one shape each.

Every image holds exactly one **target shape** of one of six classes (`SHAPE_CLASSES`):
circle, square, triangle, star (five points), cross (a plus sign) and hexagon. The class is
drawn uniformly, then the shape gets a random fill colour (kept well apart from the background
colour), a random size (its area covers roughly 8-35 % of the image), a random rotation and a
random position with the whole shape inside the image.

The rest of the picture is clutter, so that a classifier has to look at the shape:

* a **background** made of a smooth random colour gradient, low-frequency colour blotches and
  a few long, thin, low-contrast lines;
* a few **distractors**: short strokes, small dots and thin arcs in strong colours. None of
  them is one of the class silhouettes, and each is either thin (at most 3 px wide) or small
  (a dot of radius at most 4 px); they are drawn *before* the target, so they may run under
  it but never over it;
* mild per-pixel noise over the whole image (it changes colours, never the mask).

Splits and determinism
    A sample is a pure function of ``(seed, index)``: `render_shape` seeds its own
    ``numpy.random.default_rng([seed, index])`` and never touches global random state, so
    the same call gives the same pixels on every machine and in every process. The standard
    splits are just seeds (`SPLIT_SEEDS`: train 0, val 1, test 2); use `split_seed` to turn a
    split name into its seed. Indices are unbounded, so a split has as many images as asked.

Masks
    `ShapeSample.mask` is exactly the set of pixels painted with the target's colour (the shape
    is rasterised once, without antialiasing, and that raster is both the mask and the paint
    stencil). It is meant for attribution-quality metrics such as the pointing game (is the
    attribution maximum inside the mask?) and mask energy (share of attribution inside it).

Rendering one 128 px image takes about 2-3 ms on one CPU core; only numpy and Pillow are needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPE_CLASSES",
    "IMAGE_SIZE",
    "SPLIT_SEEDS",
    "ShapeSample",
    "split_seed",
    "render_shape",
    "render_many",
]

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon")
"""Class names; a sample's `label` indexes this tuple."""

IMAGE_SIZE: int = 128
"""Native side length in pixels (images are square)."""

SPLIT_SEEDS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
"""The seed of each standard split."""

# Target area as a share of the image, before any shrinking needed to fit the shape inside.
_AREA_RANGE = (0.08, 0.35)
_MARGIN = 2  # pixels kept free between the target's bounding box and the image border
_MIN_COLOUR_DISTANCE = 110.0  # RGB distance between target fill and the background around it


def split_seed(split: str) -> int:
    """The seed of a named split ('train', 'val' or 'test')."""
    try:
        return SPLIT_SEEDS[split]
    except (KeyError, TypeError):
        valid = ", ".join(repr(s) for s in SPLIT_SEEDS)
        raise ValueError(f"unknown shapes split {split!r}; valid splits: {valid}") from None


@dataclass(frozen=True)
class ShapeSample:
    """One rendered image with its target mask and class label."""

    image: np.ndarray  # uint8, (H, W, 3)
    mask: np.ndarray  # bool, (H, W): True exactly on the target shape's pixels
    label: int  # index into SHAPE_CLASSES

    @property
    def class_name(self) -> str:
        return SHAPE_CLASSES[self.label]


# --------------------------------------------------------------------------- unit outlines
def _regular_polygon(n: int, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2.0 * math.pi * np.arange(n) / n
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(inner: float) -> np.ndarray:
    angles = -math.pi / 2 + math.pi * np.arange(10) / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross(half_width: float) -> np.ndarray:
    a, w = 1.0, half_width
    return np.array(
        [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
    )


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _unit_outline(label: int, rng: np.random.Generator) -> np.ndarray | None:
    """Outline of the target at unit scale, centred on the origin (None for the circle)."""
    name = SHAPE_CLASSES[label]
    if name == "circle":
        return None
    if name == "square":
        return _regular_polygon(4, math.pi / 4)
    if name == "triangle":
        return _regular_polygon(3, -math.pi / 2) + np.array([0.0, 0.25])  # centre the bounding box
    if name == "star":
        return _star(float(rng.uniform(0.42, 0.52)))
    if name == "cross":
        return _cross(float(rng.uniform(0.28, 0.36)))
    if name == "hexagon":
        return _regular_polygon(6)
    raise AssertionError(name)


# --------------------------------------------------------------------------- background
def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float (H, W, 3) background: gradient + low-frequency blotches, values in [0, 255]."""
    c0, c1 = _random_colour(rng), _random_colour(rng)
    theta = rng.uniform(0, 2 * math.pi)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    proj = math.cos(theta) * coords[None, :] + math.sin(theta) * coords[:, None]  # (H, W)
    t = np.clip(proj / 1.42 + 0.5, 0.0, 1.0)[..., None]
    base = c0.astype(np.float32) + (c1 - c0).astype(np.float32) * t
    # Low-frequency colour blotches: a coarse random grid, smoothly upsampled.
    cells = int(rng.integers(3, 7))
    grid = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
    blotch = np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), dtype=np.float32)
    strength = np.float32(rng.uniform(0.15, 0.4))
    return base * (1 - strength) + blotch * strength


def _draw_background_lines(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, mean: np.ndarray) -> None:
    for _ in range(int(rng.integers(2, 6))):
        p = rng.uniform(-0.1 * size, 1.1 * size, size=4)
        colour = np.clip(mean + rng.normal(0, 45, size=3), 0, 255)
        draw.line([(p[0], p[1]), (p[2], p[3])], fill=tuple(int(c) for c in colour), width=int(rng.integers(1, 3)))


def _draw_distractors(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    """Short strokes, dots and arcs: thin or small, never a class silhouette."""
    for _ in range(int(rng.integers(3, 8))):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        kind = rng.integers(3)
        x, y = rng.uniform(0, size, size=2)
        if kind == 0:  # short stroke, possibly with one bend
            length = rng.uniform(0.08, 0.25) * size
            a = rng.uniform(0, 2 * math.pi)
            pts = [(x, y), (x + length * math.cos(a), y + length * math.sin(a))]
            if rng.random() < 0.5:
                a2 = a + rng.uniform(-1.2, 1.2)
                l2 = rng.uniform(0.05, 0.15) * size
                pts.append((pts[1][0] + l2 * math.cos(a2), pts[1][1] + l2 * math.sin(a2)))
            draw.line(pts, fill=colour, width=int(rng.integers(1, 4)))
        elif kind == 1:  # small dot(s)
            for _ in range(int(rng.integers(1, 4))):
                r = rng.uniform(1.0, 4.0)
                cx, cy = x + rng.normal(0, 6), y + rng.normal(0, 6)
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:  # thin open arc
            r = rng.uniform(0.05, 0.15) * size
            start = rng.uniform(0, 360)
            sweep = rng.uniform(60, 200)
            draw.arc([x - r, y - r, x + r, y + r], start, start + sweep, fill=colour, width=int(rng.integers(1, 3)))


def _target_colour(rng: np.random.Generator, around: np.ndarray) -> np.ndarray:
    """A fill colour at least _MIN_COLOUR_DISTANCE from the background colour `around`."""
    for _ in range(24):
        c = _random_colour(rng)
        if float(np.linalg.norm(c - around)) >= _MIN_COLOUR_DISTANCE:
            return c
    # Fall back: the colour farthest from the background among the corners of the RGB cube.
    corners = np.array([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)], dtype=np.float64)
    return corners[np.argmax(np.linalg.norm(corners - around, axis=1))]


# --------------------------------------------------------------------------- target
def _place_target(label: int, rng: np.random.Generator, size: int) -> tuple[np.ndarray | None, tuple[float, float, float]]:
    """Outline in pixel coordinates (or None plus circle centre/radius for the circle)."""
    area = rng.uniform(*_AREA_RANGE) * size * size
    room = size - 2 * _MARGIN
    outline = _unit_outline(label, rng)
    if outline is None:  # circle
        r = min(math.sqrt(area / math.pi), (room - 0.5) / 2)
        cx = rng.uniform(_MARGIN + r, size - _MARGIN - r)
        cy = rng.uniform(_MARGIN + r, size - _MARGIN - r)
        return None, (cx, cy, r)
    a = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    pts = outline @ rot.T
    scale = math.sqrt(area / _polygon_area(outline))
    extent = pts.max(axis=0) - pts.min(axis=0)
    scale = min(scale, (room - 0.5) / float(extent.max()))
    pts = pts * scale
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    cx = rng.uniform(_MARGIN - lo[0], size - _MARGIN - hi[0])
    cy = rng.uniform(_MARGIN - lo[1], size - _MARGIN - hi[1])
    return pts + np.array([cx, cy]), (cx, cy, 0.0)


def shape_label(index: int, *, seed: int = 0) -> int:
    """The class of sample ``index`` (what ``render_shape`` would draw), without drawing it."""
    return int(np.random.default_rng([int(seed), int(index)]).integers(len(SHAPE_CLASSES)))


def render_shape(index: int, *, seed: int = 0, size: int = IMAGE_SIZE) -> ShapeSample:
    """Render sample `index` of the set with `seed`, deterministically.

    The same ``(index, seed, size)`` always gives the same image, mask and label.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    if size < 16:
        raise ValueError(f"size must be >= 16 px, got {size}")
    rng = np.random.default_rng([int(seed), int(index)])
    label = int(rng.integers(len(SHAPE_CLASSES)))  # the first draw: shape_label reads it without rendering

    background = _background(rng, size)
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    _draw_background_lines(draw, rng, size, background.mean(axis=(0, 1)))
    _draw_distractors(draw, rng, size)

    # Rasterise the target once, without antialiasing: the raster is both stencil and mask.
    outline, (cx, cy, r) = _place_target(label, rng, size)
    stencil = Image.new("L", (size, size), 0)
    sdraw = ImageDraw.Draw(stencil)
    if outline is None:
        sdraw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        sdraw.polygon([(float(x), float(y)) for x, y in outline], fill=255)
    mask = np.asarray(stencil) > 0

    image = np.asarray(canvas, dtype=np.float32).copy()
    ys, xs = np.nonzero(mask)
    around = background[ys, xs].mean(axis=0) if len(ys) else background.mean(axis=(0, 1))
    fill = _target_colour(rng, around)
    # Gentle shading across the shape so the fill is not perfectly flat.
    g = rng.normal(0, 20, size=2)
    shade = g[0] * (xs - cx) / size + g[1] * (ys - cy) / size
    image[ys, xs] = fill[None, :] + shade[:, None]

    noise = rng.standard_normal(size=image.shape, dtype=np.float32)
    noise *= np.float32(rng.uniform(2, 8))
    image += noise
    image = np.clip(image, 0, 255).astype(np.uint8)
    return ShapeSample(image=image, mask=mask, label=label)


def render_many(count: int, *, seed: int = 0, start: int = 0, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render indices ``start .. start + count - 1`` as stacked arrays.

    Returns ``(images uint8 (N, H, W, 3), masks bool (N, H, W), labels int64 (N,))``.
    """
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    masks = np.empty((count, size, size), dtype=bool)
    labels = np.empty((count,), dtype=np.int64)
    for i in range(count):
        s = render_shape(start + i, seed=seed, size=size)
        images[i], masks[i], labels[i] = s.image, s.mask, s.label
    return images, masks, labels
