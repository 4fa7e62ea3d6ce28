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

from vizkit.errors import ConfigError
from vizkit.methods.base import AttributionMethod

SCORES = ("probability", "logit")


@dataclass
class OcclusionConfig:
    window: int = 16  # side of the square patch, in input pixels
    stride: int = 8  # step between patch positions
    fill: float = 0.5  # the patch's pixel value in [0, 1] (0.5: mid-gray), converted to the model's normalization
    batch_size: int = 32  # perturbed images per forward pass
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
        windows = self._window_masks(height, width, x.device)  # [N,1,H,W] bool
        fill = pixels.fill(config.fill, x)  # [1,C,1,1]
        with torch.no_grad():
            clean_score = self._score(model, x, target)
            drops = torch.empty(batch, windows.shape[0], device=x.device, dtype=clean_score.dtype)
            pairs = [(b, w) for b in range(batch) for w in range(windows.shape[0])]
            for start in range(0, len(pairs), config.batch_size):
                chunk = torch.tensor(pairs[start : start + config.batch_size], device=x.device)
                images, masks = chunk[:, 0], windows[chunk[:, 1]]
                perturbed = torch.where(masks, fill, x[images])
                sub_target = type(target)(target.indices.to(x.device)[images])
                drops[images, chunk[:, 1]] = clean_score[images] - self._score(model, perturbed, sub_target)
        masks = windows.flatten(1).to(drops.dtype)  # [N, H*W]
        coverage = masks.sum(0)  # every pixel is covered at least once
        attribution = (drops @ masks) / coverage
        return attribution.view(batch, 1, height, width)

    def _window_masks(self, height: int, width: int, device) -> torch.Tensor:
        window, stride = self.config.window, self.config.stride
        ys, xs = window_starts(height, window, stride), window_starts(width, window, stride)
        masks = torch.zeros(len(ys) * len(xs), 1, height, width, dtype=torch.bool, device=device)
        for i, (y, x) in enumerate((y, x) for y in ys for x in xs):
            masks[i, :, y : y + min(window, height), x : x + min(window, width)] = True
        return masks

    def _score(self, model, x, target) -> torch.Tensor:
        logits = target.logits(model, x)
        if self.config.score == "probability":
            return target.select(logits.softmax(1))
        return target.select(logits)
