"""RISE (Petsiuk, Das & Saenko 2018, "RISE: Randomized Input Sampling for Explanation of Black-box
Models", BMVC, sec. 3).

Show the model the image through N random masks and weight each mask by the target's softmax
probability on the masked image. Pixels whose presence keeps the probability high collect weight:

    S(p) = 1 / (N * keep) * sum_i  P_c(I ⊙ M_i) * M_i(p)                       shapes:  S [B,1,H,W]

``I`` is the image in pixel space ([0, 1]), ``M_i`` [H,W] a mask with values in [0, 1] and ``P_c`` the
softmax probability of the target class. Since E[M_i(p)] = keep, a model whose probability is a
constant c gets S = c everywhere (in expectation), and an unmasked image (keep = 1) gets S = P_c(I).

Masks (the paper's generator): a binary ``cells x cells`` grid whose cells are kept (1) with
probability ``keep``; upsampled bilinearly to ``(cells + 1) * ceil(H / cells)`` rows by
``(cells + 1) * ceil(W / cells)`` columns (PyTorch's ``align_corners=False``, borders clamped), then
an ``H x W`` window is cropped at a random offset in ``[0, ceil(H / cells)) x [0, ceil(W / cells))``,
so the cell edges fall at random positions.

Masking: a masked pixel is blended towards ``fill`` in pixel space, ``I ⊙ M + fill * (1 - M)``; the
default ``fill = 0`` is the paper's ``I ⊙ M`` (masked pixels are black). Because the model's
normalization is affine per channel, this is done directly in the model's input space:
``x ⊙ M + from_pixels(fill) * (1 - M)``.

Randomness: one mask set per call, drawn from a local ``torch.Generator`` on the input's device
seeded with ``seed`` (the global RNG is untouched), and shared by every image of the batch. The grids
and offsets (N * cells² + 2N numbers) are drawn first; the H x W masks are built ``batch_size`` masked
images at a time, so memory does not grow with N and the result does not depend on ``batch_size`` or
on how images are batched. CPU and CUDA generators give different mask sets for the same seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vizkit.core.errors import ConfigError
from vizkit.methods.base import AttributionMethod
from vizkit.core.targets import ClassTarget


@dataclass
class RiseConfig:
    masks: int = 1000  # number of random masks N
    cells: int = 7  # the mask grid is cells x cells before upsampling (the paper's s)
    keep: float = 0.5  # probability that a grid cell is kept, i.e. shows the image (the paper's p)
    batch_size: int = 32  # masked images per forward pass
    seed: int = 0  # seed of the mask generator: the same seed gives the same masks
    fill: float = 0.0  # pixel value in [0, 1] of masked pixels; 0 (black) is the paper's I ⊙ M

    def __post_init__(self) -> None:
        for field_name in ("masks", "cells", "batch_size"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"rise: {field_name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"rise: seed must be an integer, got {self.seed!r}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"rise: keep is the probability that a cell is kept, in (0, 1], got {self.keep!r}")
        if isinstance(self.fill, bool) or not isinstance(self.fill, (int, float)) or not 0.0 <= self.fill <= 1.0:
            raise ConfigError(f"rise: fill is a pixel value in [0, 1], got {self.fill!r}")


class Rise(AttributionMethod):
    name = "rise"
    description = "RISE: probability-weighted sum of random masks (Petsiuk, Das & Saenko 2018)"
    target_kinds = frozenset({"class"})
    Config = RiseConfig

    def compute(self, model, x, target, pixels):
        config = self.config
        batch, _, height, width = x.shape
        grids, offsets = self._draw(height, width, x.device)
        fill = pixels.fill(config.fill, x)  # [1,C,1,1], the model's input space
        indices = target.indices.to(x.device)
        # masks per step: batch_size masked images, at least one mask (all images of the batch)
        per_step = max(1, config.batch_size // batch)
        saliency = torch.zeros(batch, height * width, dtype=torch.float32, device=x.device)
        with torch.no_grad():
            for start in range(0, config.masks, per_step):
                stop = min(start + per_step, config.masks)
                masks = self._masks(grids[start:stop], offsets[start:stop], height, width)  # [n,1,H,W]
                # image b under mask i sits at row i * batch + b
                masked = torch.lerp(fill, x.unsqueeze(0), masks.to(x.dtype).unsqueeze(1)).flatten(0, 1)
                rows = indices.repeat(stop - start)
                probs = torch.cat([
                    self._probability(model, masked[k : k + config.batch_size], target, rows[k : k + config.batch_size])
                    for k in range(0, masked.shape[0], config.batch_size)
                ])
                with torch.autocast(x.device.type, enabled=False):  # accumulate in float32 under mixed precision
                    saliency += probs.view(stop - start, batch).t() @ masks.flatten(1)  # [B,n] @ [n,H*W]
        saliency /= config.masks * config.keep
        return saliency.view(batch, 1, height, width)

    def _draw(self, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """All the randomness of one call: N binary grids [N,1,s,s] and N crop offsets [N,2]."""
        config = self.config
        generator = torch.Generator(device=device)
        generator.manual_seed(config.seed)
        cells = config.cells
        grids = (torch.rand(config.masks, 1, cells, cells, generator=generator, device=device) < config.keep).float()
        cell_h, cell_w = math.ceil(height / cells), math.ceil(width / cells)
        shift_y = torch.randint(0, cell_h, (config.masks,), generator=generator, device=device)
        shift_x = torch.randint(0, cell_w, (config.masks,), generator=generator, device=device)
        return grids, torch.stack([shift_y, shift_x], 1)

    def _masks(self, grids: torch.Tensor, offsets: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Upsample grids [n,1,s,s] bilinearly to (s+1)·cell and crop H x W at the offsets: [n,1,H,W]."""
        cells = self.config.cells
        cell_h, cell_w = math.ceil(height / cells), math.ceil(width / cells)
        upsampled = F.interpolate(grids, size=((cells + 1) * cell_h, (cells + 1) * cell_w), mode="bilinear", align_corners=False)
        rows = offsets[:, 0, None] + torch.arange(height, device=grids.device)  # [n,H]
        cols = offsets[:, 1, None] + torch.arange(width, device=grids.device)  # [n,W]
        n = grids.shape[0]
        picked = upsampled[torch.arange(n, device=grids.device)[:, None, None], 0, rows[:, :, None], cols[:, None, :]]
        return picked.unsqueeze(1).clamp_(0.0, 1.0)  # bilinear weights can overshoot 1 by rounding

    @staticmethod
    def _probability(model, images: torch.Tensor, target, indices: torch.Tensor) -> torch.Tensor:
        """Softmax probability of each image's target class, in float32: [n]."""
        rows = ClassTarget(indices)  # the same classes for the masked copies in this forward
        return rows.select(rows.logits(model, images).float().softmax(1))
