"""Transformation robustness (Olah et al. 2017): small random, differentiable changes to the image before
the model sees it, so that the optimizer cannot win with patterns that work at only one exact position,
size or angle. Configured as a list of strings, applied in order, one random draw per call for the
whole batch (as lucent), each from the transforms' own seeded generator (never the global RNG).

    pad:N           pad every side by N pixels with constant 0.5 (lucent's standard choice: mid-gray
                    borders that the later jitter and rotation can move into view); size grows by 2N
    jitter:N        crop at a random offset in [0, N] along each axis; size shrinks by N
    scale:F,F,...   bilinear resize by a factor drawn from the list; size is round(F * size)
    rotate:D,D,...  rotate by an angle in degrees drawn from the list, bilinear, about the centre,
                    corners filled with 0 (as kornia's warp_affine in lucent); positive is
                    counter-clockwise as displayed, the direction of ``torch.rot90(x, 1, (-2, -1))``

A value may appear several times in a list to be drawn more often (``STANDARD``'s rotate has five
extra 0s, as lucent's).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from vizkit.core.errors import ConfigError, did_you_mean

FORMS = "pad:N, jitter:N, scale:F[,F...], rotate:DEGREES[,DEGREES...]"

# lucent's transform.standard_transforms, spelled out: scales 1 + (i - 5) / 50 for i in 0..10, angles
# -10..10 and five more 0s.
STANDARD = [
    "pad:12",
    "jitter:8",
    "scale:0.9,0.92,0.94,0.96,0.98,1,1.02,1.04,1.06,1.08,1.1",
    "rotate:-10,-9,-8,-7,-6,-5,-4,-3,-2,-1,0,1,2,3,4,5,6,7,8,9,10,0,0,0,0,0",
    "jitter:4",
]


def pad(pixels: torch.Tensor, width: int, generator: torch.Generator) -> torch.Tensor:
    return F.pad(pixels, [width] * 4, mode="constant", value=0.5)


def jitter(pixels: torch.Tensor, distance: int, generator: torch.Generator) -> torch.Tensor:
    # lucid's random crop: offsets in [0, N] inclusive, so every pixel can reach the crop. (lucent
    # shifts with kornia's translate instead, keeping the size and filling with black.)
    height, width = pixels.shape[-2:]
    if min(height, width) <= distance:
        raise ConfigError(f"transform 'jitter:{distance}' needs images larger than {distance} px; got {height}x{width}")
    offset_y, offset_x = torch.randint(0, distance + 1, (2,), generator=generator).tolist()
    return pixels[..., offset_y : offset_y + height - distance, offset_x : offset_x + width - distance]


def scale(pixels: torch.Tensor, factors: Sequence[float], generator: torch.Generator) -> torch.Tensor:
    factor = _draw(factors, generator)
    size = [max(1, round(factor * side)) for side in pixels.shape[-2:]]
    if size == list(pixels.shape[-2:]):
        return pixels
    # align_corners=True as lucent. lucent then pads a shrunk image back to its size; we keep the new
    # size as lucid does (the model is convolutional, and the padding would only add gray borders).
    return F.interpolate(pixels, size=size, mode="bilinear", align_corners=True)


def rotate(pixels: torch.Tensor, angles: Sequence[float], generator: torch.Generator) -> torch.Tensor:
    radians = math.radians(_draw(angles, generator))
    cos, sin = math.cos(radians), math.sin(radians)
    height, width = pixels.shape[-2:]
    # affine_grid maps each output position to the input position it samples: the inverse rotation,
    # x_in = cos x - sin y, y_in = sin x + cos y in pixels from the centre (y pointing down), written in
    # coordinates normalized to [-1, 1] per axis, hence the aspect factors.
    theta = torch.tensor(
        [[cos, -sin * height / width, 0.0], [sin * width / height, cos, 0.0]],
        dtype=pixels.dtype,
        device=pixels.device,
    )
    grid = F.affine_grid(theta.expand(pixels.shape[0], 2, 3), list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _draw(values: Sequence[float], generator: torch.Generator) -> float:
    return values[int(torch.randint(len(values), (1,), generator=generator))]


TRANSFORMS: dict[str, Callable] = {"pad": pad, "jitter": jitter, "scale": scale, "rotate": rotate}


class Transforms:
    """The transforms named by `specs` (e.g. ``STANDARD``), applied in order; an empty list is the
    identity. Random draws come from ``self.generator``, a CPU generator seeded with `seed`, so inputs
    on any device see the same draws and ``reset()`` replays them."""

    def __init__(self, specs: Sequence[str], seed: int = 0) -> None:
        if isinstance(specs, str):
            raise ConfigError(f"transforms: give a list of strings, not one string '{specs}'; forms: {FORMS}")
        self.specs = list(specs)
        self.seed = seed
        self.steps = [_parse(spec) for spec in self.specs]
        self.generator = torch.Generator()
        self.reset()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        for transform, argument in self.steps:
            pixels = transform(pixels, argument, self.generator)
        return pixels

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    def __repr__(self) -> str:
        return f"Transforms({self.specs!r}, seed={self.seed})"


def _parse(spec: str):
    if not isinstance(spec, str):
        raise ConfigError(f"transform {spec!r} is not a string; forms: {FORMS}")
    name, colon, values = spec.partition(":")
    name = name.strip()
    if name not in TRANSFORMS:
        raise ConfigError(f"unknown transform '{spec}'{did_you_mean(name, TRANSFORMS)}; forms: {FORMS}")
    if not colon or not values.strip():
        raise ConfigError(f"transform '{spec}' has no value; forms: {FORMS}")
    items = [item.strip() for item in values.split(",")]
    if name in ("pad", "jitter"):
        if len(items) != 1 or not items[0].isdigit() or int(items[0]) < 1:
            raise ConfigError(f"transform '{spec}': {name} takes one whole number of pixels, at least 1, as '{name}:8'")
        return TRANSFORMS[name], int(items[0])
    try:
        numbers = [float(item) for item in items]
    except ValueError:
        raise ConfigError(f"transform '{spec}': {name} takes a comma-separated list of numbers, as "
                          f"'{'scale:0.95,1,1.05' if name == 'scale' else 'rotate:-5,0,5'}'") from None
    if not all(math.isfinite(number) for number in numbers) or (name == "scale" and min(numbers) <= 0):
        raise ConfigError(f"transform '{spec}': {name} values must be finite" + (" and positive" if name == "scale" else ""))
    return TRANSFORMS[name], numbers
