"""The pointing game (Zhang, Lin, Brandt, Shen & Sclaroff 2016, "Top-down Neural Attention by Excitation
Backprop", ECCV).

A map "points" at its maximum (summed over channels for a ``[B,C,H,W]`` map; of equal maxima, the
first in row-major order). The point is a hit when it lies within ``tolerance`` pixels of the object:

    hit = 1  if  min over mask pixels q of ||p* - q||_2 <= tolerance,  else 0,   p* = argmax_p A(p)

which is the mask dilated by a disk of radius ``tolerance`` (the paper's 15 pixels is the default;
``tolerance=0`` asks for the point to lie on the mask itself). The mean over inputs is the accuracy
the paper reports. Distances are squared integers, so the disk's boundary is exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vizkit.core.errors import ConfigError
from vizkit.metrics.base import Metric, MetricInputs, MetricResult

if TYPE_CHECKING:
    import torch


@dataclass
class PointingGameConfig:
    tolerance: int = 15  # pixels between the map's maximum and the object that still count as a hit

    def __post_init__(self) -> None:
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, int) or self.tolerance < 0:
            raise ConfigError(f"pointing_game: tolerance must be a non-negative integer (pixels), got {self.tolerance!r}")


def spatial_maps(name: str, inputs: MetricInputs) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(maps summed over channels [B,H,W] float, masks [B,H,W] bool), checked against each other."""
    masks = inputs.masks
    if masks is None:
        raise ConfigError(f"{name} compares maps with object masks, and these inputs have none; use data=shapes (it has exact masks)")
    maps = inputs.maps.detach()
    maps = maps.sum(1) if maps.dim() == 4 else maps
    masks = masks.squeeze(1) if masks.dim() == 4 and masks.shape[1] == 1 else masks
    if maps.dim() != 3 or masks.shape != maps.shape:
        raise ConfigError(
            f"{name}: maps {tuple(inputs.maps.shape)} and masks {tuple(inputs.masks.shape)} do not match; "
            f"it needs [B,C,H,W] maps and [B,1,H,W] masks of the same B, H and W"
        )
    return maps.float(), masks.bool()


def maximum_points(maps: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """(rows, columns) [B] of each map's first maximum in row-major order."""
    width = maps.shape[-1]
    flat = maps.flatten(1).argmax(1)  # torch documents argmax as returning the first maximal index
    return flat // width, flat % width


class PointingGame(Metric):
    name = "pointing_game"
    description = "pointing game: 1 if the map's maximum lies within `tolerance` pixels of the object (Zhang et al. 2016)"
    better = "higher"
    needs_masks = True
    Config = PointingGameConfig

    def evaluate(self, inputs: MetricInputs) -> MetricResult:
        import torch

        maps, masks = spatial_maps(self.name, inputs)
        rows, columns = maximum_points(maps)
        height, width = maps.shape[-2:]
        ys = torch.arange(height, device=maps.device).view(1, -1, 1)
        xs = torch.arange(width, device=maps.device).view(1, 1, -1)
        squared = (ys - rows.view(-1, 1, 1)) ** 2 + (xs - columns.view(-1, 1, 1)) ** 2  # [B,H,W]
        near = squared <= self.config.tolerance**2
        return MetricResult(values=(near & masks).flatten(1).any(1).float())
