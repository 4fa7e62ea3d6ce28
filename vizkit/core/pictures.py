"""Turning maps and images into pictures: matplotlib colormaps, overlays, side-by-side panels.

Non-negative maps use a sequential colormap scaled to [0, max]; signed maps (occlusion can raise a
probability) use a diverging one centred on zero, so the sign stays readable. A map with colour
channels (``reduce=none``) is shown as an RGB image around mid-gray.

Writing pictures dominated small runs, so the hot paths are lean: colormaps are looked up in a uint8
table (the same colours as matplotlib's, without its float RGBA array). Encoding and writing are
``vizkit.output``'s.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

SEQUENTIAL = "inferno"
DIVERGING = "RdBu_r"


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


def colorize(attribution: torch.Tensor) -> np.ndarray:
    """[1,H,W] or [3,H,W] map -> HxWx3 uint8 picture."""
    values = attribution.detach().float().cpu()
    if values.shape[0] == 3:
        scale = values.abs().max().clamp_min(1e-12)
        return to_uint8(0.5 + values / (2 * scale))
    values = values[0]
    if values.min() < 0:
        scale = values.abs().max().clamp_min(1e-12)
        return apply_colormap(DIVERGING, (values / scale * 0.5 + 0.5).numpy())
    return apply_colormap(SEQUENTIAL, (values / values.max().clamp_min(1e-12)).numpy())


def overlay(pixels: torch.Tensor, attribution: torch.Tensor, opacity: float = 0.55, heat: np.ndarray | None = None) -> np.ndarray:
    """The colorized map (``heat``, computed when not given) blended over the image, weighted by the
    map's magnitude so that unimportant regions show the image itself."""
    image = to_uint8(pixels).astype(np.float32)
    heat = (colorize(attribution) if heat is None else heat).astype(np.float32)
    magnitude = attribution.detach().float().abs().amax(0).cpu()
    weight = (magnitude / magnitude.max().clamp_min(1e-12)).numpy()[..., None] * opacity
    return (image * (1 - weight) + heat * weight + 0.5).astype(np.uint8)


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


def grid(pictures: list[np.ndarray], columns: int | None = None, gap: int = 4) -> np.ndarray:
    """Pictures in rows of ``columns`` (about square by default) on a white background."""
    columns = columns or max(1, int(np.ceil(np.sqrt(len(pictures)))))
    rows = [panel(pictures[i : i + columns], gap) for i in range(0, len(pictures), columns)]
    width = max(row.shape[1] for row in rows)
    rows = [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows]
    return panel([np.concatenate(sum([[row, np.full((gap, width, 3), 255, np.uint8)] for row in rows], [])[:-1])], gap)
