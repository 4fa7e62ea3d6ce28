"""Average drop and increase in confidence (Chattopadhay, Sarkar, Howlader & Balasubramanian 2018,
"Grad-CAM++: Generalized Gradient-based Visual Explanations for Deep Convolutional Networks", WACV,
sec. 5.1).

The map A (summed over channels) is min-max normalized per input to E = (A - min A) / (max A - min A)
in [0, 1]; a constant map, which ranks no pixel above another, is E = 1 (the image kept whole). The
explanation image is the image multiplied by E pixel by pixel, and the target class's softmax
probability is read on the image (Y) and on the explanation image (O):

    average_drop            max(0, Y - O) / Y     lower is better  (0 where Y underflows to 0)
    increase_in_confidence  1 if O > Y else 0     higher is better

per input, as fractions: the paper's "Average Drop %" and "% Increase in Confidence" are 100 times
their means over a data set. A map that is 1 everywhere gives O = Y, so a drop of 0 and no increase:
the metric rewards maps that keep much of the image, and is best read beside deletion or ROAD.

Where the image is multiplied, ``space``:

* ``pixels`` (the default; the paper's E * I, whose figures show removed regions black): x' is
  ``from_pixels(E * to_pixels(x))``, except that x' = x exactly where E = 1 (no round trip through
  pixels, so a constant map gives O = Y bit for bit).
* ``input``: x' = E * x on the model's normalized input, as both peers do; removed regions become the
  normalization's mean colour, not black.

They agree for a model without normalization; in pixel space the value is what the peers compute
on a model that normalizes internally and is fed pixels (tested). The peers, in input space:

* torchcam's ``ClassificationMetric``: drop relu(Y - O) / (Y + 1e-7) (ours differs by a relative
  1e-7 / Y), increase Y < O as here. Its extractors normalize CAMs as (A - min) / (max - min + 1e-8)
  at the CAM's resolution before a bilinear resize; we normalize the maps we are given, exactly.
* pytorch-grad-cam's ``DropInConfidence`` is max(0, Y - O), not divided by Y: Y * average_drop.
  Its ``IncreaseInConfidence`` tests O - Y > 0, which is O > Y in IEEE arithmetic.

Both metrics share ``confidences``: one forward of the clean batch and one of the explanation images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from vizkit.core.errors import ConfigError
from vizkit.metrics.base import Metric, MetricInputs, MetricResult
from vizkit.metrics.perturbation import check_inputs

if TYPE_CHECKING:
    import torch

SPACES = ("pixels", "input")


@dataclass
class ConfidenceConfig:
    metric: ClassVar[str] = "confidence"  # the metric's name, for error messages
    space: str = "pixels"  # where the image is multiplied by the map: pixels (the paper) | input (the peers)

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ConfigError(f"{self.metric}: space must be pixels (multiply the image, as the paper) or input "
                              f"(multiply the model's normalized input, as torchcam), got {self.space!r}")


@dataclass
class AverageDropConfig(ConfidenceConfig):
    metric: ClassVar[str] = "average_drop"


@dataclass
class IncreaseInConfidenceConfig(ConfidenceConfig):
    metric: ClassVar[str] = "increase_in_confidence"


def unit_maps(maps: "torch.Tensor") -> "torch.Tensor":
    """[B,1,H,W]: each map summed over channels and min-max normalized to [0, 1]; a constant map is 1."""
    import torch

    saliency = maps.sum(1, keepdim=True) if maps.dim() == 4 else maps.unsqueeze(1)
    if saliency.dtype not in (torch.float32, torch.float64):
        saliency = saliency.float()
    low = saliency.amin((2, 3), keepdim=True)
    span = saliency.amax((2, 3), keepdim=True) - low
    return torch.where(span > 0, (saliency - low) / torch.where(span > 0, span, 1), 1)


def explanation_images(inputs: MetricInputs, space: str) -> "torch.Tensor":
    """The model's input for the image multiplied by its normalized map (see the module docstring)."""
    import torch

    x = inputs.x.detach()
    weights = unit_maps(inputs.maps.detach()).to(x.dtype)
    if space == "input":
        return x * weights
    dimmed = inputs.pixels.from_pixels(inputs.pixels.to_pixels(x) * weights).to(x.dtype)
    return torch.where(weights == 1, x, dimmed)


def confidences(inputs: MetricInputs, space: str) -> tuple["torch.Tensor", "torch.Tensor"]:
    """[B], [B]: the target class's probability on the image (Y) and on its explanation image (O)."""
    import torch

    x = inputs.x.detach()
    explained = explanation_images(inputs, space)
    with torch.no_grad():
        clean = inputs.target.select(inputs.target.logits(inputs.model, x).float().softmax(1))
        masked = inputs.target.select(inputs.target.logits(inputs.model, explained).float().softmax(1))
    return clean, masked


class AverageDrop(Metric):
    name = "average_drop"
    description = "average drop: relative fall of the class probability on the image times its map, max(0, Y-O)/Y (Chattopadhay et al. 2018)"
    better = "lower"
    needs_class = True
    Config = AverageDropConfig

    def evaluate(self, inputs: MetricInputs) -> MetricResult:
        import torch

        check_inputs(self.name, inputs)
        clean, masked = confidences(inputs, self.config.space)
        drop = (clean - masked).clamp(min=0) / torch.where(clean > 0, clean, 1)
        return MetricResult(values=torch.where(clean > 0, drop, 0))


class IncreaseInConfidence(Metric):
    name = "increase_in_confidence"
    description = "increase in confidence: 1 if the class probability rises on the image times its map (Chattopadhay et al. 2018)"
    better = "higher"
    needs_class = True
    Config = IncreaseInConfidenceConfig

    def evaluate(self, inputs: MetricInputs) -> MetricResult:
        check_inputs(self.name, inputs)
        clean, masked = confidences(inputs, self.config.space)
        return MetricResult(values=(masked > clean).float())
