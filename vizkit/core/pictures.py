"""Turning maps and images into pictures: matplotlib colormaps, overlays, side-by-side panels,
captions and labelled grids.

Non-negative maps use a sequential colormap over [0, scale]; signed maps (occlusion can raise a
probability) use a diverging one centred on zero, so the sign stays readable. A map with colour
channels (``reduce=none``) is shown as an RGB image around mid-gray. The scale is captum's
(``visualize_image_attr``'s ``outlier_perc``): the magnitude below which the map holds all but
``Render.clip_percentile`` percent of its mass; larger values saturate. Gradient maps are sparse: scaled
to their single largest value, nearly every pixel would be drawn as zero and the overlay would look
like the input.

Writing pictures dominated small runs, so the hot paths are lean: colormaps are looked up in a uint8
table (the same colours as matplotlib's, without its float RGBA array), and a map's scale (a sort) is
found once for its heat map and its overlay (``heat_and_overlay``). Text is PIL's default font
(FreeType). Encoding and writing are ``vizkit.output``'s.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from vizkit.core.errors import ConfigError, did_you_mean

SEQUENTIAL = "inferno"
DIVERGING = "RdBu_r"
FONT_SIZE = 14  # pixels; readable when TensorBoard shows a 3-picture panel at its card's width, small enough for a kernel's index
TEXT_PADDING = 1  # white pixels above and below each line, and left and right of it


@dataclass(frozen=True)
class Render:
    """How a map is drawn."""

    cmap: str = ""  # a matplotlib colormap; "": inferno for a non-negative map, RdBu_r for a signed one
    alpha: float = 0.55  # the overlay's opacity where the map reaches its scale
    clip_percentile: float = 2.0  # percent of the map's mass (sum of |values|) drawn saturated; 0: scale to the max

    def check(self) -> Render:
        """Raise ``ConfigError`` for an unknown colormap, an opacity outside [0, 1] or a percentile outside [0, 100)."""
        from matplotlib import colormaps

        if not isinstance(self.cmap, str):
            raise ConfigError(f"render.cmap must be a matplotlib colormap's name, got {self.cmap!r}")
        if self.cmap and self.cmap not in colormaps:
            raise ConfigError(f"render.cmap {self.cmap!r} is not a matplotlib colormap{did_you_mean(self.cmap, list(colormaps))}")
        if not _is_number(self.alpha) or not 0 <= self.alpha <= 1:
            raise ConfigError(f"render.alpha (the overlay's opacity) must be a number in [0, 1], got {self.alpha!r}")
        if not _is_number(self.clip_percentile) or not 0 <= self.clip_percentile < 100:
            raise ConfigError(f"render.clip_percentile (percent of the map's mass drawn saturated) must be a number in [0, 100), got {self.clip_percentile!r}")
        return self


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[3,H,W] in [0, 1] -> HxWx3 uint8."""
    return (pixels.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


@lru_cache(maxsize=None)
def _colormap_table(name: str) -> tuple[int, np.ndarray]:
    """(N, table): the colormap's N colours, then its under, over and bad colours, as uint8 RGB."""
    from matplotlib import colormaps

    colormap = colormaps[name]
    rgba = np.concatenate([colormap(np.arange(colormap.N)), [colormap.get_under(), colormap.get_over(), colormap.get_bad()]])
    return colormap.N, (rgba[:, :3] * 255 + 0.5).astype(np.uint8)


def apply_colormap(name: str, values: np.ndarray) -> np.ndarray:
    """matplotlib's ``colormaps[name](values)`` for floats meant to lie in [0, 1], as HxWx3 uint8
    (the same indexing: ``int(v * N)``, 1.0 in the last colour, out of range and NaN in the under,
    over and bad colours)."""
    count, table = _colormap_table(name)
    scaled = values * values.dtype.type(count)
    scaled[scaled == count] = count - 1
    under, over, bad = scaled < 0, scaled >= count, np.isnan(scaled)
    with np.errstate(invalid="ignore"):
        index = scaled.astype(np.intp)
    if under.any() or over.any() or bad.any():
        index[under], index[over], index[bad] = count, count + 1, count + 2
    return table[index]


def display_scale(values: np.ndarray, clip_percentile: float) -> float:
    """The magnitude drawn at full colour: captum's ``_cumulative_sum_threshold(|values|, 100 - clip_percentile)``
    (the smallest |v| at which the ascending cumulative sum of |values| reaches 100 - clip_percentile
    percent of their total), the largest |v| when ``clip_percentile`` is 0; at least 1e-12."""
    magnitude = np.abs(values).ravel()
    if clip_percentile == 0:  # no sort: the hot path of a run that asked for the max
        scale = magnitude.max()
    else:
        ordered = np.sort(magnitude)
        cumulative = np.cumsum(ordered, dtype=np.float64)  # a float32 running sum of n values may drift by n × 6e-8 of the total (3e-3 at 224²)
        scale = ordered[np.searchsorted(cumulative, cumulative[-1] * (1 - clip_percentile / 100))]
    return max(float(scale), 1e-12)


def scaled(attribution: torch.Tensor, render: Render = Render()) -> np.ndarray:
    """A map [C,H,W] divided by its ``display_scale``, clipped to [-1, 1], as float32 numpy."""
    values = attribution.detach().float().cpu().numpy()
    return np.clip(values / values.dtype.type(display_scale(values, render.clip_percentile)), -1, 1)


def _heat(unit: np.ndarray, render: Render) -> np.ndarray:
    """A ``scaled`` map as HxWx3 uint8 colours."""
    if unit.shape[0] == 3:  # the pixels of to_uint8(0.5 + v / (2 scale)): halving is exact
        return ((0.5 + unit * 0.5).transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
    unit = unit[0]
    if unit.min() < 0:
        return apply_colormap(render.cmap or DIVERGING, unit * 0.5 + 0.5)
    return apply_colormap(render.cmap or SEQUENTIAL, unit)


def _blend(pixels: torch.Tensor, heat: np.ndarray, unit: np.ndarray, render: Render) -> np.ndarray:
    """``heat`` over the image, opaque as ``render.alpha`` × the ``scaled`` map's magnitude, so that
    unimportant regions show the image itself."""
    image = to_uint8(pixels).astype(np.float32)
    weight = np.abs(unit).max(0)[..., None] * np.float32(render.alpha)
    return (image * (1 - weight) + heat.astype(np.float32) * weight + 0.5).astype(np.uint8)


def colorize(attribution: torch.Tensor, render: Render = Render()) -> np.ndarray:
    """[1,H,W] or [3,H,W] map -> HxWx3 uint8 picture (``render.cmap`` ignored for an RGB map)."""
    return _heat(scaled(attribution, render), render)


def overlay(pixels: torch.Tensor, attribution: torch.Tensor, render: Render = Render(), heat: np.ndarray | None = None) -> np.ndarray:
    """The colorized map (``heat``, computed when not given) blended over the image [3,H,W] in [0, 1].
    The map's scale is found again here: ``heat_and_overlay`` finds it once for both pictures."""
    unit = scaled(attribution, render)
    return _blend(pixels, _heat(unit, render) if heat is None else heat, unit, render)


def heat_and_overlay(pixels: torch.Tensor, attribution: torch.Tensor, render: Render = Render()) -> tuple[np.ndarray, np.ndarray]:
    """``(colorize(attribution, render), overlay(pixels, attribution, render))``, the map scaled once."""
    unit = scaled(attribution, render)
    heat = _heat(unit, render)
    return heat, _blend(pixels, heat, unit, render)


@lru_cache(maxsize=None)
def _font():
    from PIL import ImageFont

    return ImageFont.load_default(size=FONT_SIZE)


def strip_height(lines: int = 1) -> int:
    """The height in pixels of a white strip holding ``lines`` lines of text (a caption, a grid's label)."""
    ascent, descent = _font().getmetrics()
    return lines * (ascent + descent) + 2 * TEXT_PADDING


def fitted(text: str, width: float) -> str:
    """``text``, or its longest prefix with an ellipsis that is at most ``width`` pixels wide ("" when
    not even the ellipsis fits): drawn text is cut, never left running off the picture."""
    font = _font()
    if font.getlength(text) <= width:
        return text
    # the longest prefix whose ellipsized width fits (prefix widths grow with their length)
    keep = bisect_right(range(len(text)), False, key=lambda end: font.getlength(text[:end] + "…") > width) - 1
    return text[:keep].rstrip() + "…" if keep >= 0 else ""


def _text_strip(lines: list[str], width: int, centred: bool) -> np.ndarray:
    """A white strip ``width`` pixels wide holding ``lines`` in black, each cut to fit."""
    from PIL import Image, ImageDraw

    font = _font()
    ascent, descent = font.getmetrics()
    strip = Image.new("RGB", (width, strip_height(len(lines))), "white")
    draw = ImageDraw.Draw(strip)
    for row, line in enumerate(lines):
        text = fitted(line, width - 2 * TEXT_PADDING)
        left = round((width - font.getlength(text)) / 2) if centred else TEXT_PADDING
        draw.text((left, TEXT_PADDING + row * (ascent + descent)), text, fill="black", font=font)
    return np.asarray(strip)


def caption(picture: np.ndarray, lines: list[str]) -> np.ndarray:
    """The picture (HxWx3 uint8) under a white strip holding ``lines``, one per line, left-aligned."""
    return np.concatenate([_text_strip(lines, picture.shape[1], centred=False), picture]) if lines else picture


def panel(pictures: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Pictures side by side on a white background."""
    height = max(p.shape[0] for p in pictures)
    width = sum(p.shape[1] for p in pictures) + gap * (len(pictures) - 1)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for picture in pictures:
        canvas[: picture.shape[0], x : x + picture.shape[1]] = picture
        x += picture.shape[1] + gap
    return canvas


def grid(pictures: list[np.ndarray], columns: int | None = None, gap: int = 4, labels: list[str] | None = None) -> np.ndarray:
    """Pictures in rows of ``columns`` (about square by default) on a white background; with ``labels``
    (one per picture), each label centred in a strip under its picture, cut to the picture's width."""
    if labels is not None:
        if len(labels) != len(pictures):
            raise ValueError(f"grid: {len(labels)} labels for {len(pictures)} pictures")
        pictures = [np.concatenate([picture, _text_strip([label], picture.shape[1], centred=True)]) for picture, label in zip(pictures, labels)]
    columns = columns or max(1, int(np.ceil(np.sqrt(len(pictures)))))
    rows = [panel(pictures[i : i + columns], gap) for i in range(0, len(pictures), columns)]
    width = max(row.shape[1] for row in rows)
    rows = [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows]
    return panel([np.concatenate(sum([[row, np.full((gap, width, 3), 255, np.uint8)] for row in rows], [])[:-1])], gap)
