"""The fast gradient sign method (Goodfellow, Shlens & Szegedy 2015, "Explaining and Harnessing
Adversarial Examples"): one step of size ε along the sign of the loss gradient, in pixel space,

    x' = clip_[0,1](x + ε sign(∇x CE(f(x), y)))      untargeted: away from the label y
    x' = clip_[0,1](x − ε sign(∇x CE(f(x), t)))      targeted: towards the class t

with CE the cross-entropy of the logits (averaged over the batch, as torchattacks; the step uses only
the gradient's sign, so an input's result does not depend on its batch). ‖x' − x‖∞ ≤ ε. Equals
``torchattacks.FGSM`` (its inputs are pixels in [0, 1]; here the model sees them normalized as it
expects, and ε stays in pixel units).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vizkit.methods.adversarial.budget import pixel_amount
from vizkit.methods.base import AdversarialMethod


@dataclass
class FGSMConfig:
    eps: Any = "8/255"  # L∞ budget in pixel units: 0.03, 8/255 (text, as written); parsed to a float

    def __post_init__(self) -> None:
        self.eps = pixel_amount("eps", self.eps)


def loss_gradient(model: torch.nn.Module, pixels: torch.Tensor, classes: torch.Tensor, space) -> torch.Tensor:
    """∇ over ``pixels`` of the batch-mean cross-entropy of ``model(space.from_pixels(pixels))`` against
    ``classes``; only the input's gradient is asked for, never the weights'."""
    pixels = pixels.detach().requires_grad_(True)
    loss = F.cross_entropy(model(space.from_pixels(pixels)).float(), classes)
    (gradient,) = torch.autograd.grad(loss, pixels)
    return gradient


class FGSM(AdversarialMethod):
    name = "fgsm"
    description = "fast gradient sign method: one ε step along the loss gradient's sign, L∞ (Goodfellow et al. 2015)"
    Config = FGSMConfig

    def perturb(self, model, pixels, labels, targets, space):
        eps = self.config.eps
        if eps == 0:
            return pixels.clone()
        if targets is None:
            step = eps * loss_gradient(model, pixels, labels, space).sign()
        else:
            step = -eps * loss_gradient(model, pixels, targets, space).sign()
        return (pixels + step).clamp(0, 1)
