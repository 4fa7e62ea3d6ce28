"""Cascading model randomization (Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim 2018, "Sanity Checks
for Saliency Maps", NeurIPS).

A map that explains the model must change when the model's weights do. On a copy of the model, the
parameterized blocks are re-initialized one at a time from the top (the head) down to the stem, and
after each step the method runs again, explaining the same class as before. Each step's score is the
Spearman rank correlation, per input and over pixels, between the trained model's map A and the
randomized model's map A_k (each summed over channels; with ``absolute`` their absolute values, as
the paper's main figures):

    rho_k = pearson(rank(A), rank(A_k)),   ranks of equal values averaged (so Grad-CAM's many zeros
                                           share one rank instead of an arbitrary order)

The curve is rho_1..rho_K, labelled by block name; the value is its mean. Lower is better: a map that
depends on the learned weights decorrelates as they are destroyed. A constant map carries no order,
and its correlation with anything is taken as 0 (Pearson's is undefined there).

The blocks are the model's top-level children that hold parameters, with each ``nn.Sequential`` child
split into its items (timm's resnet18: fc, layer4.1, layer4.0, ..., layer1.0, bn1, conv1), in reverse
forward order. Re-initialization calls ``reset_parameters()`` on every submodule that has one (PyTorch's
default init; parameters of modules without it keep their trained values). Each block draws from its
own seed, derived from ``seed``, on the CPU: the randomized weights do not depend on ``max_steps``, the
device, or anything that ran before, and the global random state is left as it was.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vizkit.core.errors import ConfigError
from vizkit.metrics.base import Metric, MetricInputs, MetricResult

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class RandomizationConfig:
    seed: int = 0  # seeds every block's re-initialization
    absolute: bool = True  # compare |A| (the paper's main figures) instead of signed maps
    max_steps: int = 0  # 0: randomize every block; N: only the top N (fewer method runs)

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"randomization: seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.absolute, bool):
            raise ConfigError(f"randomization: absolute must be true or false, got {self.absolute!r}")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 0:
            raise ConfigError(f"randomization: max_steps must be a non-negative integer (0: all blocks), got {self.max_steps!r}")


def cascade_blocks(model: "nn.Module") -> list[tuple[str, "nn.Module"]]:
    """The blocks randomization destroys, in cascade order (the head first)."""
    from torch import nn

    blocks = []
    for name, child in model.named_children():
        items = [(f"{name}.{key}", item) for key, item in child.named_children()] if isinstance(child, nn.Sequential) else [(name, child)]
        blocks += [(block_name, block) for block_name, block in items if any(True for _ in block.parameters())]
    return blocks[::-1]


def reinitialize(block: "nn.Module", seed: int) -> None:
    """PyTorch's default init for every submodule of ``block`` that has one, from ``seed``, drawn on the
    CPU (so CPU and GPU runs get the same weights) without touching the global random state."""
    import torch

    device = next(block.parameters()).device
    block.to("cpu")
    with torch.random.fork_rng(devices=[]):  # devices=[]: only the CPU generator is used and restored
        torch.manual_seed(seed)
        for module in block.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    block.to(device)


def average_ranks(values: "torch.Tensor") -> "torch.Tensor":
    """[B,N] -> [B,N] float64: each value's 0-based rank in its row, equal values sharing their mean rank.

    One stable sort; each run of equal sorted values spans positions start..end, found with a running
    max (starts) and a reversed running min (ends), and all its members get (start + end) / 2: exact,
    however many ties (Grad-CAM's zeros).
    """
    import torch

    order = values.argsort(dim=1, stable=True)
    ordered = values.gather(1, order)
    positions = torch.arange(values.shape[1], device=values.device).expand_as(ordered)
    starts_run = torch.ones_like(ordered, dtype=torch.bool)
    starts_run[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends_run = torch.ones_like(starts_run)
    ends_run[:, :-1] = starts_run[:, 1:]
    run_start = torch.where(starts_run, positions, 0).cummax(1).values
    run_end = torch.where(ends_run, positions, values.shape[1] - 1).flip(1).cummin(1).values.flip(1)
    return torch.empty_like(ordered, dtype=torch.float64).scatter_(1, order, (run_start + run_end).double() / 2)


def centered_ranks(values: "torch.Tensor") -> "torch.Tensor":
    ranks = average_ranks(values)
    return ranks - ranks.mean(1, keepdim=True)


def spearman(a: "torch.Tensor", b: "torch.Tensor") -> "torch.Tensor":
    """[B,N], [B,N] -> [B]: Spearman's rho per row (average ranks for ties; 0 where a row is constant)."""
    return ranked_spearman(centered_ranks(a), b)


def ranked_spearman(ranks_a: "torch.Tensor", b: "torch.Tensor") -> "torch.Tensor":
    """``spearman`` with the first argument's centered ranks computed once (the trained map's)."""
    ranks_b = centered_ranks(b)
    norm = (ranks_a.pow(2).sum(1) * ranks_b.pow(2).sum(1)).sqrt()
    covariance = (ranks_a * ranks_b).sum(1)
    return (covariance / norm.clamp(min=1e-300)).where(norm > 0, 0.0)


def comparable(maps: "torch.Tensor", absolute: bool) -> "torch.Tensor":
    """[B,H*W] float64 on the CPU: maps summed over channels, |.| if asked (ranks need exact sums)."""
    import torch

    maps = maps.detach().to("cpu", torch.float64)
    maps = (maps.sum(1) if maps.dim() == 4 else maps).flatten(1)
    return maps.abs() if absolute else maps


def fixed_target(target: Any, model: "nn.Module") -> Any:
    """The target to explain on the randomized ``model``: the trained model's classes (not what the
    randomized model predicts), or the same layer target bound to the copy's module."""
    from vizkit.core.models import find_layer
    from vizkit.core.targets import ClassTarget

    if target.kind == "class":
        return ClassTarget(target.indices)
    return dataclasses.replace(target, module=find_layer(model, target.layer))


class Randomization(Metric):
    name = "randomization"
    description = "cascading randomization: rank correlation of maps as layers are re-initialized top-down (Adebayo et al. 2018)"
    better = "lower"
    Config = RandomizationConfig

    def evaluate(self, inputs: MetricInputs) -> MetricResult:
        import torch

        config = self.config
        if inputs.method is None:
            raise ConfigError("randomization runs the method again on randomized models; pass the method that made the maps (MetricInputs.method)")
        randomized = copy.deepcopy(inputs.model).eval()
        blocks = cascade_blocks(randomized)
        if not blocks:
            raise ConfigError(f"randomization: {type(inputs.model).__name__} has no parameterized blocks to randomize")
        # seeds for every block, so a block's weights do not depend on how many are randomized
        seeds = torch.randint(2**62, (len(blocks),), generator=torch.Generator().manual_seed(config.seed)).tolist()
        if config.max_steps:
            blocks = blocks[: config.max_steps]
        target = fixed_target(inputs.target, randomized)
        trained = centered_ranks(comparable(inputs.maps, config.absolute))  # ranked once, not per step
        correlations = []
        for (_, block), seed in zip(blocks, seeds):
            reinitialize(block, seed)
            with torch.enable_grad():
                maps = inputs.method.attribute(randomized, inputs.x, target, mean=inputs.pixels.mean, std=inputs.pixels.std)
            correlations.append(ranked_spearman(trained, comparable(maps, config.absolute)))
        curve = torch.stack(correlations, 1).float().to(inputs.maps.device)
        return MetricResult(values=curve.mean(1), curve=curve, curve_steps=tuple(name for name, _ in blocks))
