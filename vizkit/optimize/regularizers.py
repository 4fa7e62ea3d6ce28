"""Image priors: penalties added to the loss, and the operations Yosinski et al. apply between steps.

Penalties (per image, on ``x`` in the model's normalized input space, where 0 is the dataset mean):

    l2                  sum x²                                   Simonyan et al. 2014 (λ‖I‖², I mean-subtracted)
    alpha_norm(α)       sum |x|^α                                Mahendran & Vedaldi 2015 (α = 6)
    total_variation(β)  sum ((x[i,j+1]-x[i,j])² + (x[i+1,j]-x[i,j])²)^(β/2)   Mahendran & Vedaldi 2015 (β = 2)

Between steps (Yosinski et al. 2015, "Understanding Neural Networks Through Deep Visualization", on
the pixel parameterization only):

    decay             x ← (1 − θ) x                    (their L2 decay)
    blur every k      x ← Gaussian blur of x, σ
    clip small norm   pixels whose norm over colour channels is in the lowest p % → 0 (the mean colour)
    clip small contribution   pixels whose |x · ∂S/∂x| summed over channels is in the lowest p % → 0
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vizkit.probes.baselines import gaussian_blur
from vizkit.core.errors import ConfigError


def l2(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).pow(2).sum(1)


def alpha_norm(x: torch.Tensor, alpha: float = 6.0) -> torch.Tensor:
    return x.flatten(1).abs().pow(alpha).sum(1)


def total_variation(x: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    squared = dx.pow(2) + dy.pow(2)
    # (·)^(β/2) has an infinite slope at 0 for β < 2: a tiny floor keeps the gradient finite
    return (squared if beta == 2 else (squared + 1e-8).pow(beta / 2)).flatten(1).sum(1)


@dataclass
class YosinskiConfig:
    """Yosinski et al. 2015's regularizers, applied between steps; every one off by default (their
    best settings for ImageNet nets were e.g. decay 0.0001, blur every 4 steps σ 1.0, clip_norm 50,
    clip_contribution 50)."""

    decay: float = 0.0  # θ_decay
    blur_every: int = 0  # 0: never
    blur_sigma: float = 1.0
    clip_norm: float = 0.0  # percentile (0-100) of pixel norms set to the mean colour
    clip_contribution: float = 0.0  # percentile (0-100) of pixel contributions set to the mean colour

    def __post_init__(self) -> None:
        if not 0 <= self.decay < 1:
            raise ConfigError(f"yosinski.decay must be in [0, 1), got {self.decay}")
        if self.blur_every < 0 or self.blur_sigma <= 0:
            raise ConfigError("yosinski.blur_every must be >= 0 and blur_sigma > 0")
        for name in ("clip_norm", "clip_contribution"):
            if not 0 <= getattr(self, name) < 100:
                raise ConfigError(f"yosinski.{name} is a percentile in [0, 100), got {getattr(self, name)}")

    @property
    def active(self) -> bool:
        return bool(self.decay or self.blur_every or self.clip_norm or self.clip_contribution)


def _below_percentile(values: torch.Tensor, percentile: float) -> torch.Tensor:
    """[B,1,H,W] bool: entries below each image's `percentile`-th value."""
    threshold = torch.quantile(values.flatten(1), percentile / 100, dim=1).view(-1, 1, 1, 1)
    return values < threshold


@torch.no_grad()
def yosinski_step(x: torch.Tensor, gradient: torch.Tensor | None, step: int, config: YosinskiConfig) -> None:
    """Apply the between-step regularizers to ``x`` (normalized input space, [B,C,H,W]) in place;
    ``gradient`` is the score's gradient at x (for the contribution clip); ``step`` counts from 1."""
    if config.decay:
        x.mul_(1 - config.decay)
    if config.blur_every and step % config.blur_every == 0:
        radius = max(1, int(round(2 * config.blur_sigma)))
        x.copy_(gaussian_blur(x, kernel_size=2 * radius + 1, sigma=config.blur_sigma))
    if config.clip_norm:
        x.masked_fill_(_below_percentile(x.norm(dim=1, keepdim=True), config.clip_norm), 0.0)
    if config.clip_contribution and gradient is not None:
        contribution = (x * gradient).sum(1, keepdim=True).abs()
        x.masked_fill_(_below_percentile(contribution, config.clip_contribution), 0.0)
