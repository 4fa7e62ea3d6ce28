"""Mask energy: the share of a map's positive attribution that falls on the object.

    E = sum_p relu(A(p)) * M(p) / sum_p relu(A(p))        (E = 0 when A has no positive mass)

A is the map summed over channels (for a ``[B,C,H,W]`` map), M the object mask. This is the
"energy-based pointing game" of Wang et al. 2020 (Score-CAM) with the object mask in place of
the bounding box. Negative attribution (evidence against the class) is not energy and is dropped.
"""
from __future__ import annotations

from vizkit.metrics.base import Metric, MetricInputs, MetricResult
from vizkit.metrics.pointing_game import spatial_maps


class MaskEnergy(Metric):
    name = "mask_energy"
    description = "mask energy: fraction of the map's positive attribution inside the object mask"
    better = "higher"
    needs_masks = True

    def evaluate(self, inputs: MetricInputs) -> MetricResult:
        import torch

        maps, masks = spatial_maps(self.name, inputs)
        positive = maps.clamp(min=0).flatten(1)
        total = positive.sum(1)
        inside = (positive * masks.flatten(1)).sum(1)
        values = inside / total.clamp(min=torch.finfo(total.dtype).tiny)
        return MetricResult(values=values.where(total > 0, 0.0).float())
