"""The Square attack (Andriushchenko, Croce, Flammarion & Hein 2020, "Square Attack: a query-efficient
black-box adversarial attack via random search"): a score-based attack that never asks for a gradient.
It keeps a best point x̂ in the ε ball around the clean pixels x and, at each step, proposes a change
confined to one random square window of side s; the proposal is kept if it lowers the loss

    L(x̂) = f_y(x̂) − max_{k≠y} f_k(x̂)        margin (default), untargeted: away from the label y
    L(x̂) = max_{k≠t} f_k(x̂) − f_t(x̂)        margin, targeted: towards the class t
    L(x̂) = −CE(f(x̂), y)   or   CE(f(x̂), t)   with ``loss="ce"``

(or if it already misclassifies, margin ≤ 0), and an input stops being queried once its margin is
≤ 0. The window covers a fraction p of the image, s = round(√(p·H·W)); p starts at ``p_init`` and
is halved after steps 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of a 10 000-step budget
(the paper's schedule, stretched to ``queries`` steps).

* L∞: x̂ starts at clip_[0,1](x + ε·σ) with σ = ±1 constant along each column of each channel
  (vertical stripes, the paper's initialization); a proposal adds ±2ε (one sign per channel) inside
  the window, then projects onto the ball and [0, 1], so the window's values land on the ball's corners.
* L2: x̂ starts at clip_[0,1](x + ε·δ/‖δ‖₂), δ a grid of H/5-sized windows each holding the paper's "square
  bump" η (nested rings of weight 1/(r+1)², positive in one half, negative in the other, randomly
  transposed) times a random sign per channel. A proposal picks two windows W₁, W₂, empties W₂, and
  in W₁ replaces δ by (η·σ + δ_W₁/‖δ_W₁‖) rescaled so that the whole perturbation keeps norm ε
  (per channel: √(max(ε² − ‖δ‖², 0)/C + ‖δ_{W₁∪W₂}‖²)), then δ is renormalized to ε and clipped.

Every draw, step and decision is that of ``torchattacks.Square`` (which follows AutoAttack's
implementation of the paper): the same p schedule rescaled to the budget, one window and one set of
signs per step shared by the inputs still attacked, the same order of random numbers, the inputs the
model already gets wrong (or, targeted, already puts in the target class) left alone, and each
restart run on the inputs still unbroken. Its results are equal to torchattacks' with the same seed.
What differs:

* the random numbers come from a private CPU ``torch.Generator`` seeded with ``seed``, drawn in
  exactly torchattacks' order (a generator seeded s gives the stream ``torch.manual_seed(s)`` does);
  torchattacks reseeds and draws from the global RNG, so it changes what runs after it. The numbers
  are drawn on the CPU and moved, so a seed gives the same attack on every device. As in
  torchattacks, an input's draws depend on which inputs of its batch are attacked with it (the
  L∞ stripes are indexed by position among them; the L2 signs are drawn per attacked input);
* torchattacks' ``resc_schedule`` is always on (its default) and its random / least-likely target
  modes are replaced by vizkit's ``target=`` (its ``set_mode_targeted_by_label``);
* a window never exceeds the image (side ≤ min(H, W)): torchattacks' can, on a non-square image
  (p·H·W > min(H, W)²) or at L2 with p_init = 1 on an even size, where it misplaces the window (L∞)
  or fails (L2), and the L2 start's grid is cut at the image's edge (torchattacks fails where it
  overhangs, e.g. at 9 pixels); wherever torchattacks runs, nothing changes;
* the L2 bump is built once per side on the CPU (torchattacks rebuilds it on the device each step:
  the same values on the CPU), and the logits are read in float32 (under bf16 autocast too);
* an input nothing breaks comes back as it was, as in torchattacks: the attack's answer is "not
  found", not its best try. ``queries`` counts search steps per restart; an input costs at most
  ``queries + 1`` forwards per restart (the start, then one per step), plus one clean forward for the
  batch and one check after each restart.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vizkit.core.errors import ConfigError
from vizkit.core.pixels import PixelSpace
from vizkit.core.validate import positive_integers
from vizkit.methods.adversarial.budget import check_norm, pixel_amount
from vizkit.methods.base import AdversarialMethod

LOSSES = ("margin", "ce")
# steps (of a 10 000-step budget) after which the window's share p of the image is halved
P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
TINY = 1e-12  # torchattacks' guard on every norm it divides by


@dataclass
class SquareConfig:
    norm: str = "linf"  # linf | l2: the ball the perturbation stays in
    eps: Any = "8/255"  # the ball's radius in pixel units: 0.03, 8/255 (text, as written); 0 returns the input
    queries: int = 5000  # search steps per restart (torchattacks' n_queries)
    restarts: int = 1  # later restarts attack only the inputs still unbroken, continuing the random stream
    p_init: float = 0.8  # the first window's share of the image, in (0, 1]
    loss: str = "margin"  # margin | ce: what a proposal must lower to be kept
    seed: int = 0  # of the windows and signs (its own generator; the global RNG is untouched)

    def __post_init__(self) -> None:
        try:
            check_norm(self.norm)
            self.eps = pixel_amount("eps", self.eps)
            positive_integers(self, "queries", "restarts")
        except ConfigError as error:
            raise ConfigError(f"square: {error}") from None
        if isinstance(self.p_init, bool) or not isinstance(self.p_init, (int, float)) or not 0 < self.p_init <= 1:
            raise ConfigError(f"square: p_init must be a number in (0, 1] (the paper's 0.8), got {self.p_init!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"square: loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"square: seed must be an integer, got {self.seed!r}")


# ---------------------------------------------------------------- torchattacks' draws, from our generator


def random_signs(shape: list[int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """±1 (0 where u = 0.5 exactly, as torchattacks' ``random_choice``): sign(2u − 1), u uniform."""
    return torch.sign(2 * torch.rand(shape, generator=generator) - 1).to(device)


def random_position(high: int, generator: torch.Generator) -> int:
    """A window's first row or column in [0, high], as torchattacks' ``random_int(0, high)``."""
    return int((high * torch.rand([1], generator=generator)).long())


@functools.lru_cache(maxsize=64)
def _rings(rows: int, cols: int) -> torch.Tensor:
    """Nested rectangles around the centre, ring r weighted 1/(r+1)², unit norm (the paper's M)."""
    pattern = torch.zeros([rows, cols])
    top, left = rows // 2, cols // 2
    for ring in range(max(rows // 2 + 1, cols // 2 + 1)):
        pattern[max(top - ring, 0):min(top + ring + 1, rows), max(left - ring, 0):min(left + ring + 1, cols)] += \
            1.0 / (torch.tensor([[float(ring + 1)]]) ** 2)
    return pattern / (pattern ** 2).sum(dim=(0, 1), keepdim=True).sqrt()


@functools.lru_cache(maxsize=64)
def _bump(side: int) -> torch.Tensor:
    """The paper's η: rings in the top half, negated rings in the bottom half, unit norm. Read only."""
    pattern = torch.zeros([side, side])
    pattern[:side // 2] = _rings(side // 2, side)
    pattern[side // 2:] = -1.0 * _rings(side - side // 2, side)
    return pattern / (pattern ** 2).sum(dim=(0, 1), keepdim=True).sqrt()


def random_bump(side: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """η, transposed with probability ½ (one draw), shaped [1,1,side,side], contiguous: a transposed
    layout would carry into the window and change the order in which its norm is summed (1 ulp)."""
    pattern = _bump(side)
    if torch.rand([1], generator=generator) > 0.5:
        pattern = pattern.t()
    return pattern.contiguous().to(device).reshape(1, 1, side, side)


def l2_norms(delta: torch.Tensor) -> torch.Tensor:
    """Per input ‖δ‖₂, shaped [B,1,1,1] (torchattacks' ``lp_norm``)."""
    return (delta ** 2).flatten(1).sum(-1).sqrt().view(-1, 1, 1, 1)


# ---------------------------------------------------------------- the attack


class Square(AdversarialMethod):
    name = "square"
    description = "score-based black-box random search over square windows in an L∞ or L2 ball (Andriushchenko et al. 2020)"
    Config = SquareConfig

    def perturb(self, model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor,
                targets: torch.Tensor | None, space: PixelSpace) -> torch.Tensor:
        config = self.config
        adversarial = pixels.clone()
        if config.eps == 0:
            return adversarial
        if config.norm == "l2" and min(pixels.shape[2:]) < 5:
            raise ConfigError(f"square: the L2 start tiles the image in windows of a fifth of its height: images must be at "
                              f"least 5×5 pixels, got {tuple(pixels.shape[2:])}")
        targeted = targets is not None
        classes = targets if targeted else labels
        generator = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            unbroken = (~self.fooled(model, pixels, classes, targeted, space)).nonzero().flatten()
            for _ in range(config.restarts):
                if unbroken.numel() == 0:
                    break
                found = self.search(model, pixels[unbroken], classes[unbroken], targeted, space, generator)
                broken = self.fooled(model, found, classes[unbroken], targeted, space)
                adversarial[unbroken[broken]] = found[broken]
                unbroken = unbroken[~broken]
        return adversarial

    @staticmethod
    def fooled(model, pixels, classes, targeted, space) -> torch.Tensor:
        predicted = model(space.from_pixels(pixels)).argmax(1)
        return predicted == classes if targeted else predicted != classes

    def scores(self, model, pixels, classes, targeted, space) -> tuple[torch.Tensor, torch.Tensor]:
        """(margin, loss) per input: the margin decides success (≤ 0), the loss which proposal is kept."""
        logits = model(space.from_pixels(pixels)).float()
        own = logits.gather(1, classes[:, None])[:, 0]
        best_other = logits.scatter(1, classes[:, None], float("-inf")).amax(1)
        margin = best_other - own if targeted else own - best_other
        if self.config.loss == "margin":
            return margin, margin
        cross_entropy = F.cross_entropy(logits, classes, reduction="none")
        return margin, cross_entropy if targeted else -1.0 * cross_entropy

    def search(self, model, clean, classes, targeted, space, generator) -> torch.Tensor:
        """One random search from the norm's start; the best point per input."""
        start, propose = (self.start_linf, self.propose_linf) if self.config.norm == "linf" else (self.start_l2, self.propose_l2)
        best = start(clean, generator)
        margin_min, loss_min = self.scores(model, best, classes, targeted, space)
        for step in range(self.config.queries):
            active = (margin_min > 0).nonzero().flatten()
            if active.numel() == 0:
                break
            candidate = propose(clean[active], best[active], self.window_share(step), generator)
            margin, loss = self.scores(model, candidate, classes[active], targeted, space)
            improved = loss < loss_min[active]
            loss_min[active] = torch.where(improved, loss, loss_min[active])
            improved |= margin <= 0  # a misclassifying proposal is kept even at a higher loss
            margin_min[active] = torch.where(improved, margin, margin_min[active])
            best[active] = torch.where(improved.view(-1, 1, 1, 1), candidate, best[active])
        return best

    def window_share(self, step: int) -> float:
        """p at ``step``: the paper's schedule for 10 000 steps, stretched to ``queries``."""
        stretched = int(step / self.config.queries * 10000)
        return self.config.p_init / 2 ** sum(stretched > bound for bound in P_HALVINGS)

    # ------------------------------------------------------------ L∞

    def start_linf(self, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count, channels, _, width = clean.shape
        stripes = random_signs([count, channels, 1, width], generator, clean.device)
        return torch.clamp(clean + self.config.eps * stripes, 0.0, 1.0)

    def propose_linf(self, clean, best, share, generator) -> torch.Tensor:
        eps = self.config.eps
        channels, height, width = clean.shape[1:]
        side = min(max(int(round(math.sqrt(share * (channels * height * width) / channels))), 1), height, width)
        top, left = random_position(height - side, generator), random_position(width - side, generator)
        change = torch.zeros([channels, height, width], device=clean.device, dtype=clean.dtype)
        change[:, top:top + side, left:left + side] = 2.0 * eps * random_signs([channels, 1, 1], generator, clean.device)
        return torch.clamp(torch.min(torch.max(best + change, clean - eps), clean + eps), 0.0, 1.0)

    # ------------------------------------------------------------ L2

    def start_l2(self, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count, channels, height, width = clean.shape
        side = height // 5
        margin = (height - side * 5) // 2
        delta = torch.zeros_like(clean)
        for row in range(height // side):
            for col in range(width // side):
                window = delta[:, :, margin + row * side:margin + (row + 1) * side, margin + col * side:margin + (col + 1) * side]
                tile = random_bump(side, generator, clean.device) * random_signs([count, channels, 1, 1], generator, clean.device)
                window += tile[:, :, :window.shape[2], :window.shape[3]]  # cut at the image's edge (torchattacks fails there)
        return self.onto_sphere(clean, delta)

    def onto_sphere(self, clean: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """clip_[0,1](x + ε δ/‖δ‖₂)."""
        return torch.clamp(clean + delta / (l2_norms(delta) + TINY) * self.config.eps, 0.0, 1.0)

    def propose_l2(self, clean, best, share, generator) -> torch.Tensor:
        eps = self.config.eps
        count, channels, height, width = clean.shape
        side = max(int(round(math.sqrt(share * (channels * height * width) / channels))), 3)
        side = min(side + 1 - side % 2, height, width)  # odd, so the bump has a centre, unless the image is narrower
        delta = best - clean
        top, left = random_position(height - side, generator), random_position(width - side, generator)
        into = (slice(None), slice(None), slice(top, top + side), slice(left, left + side))
        into_norms = (delta[into] ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()  # per channel
        top, left = random_position(height - side, generator), random_position(width - side, generator)
        emptied = (slice(None), slice(None), slice(top, top + side), slice(left, left + side))
        both = torch.zeros_like(clean)
        both[into] = 1.0
        both[emptied] = 1.0
        # the norm the new window may take: what the ball has left, shared by the channels, plus what
        # both windows held before
        room = (torch.clamp((eps * torch.ones_like(into_norms[:, :1])) ** 2 - l2_norms(delta) ** 2, min=0.0) / channels
                + l2_norms(delta * both) ** 2).sqrt()
        window = random_bump(side, generator, clean.device) * random_signs([count, channels, 1, 1], generator, clean.device)
        window = window + delta[into] / (TINY + into_norms)
        window = window / (TINY + (window ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()) * room
        delta[emptied] = 0.0
        delta[into] = window
        return self.onto_sphere(clean, delta)
