"""Turning maps and images into pictures: matplotlib colormaps, overlays, side-by-side panels.

Non-negative maps use a sequential colormap scaled to [0, max]; signed maps (occlusion can raise a
probability) use a diverging one centred on zero, so the sign stays readable. A map with colour
channels (``reduce=none``) is shown as an RGB image around mid-gray.
"""
from __future__ import annotations

import numpy as np
import torch

SEQUENTIAL = "inferno"
DIVERGING = "RdBu_r"


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[3,H,W] in [0, 1] -> HxWx3 uint8."""
    return (pixels.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def colorize(attribution: torch.Tensor) -> np.ndarray:
    """[1,H,W] or [3,H,W] map -> HxWx3 uint8 picture."""
    from matplotlib import colormaps

    values = attribution.detach().float().cpu()
    if values.shape[0] == 3:
        scale = values.abs().max().clamp_min(1e-12)
        return to_uint8(0.5 + values / (2 * scale))
    values = values[0]
    if values.min() < 0:
        scale = values.abs().max().clamp_min(1e-12)
        rgba = colormaps[DIVERGING]((values / scale * 0.5 + 0.5).numpy())
    else:
        rgba = colormaps[SEQUENTIAL]((values / values.max().clamp_min(1e-12)).numpy())
    return (rgba[..., :3] * 255 + 0.5).astype(np.uint8)


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
