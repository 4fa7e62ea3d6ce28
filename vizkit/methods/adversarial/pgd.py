"""Projected gradient descent (Kurakin, Goodfellow & Bengio 2016, "Adversarial examples in the physical
world"; Madry, Makelov, Schmidt, Tsipras & Vladu 2018, "Towards Deep Learning Models Resistant to
Adversarial Attacks"): ``steps`` gradient steps on the cross-entropy, each projected back onto the
ε ball around the clean pixels x and onto valid images [0, 1]:

    L∞:  x_{k+1} = clip_[0,1](x + clip_[-ε,ε](x_k + α sign(∇ CE(f(x_k), y)) − x))
    L2:  x_{k+1} = clip_[0,1](x + Π_ε(x_k + α g / (‖g‖₂ + 1e-10) − x)),  g = ∇ CE(f(x_k), y),
         Π_ε(δ) = δ · min(1, ε / ‖δ‖₂)

A targeted attack steps on −CE(f(x_k), t) instead. CE is averaged over the batch; a step uses only
the gradient's sign (L∞) or its direction (L2), so an input's result does not depend on its batch.
With ``random_start`` the walk starts at a random point of the ball: L∞ uniform in [−ε, ε] per
value; L2 a normal direction scaled to a radius uniform in [0, ε]; either then clipped to [0, 1].
Every step, projection and start is that of ``torchattacks.PGD`` (L∞) and ``torchattacks.PGDL2``
(L2), with ε and α in pixel units whatever the model's normalization. What differs:

* the random start comes from a ``torch.Generator`` seeded with ``seed`` (torchattacks draws from the
  global RNG, so its result depends on what ran before). It is drawn on the CPU and moved, so a seed
  gives the same start on every device, and it is one ``[C,H,W]`` draw per restart shared by the
  inputs of a batch (torchattacks: one per input), so an input's result depends on neither the
  batch size nor its neighbours;
* ``restarts``: the attack runs up to ``restarts`` times, restart r from its own seed stream; each
  input keeps the first result that succeeds (untargeted: predicted class ≠ label; targeted:
  predicted class = target), and later restarts run only on the inputs still unbroken; an input no
  restart breaks keeps the last one's result (Madry et al. report the best of several restarts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vizkit.core.errors import ConfigError
from vizkit.methods.adversarial.budget import check_norm, pixel_amount
from vizkit.methods.adversarial.fgsm import loss_gradient
from vizkit.methods.base import AdversarialMethod

EPS_FOR_DIVISION = 1e-10  # torchattacks PGDL2's guard on the gradient norm


@dataclass
class PGDConfig:
    norm: str = "linf"  # linf | l2: the ball the perturbation stays in
    eps: Any = "8/255"  # the ball's radius in pixel units: 0.03, 8/255 (text, as written); 0 returns the input
    step_size: Any = "2/255"  # α, in pixel units: L∞ per value, L2 the step's length
    steps: int = 10
    random_start: bool = True  # start at a random point of the ball (Madry et al.), seeded
    restarts: int = 1  # tries per input; the first that succeeds is kept
    seed: int = 0  # of the random start (its own generator; the global RNG is untouched)

    def __post_init__(self) -> None:
        check_norm(self.norm)
        self.eps = pixel_amount("eps", self.eps)
        self.step_size = pixel_amount("step_size", self.step_size, allow_zero=False)
        for name in ("steps", "restarts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.restarts > 1 and not self.random_start:
            raise ConfigError(f"restarts={self.restarts} needs random_start=true: without it every restart walks the same path")


def flat_norm(tensor: torch.Tensor) -> torch.Tensor:
    """Per-input L2 norm, shaped [B,1,1,1]."""
    return tensor.flatten(1).norm(p=2, dim=1).view(-1, 1, 1, 1)


class PGD(AdversarialMethod):
    name = "pgd"
    description = "projected gradient descent in an L∞ or L2 ball, random start and restarts (Madry et al. 2018)"
    Config = PGDConfig

    def perturb(self, model, pixels, labels, targets, space):
        config = self.config
        if config.eps == 0:
            return pixels.clone()
        adversarial = pixels.clone()
        unbroken = torch.arange(pixels.shape[0], device=pixels.device)  # inputs no restart has broken yet
        for restart in range(config.restarts):
            classes = (labels if targets is None else targets)[unbroken]
            found = self.walk(model, pixels[unbroken], classes, targets is not None, space, restart)
            adversarial[unbroken] = found
            if restart == config.restarts - 1:
                break
            with torch.no_grad():
                predicted = model(space.from_pixels(found)).argmax(1)
            broken = predicted == classes if targets is not None else predicted != classes
            unbroken = unbroken[~broken]
            if unbroken.numel() == 0:
                break
        return adversarial

    def walk(self, model, clean, classes, targeted, space, restart):
        """One projected gradient walk from the clean pixels (or a random point of the ball)."""
        config = self.config
        eps, alpha = config.eps, config.step_size
        adversarial = clean.clone()
        if config.random_start:
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + restart)  # restart r's own stream
            adversarial = (adversarial + self.random_offset(clean, generator)).clamp(0, 1)
        for _ in range(config.steps):
            gradient = loss_gradient(model, adversarial, classes, space)
            if targeted:  # torchattacks ascends −CE(f(x), t)
                gradient = -gradient
            if config.norm == "linf":
                adversarial = adversarial + alpha * gradient.sign()
                delta = (adversarial - clean).clamp(-eps, eps)
            else:
                adversarial = adversarial + alpha * (gradient / (flat_norm(gradient) + EPS_FOR_DIVISION))
                delta = adversarial - clean
                delta = delta * torch.clamp(eps / flat_norm(delta), max=1.0)
            adversarial = (clean + delta).clamp(0, 1).detach()
        return adversarial

    def random_offset(self, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random point of the ε ball, [1,C,H,W] (broadcast over the batch), drawn on the CPU."""
        eps, shape = self.config.eps, (1, *clean.shape[1:])
        if self.config.norm == "linf":
            offset = torch.empty(shape).uniform_(-eps, eps, generator=generator)
        else:
            direction = torch.empty(shape).normal_(generator=generator)
            radius = torch.empty(1, 1, 1, 1).uniform_(0, 1, generator=generator)
            offset = direction * (radius / flat_norm(direction) * eps)
        return offset.to(device=clean.device, dtype=clean.dtype)
