"""DeepFool (Moosavi-Dezfooli, Fawzi & Frossard 2016, "DeepFool: a simple and accurate method to fool
deep neural networks"): the smallest L2 perturbation that crosses the nearest decision boundary, found
by linearizing the classifier around the current point and stepping onto the linearized boundary.

With y the true class and, for each candidate class k ≠ y,

    w_k = ∇f_k(x_i) − ∇f_y(x_i),   f'_k = f_k(x_i) − f_y(x_i)
    l   = argmin_k |f'_k| / ‖w_k‖₂                              (the closest linearized boundary)
    r_i = (|f'_l| + 1e-4) / ‖w_l‖₂² · w_l
    x_{i+1} = clip(x_i + (1 + overshoot) · r_i, 0, 1)

until the prediction differs from y or ``steps`` are spent. Without the clip this is the authors'
code, where every iterate is x_0 + (1 + overshoot) · Σ r_i (the overshoot applies to each step, not
only once at the end) and r_i carries the 1e-4 that puts the point just past the boundary. The clip
at every step (the model only ever sees valid pixels) is torchattacks' placement; torchattacks
omits the 1e-4.

Candidates (``candidates``): the paper's "top-10" classes of the clean logits for ImageNet, i.e. the
true class and the 9 next ones, fixed for the whole attack; all classes when the model has fewer.
Unlike torchattacks (one image at a time, the full Jacobian), the batch is attacked at once: per step
one forward and ``candidates − 1`` input-gradient backward passes, each for every input still
classified as y. Inputs are independent only with the model in eval mode (BatchNorm's running
statistics), as any attack assumes. An input the model already gets wrong is returned unchanged; an
input not fooled within ``steps`` is returned at its last iterate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vizkit.core.errors import ConfigError
from vizkit.methods.base import AdversarialMethod
from vizkit.core.pixels import PixelSpace

BOUNDARY_MARGIN = 1e-4  # the authors' code: step just past the linearized boundary


@dataclass
class DeepFoolConfig:
    steps: int = 50  # at most this many linearizations per input
    overshoot: float = 0.02  # η: each step scaled by 1 + η so the boundary is crossed, not reached
    candidates: int = 10  # classes considered, the true one included (the paper's top 10)

    def __post_init__(self) -> None:
        for name, least in (("steps", 1), ("candidates", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"deepfool: {name} must be an integer ≥ {least}, got {value!r}")
        if isinstance(self.overshoot, bool) or not isinstance(self.overshoot, (int, float)) or not 0 <= self.overshoot < float("inf"):
            raise ConfigError(f"deepfool: overshoot must be a non-negative number (the paper uses 0.02), got {self.overshoot!r}")


class DeepFool(AdversarialMethod):
    name = "deepfool"
    description = "the minimal L2 change that crosses the nearest linearized decision boundary (Moosavi-Dezfooli et al. 2016)"
    Config = DeepFoolConfig
    targeted = False

    def perturb(self, model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor,
                targets: torch.Tensor | None, space: PixelSpace) -> torch.Tensor:
        config = self.config
        adversarial = pixels.detach().float().clone()
        active = torch.arange(len(pixels), device=pixels.device)  # inputs still classified as their label
        competitors = None  # [B, K-1]: the candidate classes other than the label, from the clean logits
        for _ in range(config.steps):
            current = adversarial[active].requires_grad_(True)
            logits = model(space.from_pixels(current)).float()
            if competitors is None:
                count = min(config.candidates, logits.shape[1])
                ranked = logits.detach().topk(count, dim=1).indices  # the label is first wherever the input is still correct
                competitors = ranked[:, 1:]
            still = logits.argmax(1) == labels[active]
            if not still.any():
                break
            active = active[still]
            step = self._closest_boundary_step(current, logits[still], still, labels[active], competitors[active])
            adversarial[active] = (adversarial[active] + (1 + config.overshoot) * step).clamp(0, 1)
        return adversarial

    @staticmethod
    def _closest_boundary_step(current: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor,
                               labels: torch.Tensor, competitors: torch.Tensor) -> torch.Tensor:
        """r for each input (``rows`` of ``current``, whose ``logits`` they are): the step onto the
        closest of the candidates' linearized boundaries, [N,C,H,W]."""
        label_logit = logits.gather(1, labels[:, None]).squeeze(1)
        best_distance = torch.full_like(label_logit, float("inf"))
        best_step = torch.zeros_like(current[rows], dtype=torch.float32)
        for column in range(competitors.shape[1]):
            gap = logits.gather(1, competitors[:, column, None]).squeeze(1) - label_logit  # f'_k < 0 while correct
            last = column == competitors.shape[1] - 1
            (gradient,) = torch.autograd.grad(gap.sum(), current, retain_graph=not last)  # per input: no input sees another
            w = gradient[rows].float()
            w_norm = w.flatten(1).norm(dim=1)
            gap = gap.detach()
            distance = torch.where(w_norm > 0, gap.abs() / w_norm, torch.full_like(gap, float("inf")))
            closer = distance < best_distance
            if closer.any():
                scale = (gap.abs() + BOUNDARY_MARGIN) / w_norm.pow(2).clamp_min(torch.finfo(torch.float32).tiny)
                best_step[closer] = scale[closer].view(-1, 1, 1, 1) * w[closer]
                best_distance = torch.where(closer, distance, best_distance)
        return best_step
