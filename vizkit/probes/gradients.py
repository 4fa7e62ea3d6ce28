"""The gradient of a target's score with respect to the input, and how colour channels are reduced."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from vizkit.core.errors import ConfigError

CHANNEL_REDUCTIONS = ("max_abs", "abs_sum", "sum", "none")


def input_gradient(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    """d(sum over the batch of target.score)/dx, shaped like x.

    Only the input's gradient is requested, so autograd skips every weight gradient (pytorch-grad-cam
    and lucent were measured computing them all).

    A ``vizkit.core.target_sets.TargetSet`` of K targets gives ``[B, K, C, H, W]``: one forward, then
    K vector-Jacobian products of the same graph (``column_gradients``).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        score = target.score(model, x)
        if score.dim() == 2:  # [B, K]: a target set
            (gradient,) = column_gradients(score, [x])
            return gradient.transpose(0, 1)
        (gradient,) = torch.autograd.grad(score.sum(), x)
    return gradient


def column_gradients(scores: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """For ``[B, K]`` scores, each input's gradient of every column's sum, ``[K, *input.shape]`` (None
    where a column does not reach it): K vector-Jacobian products of one graph, batched by autograd
    (``is_grads_batched``, torch's vmap over the backward). An op without a batching rule makes torch
    loop inside the backward, and one that cannot be batched at all (a custom autograd Function
    without vmap support) makes this loop over the columns instead; the results are the same."""
    columns = scores.shape[1]
    if columns == 1:
        return [None if g is None else g.unsqueeze(0) for g in torch.autograd.grad(scores.sum(), inputs, allow_unused=True)]
    cotangents = torch.eye(columns, dtype=scores.dtype, device=scores.device).unsqueeze(1).expand(columns, *scores.shape).contiguous()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*performance drop.*")  # torch's own loop for an op without a batching rule
            return list(torch.autograd.grad(scores, inputs, grad_outputs=cotangents, is_grads_batched=True, allow_unused=True, retain_graph=True))
    except RuntimeError:
        per_column = [torch.autograd.grad(scores[:, k].sum(), inputs, allow_unused=True, retain_graph=True) for k in range(columns)]
        return [None if grads[0] is None else torch.stack(grads) for grads in zip(*per_column)]


def reduce_channels(attribution: torch.Tensor, reduction: str) -> torch.Tensor:
    """[B,C,H,W] -> [B,1,H,W] ([B,K,C,H,W] -> [B,K,1,H,W]): ``max_abs`` (Simonyan et al. 2014: the max of |value| over colour
    channels), ``abs_sum``, ``sum``; ``none`` keeps the channels."""
    if reduction == "max_abs":  # dim -3: also a target set's [B, K, C, H, W]
        return attribution.abs().amax(-3, keepdim=True)
    if reduction == "abs_sum":
        return attribution.abs().sum(-3, keepdim=True)
    if reduction == "sum":
        return attribution.sum(-3, keepdim=True)
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
