"""Checks of what a caller hands the Python API, each refused with a ``ConfigError`` that says what
was wrong and what would be right: a batch's type, shape, dtype, device and values; pixel images in
[0, 1]; a model input that cannot be pixels when no normalization is known.

A NaN or infinite input is refused rather than explained: gradient methods return a finite,
plausible-looking map for it (measured: saliency on an image with one NaN pixel).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

from vizkit.core.errors import ConfigError


def model_weight(model: torch.nn.Module) -> torch.Tensor | None:
    return next((p for p in model.parameters() if p.is_floating_point()), None)


def check_batch(owner: str, model: torch.nn.Module, x: Any, what: str = "input batch") -> None:
    """``x`` is a finite floating [B,C,H,W] tensor with B >= 1, on the model's device, in its dtype."""
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"{owner}: the {what} must be a torch.Tensor [B,C,H,W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ConfigError(f"{owner}: expected an {what} [B,C,H,W], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ConfigError(f"{owner}: the {what} is empty (batch size 0)")
    if not x.is_floating_point():
        raise ConfigError(f"{owner}: the {what} is {x.dtype}; give floats normalized as the model expects "
                          f"(from 8-bit images: x.float() / 255, then the model's mean and std)")
    weight = model_weight(model)
    if weight is not None:
        if x.device != weight.device:
            raise ConfigError(f"{owner}: the {what} is on {x.device} and the model on {weight.device}: use x.to('{weight.device}')")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ConfigError(f"{owner}: the {what} is {x.dtype} and the model's weights are {weight.dtype}: "
                              f"use x.to({weight.dtype}) (or convert the model)")
    check_finite(owner, x, what)


def check_finite(owner: str, x: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(x.detach())
    if bad.any():
        rows = sorted({int(r) for r in bad.flatten(1).any(1).nonzero().flatten().tolist()})
        raise ConfigError(f"{owner}: the {what} holds {int(bad.sum())} NaN or infinite value(s), in input(s) {rows[:8]}"
                          f"{' ...' if len(rows) > 8 else ''}; a map or attack of such an input would mean nothing")


def check_pixels(owner: str, images: torch.Tensor, what: str = "images") -> None:
    """Pixels in [0, 1] (what the optimizations and inspections take), finite."""
    check_finite(owner, images, what)
    low, high = float(images.min()), float(images.max())
    if low < 0 or high > 1:
        hint = " (8-bit values? divide by 255)" if high > 1.5 else ""
        raise ConfigError(f"{owner}: {what} are pixels in [0, 1]; these range from {low:.4g} to {high:.4g}{hint}")


# float32 pixels that went through a normalization and back land a few ulps outside [0, 1]
PIXEL_SLACK = 1e-4


def is_pixel_range(x: torch.Tensor) -> bool:
    return float(x.min()) >= -PIXEL_SLACK and float(x.max()) <= 1 + PIXEL_SLACK


def refuse_unnormalized(owner: str, space: Any, x: torch.Tensor) -> None:
    """With no normalization known (a plain ``nn.Module``, no ``mean``/``std``) ``x`` is taken as
    pixels in [0, 1], as torchattacks does; an ``x`` outside that range was normalized by the
    caller, and clamping it to [0, 1] would give a silently wrong answer."""
    if space.is_identity() and not is_pixel_range(x):
        raise ConfigError(f"{owner}: the model has no data config and no mean/std was given, so x is taken as pixels in [0, 1], "
                          f"but it ranges from {float(x.min()):.3g} to {float(x.max()):.3g}: pass mean=... and std=... "
                          f"(how x was normalized), or pixels")


_warned: set[str] = set()


def warn_unnormalized(owner: str, space: Any, x: torch.Tensor) -> None:
    """The attribution methods' gentler form: only pixel-space parts (a fill colour, a baseline)
    depend on the normalization, so this warns once per method instead of refusing."""
    if owner not in _warned and space.is_identity() and not is_pixel_range(x):
        _warned.add(owner)
        warnings.warn(f"{owner}: the model has no data config and no mean/std was given, so pixel-space values (fill colours, "
                      f"baselines) are taken as x's own units, but x ranges from {float(x.min()):.3g} to {float(x.max()):.3g}: "
                      f"pass mean=... and std=... if x was normalized", stacklevel=3)


def whole_number(name: str, value: Any, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high], from YAML or the command line (``1e23`` and ``abc`` refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)
        elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        else:
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}" if high is not None else f"{name} must be at least {low}, got {value}")
    return value


def positive_integers(config: Any, *names: str) -> None:
    """Refuse a config whose fields ``names`` are not positive integers (a bool is not one)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
