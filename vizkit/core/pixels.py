"""Pixel space: conversion between the model's normalized input and images in [0, 1].

Methods that need pixels (a fill value, an epsilon ball, clamping to valid images) use this. The
normalization comes from, in order: ``mean``/``std`` given by the caller, the model's timm data config
(``model.pretrained_cfg``), or none at all (the input is taken as pixels already, as torchattacks does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from vizkit.core.errors import ConfigError


@dataclass(frozen=True)
class PixelSpace:
    mean: torch.Tensor  # [1,C,1,1]
    std: torch.Tensor  # [1,C,1,1]

    @classmethod
    def identity(cls, channels: int = 3, device: Any = None) -> "PixelSpace":
        return cls(torch.zeros(1, channels, 1, 1, device=device), torch.ones(1, channels, 1, 1, device=device))

    @classmethod
    def from_stats(cls, mean: Sequence[float], std: Sequence[float], device: Any = None) -> "PixelSpace":
        as_tensor = lambda v: torch.as_tensor(v, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        mean, std = as_tensor(mean), as_tensor(std)
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ConfigError(f"the normalization must have finite means and positive standard deviations, got mean={mean.flatten().tolist()}, "
                              f"std={std.flatten().tolist()} (a std of 0 divides by zero: every map would be NaN)")
        return cls(mean, std)

    def is_identity(self) -> bool:
        """No normalization: the model takes pixels in [0, 1] (or nothing is known of its input)."""
        return bool((self.mean == 0).all() and (self.std == 1).all())

    @classmethod
    def for_model(cls, model: torch.nn.Module, mean: Any = None, std: Any = None, device: Any = None) -> "PixelSpace":
        if (mean is None) != (std is None):
            raise ConfigError("give both mean and std (how the input was normalized from pixels in [0, 1]), or neither")
        if mean is None and std is None:
            data_cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
            mean, std = data_cfg.get("mean"), data_cfg.get("std")
        if mean is None or std is None:
            return cls.identity(device=device)
        return cls.from_stats(mean, std, device=device)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x) + self.mean.to(x)

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean.to(pixels)) / self.std.to(pixels)

    def fill(self, value: float | Sequence[float], like: torch.Tensor) -> torch.Tensor:
        """A pixel-space constant (per channel or for all) in the model's input space, shaped [1,C,1,1]."""
        value = torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(1, -1, 1, 1)
        return self.from_pixels(value.expand(1, like.shape[1], 1, 1))
