"""The gradient of a target's score with respect to the input, and how colour channels are reduced."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vizkit.core.errors import ConfigError

CHANNEL_REDUCTIONS = ("max_abs", "abs_sum", "sum", "none")


def input_gradient(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    """d(sum over the batch of target.score)/dx, shaped like x.

    Only the input's gradient is requested, so autograd skips every weight gradient (pytorch-grad-cam
    and lucent were measured computing them all).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        score = target.score(model, x)
        (gradient,) = torch.autograd.grad(score.sum(), x)
    return gradient


def reduce_channels(attribution: torch.Tensor, reduction: str) -> torch.Tensor:
    """[B,C,H,W] -> [B,1,H,W]: ``max_abs`` (Simonyan et al. 2014: the max of |value| over colour
    channels), ``abs_sum``, ``sum``; ``none`` keeps the channels."""
    if reduction == "max_abs":
        return attribution.abs().amax(1, keepdim=True)
    if reduction == "abs_sum":
        return attribution.abs().sum(1, keepdim=True)
    if reduction == "sum":
        return attribution.sum(1, keepdim=True)
    if reduction == "none":
        return attribution
    raise ConfigError(f"unknown channel reduction '{reduction}'; choose one of: {', '.join(CHANNEL_REDUCTIONS)}")


@dataclass
class ChannelReductionConfig:
    """Config of the gradient methods: how colour channels become one map."""

    reduce: str = "max_abs"  # max_abs (Simonyan et al. 2014), abs_sum, sum, none (keep [B,3,H,W], e.g. the signed RGB guided gradient)

    def __post_init__(self) -> None:
        if self.reduce not in CHANNEL_REDUCTIONS:
            raise ConfigError(f"reduce must be one of {', '.join(CHANNEL_REDUCTIONS)}, got '{self.reduce}'")
