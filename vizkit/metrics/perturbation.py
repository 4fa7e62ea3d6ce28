"""Deletion and insertion (Petsiuk, Das & Saenko 2018, "RISE: Randomized Input Sampling for Explanation
of Black-box Models", sec. 4.1).

Rank the N pixels by the map (summed over channels for a ``[B,C,H,W]`` map), most important first;
equal values keep their row-major order (a stable sort). At step k = 0..K (K = ``steps``) the first
n_k = floor(k N / K) pixels of that order are switched:

    deletion:   x_k = x with its first n_k pixels replaced by the substrate   (x_0 = x, x_K = substrate)
    insertion:  x_k = the substrate with the first n_k pixels of x put back   (x_0 = substrate, x_K = x)

The curve is the target class's softmax probability p_c(x_k) at the fractions k/K, and the value is
its area by the trapezoid rule over [0, 1]:

    AUC = (1/K) * sum_{k=1..K} (p_c(x_{k-1}) + p_c(x_k)) / 2

A good map makes the probability fall fast under deletion (low AUC) and rise fast under insertion
(high AUC). Substrates are pixel images in [0, 1], converted to the model's normalization:
``black`` (0), ``gray`` (0.5) or ``blur`` (a Gaussian blur of the image, 11 taps, sigma 5, the kernel of
the RISE authors' code; borders are reflected where the authors' code zero-padded the normalized
input). The paper's choices are the defaults: black for deletion, blur for insertion.

The curve's images run as plain batched forwards, not through occlusion's incremental engine
(``vizkit.probes.incremental``): the switched pixels are spread over the image, so their bounding box
covers a median 66 % of it for Grad-CAM maps and 98 % for saliency maps, and every batch turns dense at
the first convolution. Measured exact and 0.65-0.80x the speed of plain forwards that way
(``benchmarks/incremental_metrics.py``); ROAD's removals, by the same ranking, are larger still.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from vizkit.core.errors import ConfigError
from vizkit.metrics.base import Metric, MetricInputs, MetricResult, positive_int

if TYPE_CHECKING:
    import torch

SUBSTRATES = ("black", "gray", "blur")


@dataclass
class PerturbationConfig:
    metric: ClassVar[str] = "perturbation"  # the metric's name, for error messages
    steps: int = 32  # K: the curve has K+1 points, at pixel fractions 0, 1/K, ..., 1
    substrate: str = "black"  # what removed pixels become: black | gray | blur
    batch_size: int = 16  # perturbed images per forward pass

    def __post_init__(self) -> None:
        positive_int(self.metric, "steps", self.steps)
        positive_int(self.metric, "batch_size", self.batch_size)
        if self.substrate not in SUBSTRATES:
            raise ConfigError(f"{self.metric}: substrate must be one of {', '.join(SUBSTRATES)}, got {self.substrate!r}")


@dataclass
class DeletionConfig(PerturbationConfig):
    metric: ClassVar[str] = "deletion"


@dataclass
class InsertionConfig(PerturbationConfig):
    metric: ClassVar[str] = "insertion"
    substrate: str = "blur"  # the paper's insertion starts from a blurred image


def substrate_pixels(pixels: "torch.Tensor", kind: str) -> "torch.Tensor":
    """The substrate for images ``pixels`` ([B,C,H,W] in [0, 1]), in pixels."""
    from vizkit.probes.baselines import pixel_baseline

    if kind not in SUBSTRATES:
        raise ConfigError(f"unknown substrate {kind!r}; use one of {', '.join(SUBSTRATES)}")
    return pixel_baseline(kind, pixels)


def importance_ranks(maps: "torch.Tensor") -> "torch.Tensor":
    """[B,H*W] long: each pixel's position in its map's order, most important first (0), ties in
    row-major order."""
    import torch

    saliency = maps.sum(1).flatten(1) if maps.dim() == 4 else maps.flatten(1)
    order = torch.sort(saliency, dim=1, descending=True, stable=True).indices
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def switch_counts(pixel_count: int, steps: int) -> list[int]:
    """n_k = floor(k N / K) for k = 0..K: equal steps, exactly 0 at the start and N at the end."""
    return [k * pixel_count // steps for k in range(steps + 1)]


def perturbation_curve(
    model: "torch.nn.Module",
    start: "torch.Tensor",
    finish: "torch.Tensor",
    maps: "torch.Tensor",
    target,
    steps: int,
    batch_size: int,
) -> "torch.Tensor":
    """[B, steps+1]: the target class's probability as the most important pixels move from ``start``
    to ``finish`` (both [B,C,H,W], the model's input), ``floor(k N / steps)`` pixels at step k.

    Deletion is ``start=x, finish=substrate``; insertion is ``start=substrate, finish=x``.
    """
    import torch

    batch, _, height, width = start.shape
    ranks = importance_ranks(maps).view(batch, 1, height, width)
    counts = torch.tensor(switch_counts(height * width, steps), device=start.device)
    pairs = [(b, k) for b in range(batch) for k in range(steps + 1)]
    curve = torch.empty(batch, steps + 1, device=start.device, dtype=torch.float32)
    with torch.no_grad():
        for first in range(0, len(pairs), batch_size):
            chunk = pairs[first : first + batch_size]
            rows = torch.tensor([b for b, _ in chunk], device=start.device)
            ks = torch.tensor([k for _, k in chunk], device=start.device)
            switched = ranks[rows] < counts[ks].view(-1, 1, 1, 1)  # [n,1,H,W], broadcast over channels
            images = torch.where(switched, finish[rows], start[rows])
            chunk_target = target.take(rows)
            probabilities = chunk_target.logits(model, images).float().softmax(1)
            curve[rows, ks] = chunk_target.select(probabilities)
    return curve


def trapezoid_auc(curve: "torch.Tensor") -> "torch.Tensor":
    """[B]: the area under curves sampled at K+1 equally spaced points of [0, 1]."""
    import torch

    return torch.trapezoid(curve, dx=1.0 / (curve.shape[1] - 1), dim=1)


def check_inputs(name: str, inputs: MetricInputs) -> None:
    """A class target and maps with the input's spatial size."""
    if getattr(inputs.target, "kind", None) != "class":
        raise ConfigError(f"{name} reads a class's probability; it cannot score a {inputs.target} target (use target=predicted or class:...)")
    if inputs.maps.dim() != 4 or inputs.maps.shape[0] != inputs.x.shape[0] or inputs.maps.shape[-2:] != inputs.x.shape[-2:]:
        raise ConfigError(
            f"{name}: maps of shape {tuple(inputs.maps.shape)} do not fit the input {tuple(inputs.x.shape)}; "
            f"it needs one [C,H,W] map per input at the input's height and width"
        )


class _PerturbationMetric(Metric):
    """Deletion and insertion: the same curve, run in opposite directions."""

    needs_class = True
    deletes: ClassVar[bool]

    def evaluate(self, inputs: MetricInputs) -> MetricResult:
        check_inputs(self.name, inputs)
        config = self.config
        x = inputs.x.detach()
        substrate = inputs.pixels.from_pixels(substrate_pixels(inputs.pixels.to_pixels(x), config.substrate)).to(x.dtype)
        start, finish = (x, substrate) if self.deletes else (substrate, x)
        curve = perturbation_curve(inputs.model, start, finish, inputs.maps.detach(), inputs.target, config.steps, config.batch_size)
        fractions = tuple(k / config.steps for k in range(config.steps + 1))
        return MetricResult(values=trapezoid_auc(curve), curve=curve, curve_steps=fractions)


class Deletion(_PerturbationMetric):
    name = "deletion"
    description = "deletion AUC: class probability as the most important pixels are removed (Petsiuk et al. 2018)"
    better = "lower"
    Config = DeletionConfig
    deletes = True


class Insertion(_PerturbationMetric):
    name = "insertion"
    description = "insertion AUC: class probability as the most important pixels are revealed (Petsiuk et al. 2018)"
    better = "higher"
    Config = InsertionConfig
    deletes = False

