"""The Gini index of an attribution map: how concentrated its magnitude is (Chalasani, Chen,
Chowdhury, Wu & Jha 2020, "Concise Explanations of Neural Networks using Adversarial Training",
ICML; the index as Hurley & Rickard 2009, "Comparing Measures of Sparsity", define it).

Take the magnitudes of all N values of one input's map, c = |A| (every channel, row and column of a
``[C,H,W]`` map), and sort them in ascending order, c_(1) <= ... <= c_(N):

    G = 1 - 2 * sum_k  (c_(k) / ||c||_1) * (N - k + 1/2) / N
      = sum_k (2k - N - 1) * c_(k) / (N * sum_k c_(k))                    (the same, one pass)

G = 0 when every value has the same magnitude, and G = (N - 1) / N (close to 1) when one value holds
all of it. G does not change when the map is scaled by a positive number, its values are permuted or
their signs flipped, so maps of different methods compare directly: a higher G is a sparser, more
concise explanation. A map that is zero everywhere has no magnitude to distribute: G = 0.

The sum runs in float64: with N = H * W values (16384 at 128 px) float32 would lose the small terms.
torch is imported when the metric computes, not when vizkit discovers the plugin, so ``vizkit --help``
stays quick.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from vizkit.metrics.base import Metric, MetricInputs, MetricResult

if TYPE_CHECKING:
    import torch


def gini_index(values: "torch.Tensor") -> "torch.Tensor":
    """[B, ...] -> [B] float64: the Gini index of each row's magnitudes (all dims after the first)."""
    import torch

    magnitudes = values.detach().flatten(1).abs().double().sort(dim=1).values  # ascending: c_(1) first
    count = magnitudes.shape[1]
    rank = torch.arange(1, count + 1, dtype=torch.float64, device=magnitudes.device)  # k
    total = magnitudes.sum(1)
    weighted = (magnitudes * (2 * rank - count - 1)).sum(1)
    index = weighted / (count * total.clamp(min=torch.finfo(torch.float64).tiny))
    return index.where(total > 0, 0.0)


class Gini(Metric):
    name = "gini"
    description = "Gini index of the map's magnitudes: 0 spread evenly, near 1 on one pixel (sparsity, Chalasani et al. 2020)"
    better = "higher"

    def evaluate(self, inputs: MetricInputs) -> MetricResult:
        return MetricResult(values=gini_index(inputs.maps).float())
