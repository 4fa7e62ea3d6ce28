"""Occlusion (Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks", sec. 4.2).

Slide a square patch of a constant pixel value over the image; for every position, record how much
the target's probability drops. Each pixel's attribution is the mean drop over the windows that cover
it, so the map has the input's resolution:

    A(p) = mean over windows w containing p of [ P_c(x) - P_c(x with w filled) ]

Windows start at 0, stride, 2*stride, ...; when that grid does not reach the last row or column a final
window flush with the edge is added, so every pixel is covered. Where the grid fits exactly this equals
captum's ``Occlusion`` with ``sliding_window_shapes=(C, window, window)``, ``strides=(C, stride,
stride)`` and the fill as baseline, applied to the softmax output (captum leaves uncovered pixels 0/0).
Perturbed images are evaluated ``batch_size`` at a time; the clean image is evaluated once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vizkit.core.errors import ConfigError
from vizkit.methods.base import AttributionMethod

SCORES = ("probability", "logit")


@dataclass
class OcclusionConfig:
    window: int = 16  # side of the square patch, in input pixels
    stride: int = 8  # step between patch positions
    fill: float = 0.5  # the patch's pixel value in [0, 1] (0.5: mid-gray), converted to the model's normalization
    batch_size: int = 8  # perturbed images per forward pass (on CPU, 4-8 measured fastest; raise it on a GPU)
    score: str = "probability"  # drop of the target's softmax probability (the paper) or of its logit

    def __post_init__(self) -> None:
        for field_name in ("window", "stride", "batch_size"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"occlusion: {field_name} must be a positive integer, got {value!r}")
        if self.stride > self.window:
            raise ConfigError(f"occlusion: a stride ({self.stride}) larger than the window ({self.window}) leaves pixels no patch covers; use stride <= window")
        if not 0.0 <= self.fill <= 1.0:
            raise ConfigError(f"occlusion: fill is a pixel value in [0, 1], got {self.fill}")
        if self.score not in SCORES:
            raise ConfigError(f"occlusion: score must be one of {', '.join(SCORES)}, got '{self.score}'")


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis; the last window ends exactly at the edge."""
    window = min(window, length)
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


class Occlusion(AttributionMethod):
    name = "occlusion"
    description = "occlusion: drop of the target's probability under a sliding gray patch (Zeiler & Fergus 2014)"
    Config = OcclusionConfig

    def compute(self, model, x, target, pixels):
        config = self.config
        batch, _, height, width = x.shape
        if config.window > min(height, width):  # refused as captum does: the map would be constant along that side
            raise ConfigError(f"occlusion: the window ({config.window} px) is larger than the input ({height}x{width}): it would cover "
                              f"a whole side at every position and the map would not vary along it; use window <= {min(height, width)}")
        boxes = self._windows(height, width)  # (y0, y1, x0, x1) per window
        fill = pixels.fill(config.fill, x)  # [1,C,1,1]
        with torch.no_grad():
            clean_score = self._score(model, x, target)
            drops = torch.empty(batch, len(boxes), device=x.device, dtype=clean_score.dtype)
            pairs = [(b, w) for b in range(batch) for w in range(len(boxes))]
            for start in range(0, len(pairs), config.batch_size):
                chunk = pairs[start : start + config.batch_size]
                images = torch.tensor([b for b, _ in chunk], device=x.device)
                perturbed = x[images]  # indexing copies: x itself is never written
                for row, (_, w) in enumerate(chunk):
                    y0, y1, x0, x1 = boxes[w]
                    perturbed[row, :, y0:y1, x0:x1] = fill[0]
                windows = torch.tensor([w for _, w in chunk], device=x.device)
                drops[images, windows] = clean_score[images] - self._score(model, perturbed, target.take(images))
        masks = torch.zeros(len(boxes), height, width, dtype=drops.dtype, device=x.device)
        for w, (y0, y1, x0, x1) in enumerate(boxes):
            masks[w, y0:y1, x0:x1] = 1
        masks = masks.flatten(1)  # [N, H*W]
        attribution = (drops @ masks) / masks.sum(0)  # mean drop over the windows covering each pixel
        return attribution.view(batch, 1, height, width)

    def _windows(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        window, stride = self.config.window, self.config.stride
        wy, wx = min(window, height), min(window, width)
        return [(y, y + wy, x, x + wx) for y in window_starts(height, window, stride) for x in window_starts(width, window, stride)]

    def _score(self, model, x, target) -> torch.Tensor:
        logits = target.logits(model, x)
        if self.config.score == "probability":
            return target.select(logits.softmax(1))
        return target.select(logits)
