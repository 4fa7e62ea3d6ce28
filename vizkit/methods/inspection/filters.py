"""A convolution's learned kernels as pictures (Krizhevsky, Sutskever & Hinton 2012, "ImageNet
Classification with Deep Convolutional Neural Networks", fig. 3: the first layer's 96 kernels).

For a ``Conv2d`` with weights W ``[C_out, C_in, kh, kw]`` (bias ignored):

* a layer that sees the three colour channels (``in_channels == 3``, ungrouped: the first conv)
  gives one grid of its C_out kernels, kernel o drawn as the RGB image W[o] (``[3,kh,kw]``);
* a deeper layer gives one grayscale grid per input channel c (the first ``max_channels``; for a
  grouped or depthwise conv, c counts each filter's own inputs, ``W.shape[1]``): picture o of grid c
  is the slice W[o, c].

Weights become grey levels v in [0, 1] by ``normalize``:

    filter:  v = (w − min W[o]) / (max W[o] − min W[o])   each kernel W[o] (all its input channels
             together, so the grids of one filter share its scale) at full contrast; a constant
             kernel is mid-gray. Shows every kernel's pattern, hides how strong it is.
    layer:   v = 0.5 + w / (2 max|W|)                    one symmetric scale for the whole layer:
             zero weight is mid-gray (128), the largest |w| black or white; strengths compare across
             kernels and channels.

A pixel is round(255 v); each weight is drawn as ``scale`` × ``scale`` pixels (nearest), and the
kernels fill a grid row by row, ⌈√C_out⌉ columns, with white gaps, each kernel's index o in a strip
under it (``render.grid``'s labels). TensorBoard tags
say what is shown and how: ``filters/LAYER/rgb|normalize=filter``, ``filters/LAYER/in_C|normalize=layer``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vizkit.core import pictures as render
from vizkit.core.errors import ConfigError, did_you_mean
from vizkit.methods.base import Inspection, InspectionMethod
from vizkit.core.models import find_layer

NORMALIZATIONS = ("filter", "layer")


@dataclass
class FiltersConfig:
    layer: str = ""  # a Conv2d's name in named_modules(); "": the model's first Conv2d
    scale: int = 8  # each weight drawn as scale x scale pixels (nearest), for viewing
    normalize: str = "filter"  # filter: each kernel min-max to [0, 1] | layer: one symmetric scale, 0.5 = zero weight
    max_channels: int = 16  # a deeper layer: one grid for each of its first max_channels input channels

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}")
        for name in ("scale", "max_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def grey_levels(weight: torch.Tensor, normalize: str) -> torch.Tensor:
    """Weights ``[C_out, C_in, kh, kw]`` as grey levels in [0, 1], by ``normalize`` (module docstring)."""
    weight = weight.float()
    if normalize == "layer":
        return 0.5 + weight / (2 * weight.abs().max().clamp_min(torch.finfo(weight.dtype).tiny))
    flat = weight.flatten(1)
    low = flat.min(1).values.view(-1, 1, 1, 1)
    spread = flat.max(1).values.view(-1, 1, 1, 1) - low
    return torch.where(spread > 0, (weight - low) / spread.clamp_min(torch.finfo(weight.dtype).tiny), torch.full_like(weight, 0.5))


def kernel_grid(images: torch.Tensor, scale: int) -> np.ndarray:
    """Grey levels ``[N, 3, kh, kw]`` as one grid of N pictures, each weight scale x scale pixels,
    each labelled with its index."""
    pictures = [render.to_uint8(image).repeat(scale, axis=0).repeat(scale, axis=1) for image in images]
    return render.grid(pictures, labels=[str(index) for index in range(len(pictures))])


class Filters(InspectionMethod):
    name = "filters"
    description = "a convolution's kernels as pictures: RGB for the first layer, per input channel deeper (Krizhevsky et al. 2012)"
    Config = FiltersConfig

    def check(self, model: nn.Module) -> None:
        self.convolution(model)

    def convolution(self, model: nn.Module) -> tuple[str, nn.Conv2d]:
        """The layer to show, by name: ``layer``, or the first ``Conv2d`` in ``named_modules`` order."""
        name = self.config.layer
        if not name:
            found = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
            if found is None:
                raise ConfigError(f"filters: {type(model).__name__} has no Conv2d layer whose kernels could be shown")
            return found
        module = find_layer(model, name)
        if not isinstance(module, nn.Conv2d):
            convolutions = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
            raise ConfigError(f"filters shows a Conv2d's kernels; layer '{name}' of {type(model).__name__} is a {type(module).__name__}"
                              f"{did_you_mean(name, convolutions)}")
        return name, module

    def finish(self, state, model, space, fetch) -> Inspection:
        layer, conv = self.convolution(model)
        weight = conv.weight.detach().float().cpu()
        grey = grey_levels(weight, self.config.normalize)
        filters, inputs, height, width = weight.shape
        suffix = f"|normalize={self.config.normalize}"
        common = {"layer": layer, "filters": filters, "kernel": [height, width], "normalize": self.config.normalize,
                  "weight_scale": float(weight.abs().max()) if self.config.normalize == "layer" else None}
        if conv.in_channels == 3 and conv.groups == 1:
            shown = {"rgb": grey}
        else:
            shown = {f"in_{c}": grey[:, c : c + 1].expand(-1, 3, -1, -1) for c in range(min(inputs, self.config.max_channels))}
        pictures = {f"{layer}_{part}": kernel_grid(images, self.config.scale) for part, images in shown.items()}
        return Inspection(
            pictures=pictures,
            tags={f"{layer}_{part}": f"{self.name}/{layer}/{part}{suffix}" for part in shown},
            metrics={"filters": filters, "input_channels": inputs, "kernel_height": height, "kernel_width": width,
                     "weight_min": float(weight.min()), "weight_max": float(weight.max()), "weight_std": float(weight.std()),
                     "grids": len(shown)},
            records=[{"picture": f"{layer}_{part}", "input_channel": None if part == "rgb" else int(part[3:]), **common} for part in shown],
        )
