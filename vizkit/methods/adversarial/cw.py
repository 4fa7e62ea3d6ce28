"""The Carlini & Wagner L2 attack (Carlini & Wagner 2017, "Towards Evaluating the Robustness of Neural
Networks", IEEE S&P): the smallest L2 change that flips the decision, found by optimization rather
than in a fixed ball. Pixels are written x' = (tanh(w) + 1) / 2, so every w is a valid image, and

    minimize over w   ‖x' − x‖₂² + c · f(x')
    f(x') = max(Z_y(x') − max_{i≠y} Z_i(x'), −κ)          untargeted (y the label)
    f(x') = max(max_{i≠t} Z_i(x') − Z_t(x'), −κ)          targeted (t the target)

with Z the logits, by ``steps`` Adam steps (``lr``) from w = atanh(2x − 1). Every iterate the model
classifies as adversarial (below) is a candidate; each input keeps its smallest-L2 one, and an input
with none is returned unchanged. f stops pulling once the margin reaches κ, so the L2 term then pulls
back towards x: the descent settles near the boundary (or κ past it). An input the model already
misclassifies (given labels it disagrees with) is adversarial at the first iterate, x through the
tanh round trip, and comes back as that, as from torchattacks.

c trades distance for success, and the right value differs per input, so the paper searches it per
input (``binary_search_steps`` rounds, each a fresh descent from x with fresh Adam state, the best
result kept over all rounds), as the authors' code (carlini/nn_robust_attacks, ``l2_attack.py``) does:
after a round in which some iterate was adversarial, c becomes the upper bound and then (lower +
upper) / 2; after a round without one, c becomes the lower bound and then c · 10 while no upper bound
is known, else (lower + upper) / 2. Defaults: ``c`` = 1 (torchattacks') rather than the authors' 1e-3,
so a short search spends its rounds refining (from 1e-3, three of five rounds only climb to 1); 50
steps per round (torchattacks'; the authors run up to 10000) and 5 rounds (the authors 9), so the
attack costs at most 5 times torchattacks' CW: 250 forward and backward passes.

One round is ``torchattacks.CW`` (which has no search): the same change of variables with its inverse
atanh(clamp(2x − 1, −1, 1)) (a pixel at exactly 0 or 1 maps to an infinite w and stays put), the
same Adam on the batch's summed cost, the same candidate bookkeeping on the iterate before each step,
and the same early stop: every ``max(steps // 10, 1)`` steps the round ends if the batch's cost rose
since the last check (the authors stop when it fell by less than 0.01 %). The stop is decided on the
batch's total, in both peers and here, so an input's result can depend on the inputs beside it.
With ``binary_search_steps=1``, κ = 0 and positive logits the result is torchattacks' bit for bit
(tested; for c ≠ 1 the cost, Σ c·f_i here and c·Σ f_i there, can differ in its last bit, which only
the early stop's comparison reads). What differs:

* f's maximum over the other classes is taken over those classes only. torchattacks masks the logits
  by multiplying with a one-hot vector, so the masked class counts as a logit of 0 in ``max_{i≠y}``,
  and Z_y itself is read as max(Z_y, 0): wherever the relevant logits are negative its f is not the
  paper's (the authors' code masks with −10000). The two agree when every logit is positive; on the
  test model's own logits one targeted case reaches 1 target of 4 there and 4 of 4 here.
* An iterate counts as adversarial when the decision holds with margin κ: untargeted, argmax of the
  logits with Z_y raised by κ is not y; targeted, argmax with Z_t lowered by κ is t (as the
  authors' ``compare`` means to; its untargeted case lowers Z_y instead, so an input still classified
  as y, by less than κ, would count). torchattacks ignores κ there, so with κ > 0 it keeps the first
  barely-flipped iterate (measured at κ = 2: its results hold by 0.06 to 0.33 logits, these by ≥ 2).
  At κ = 0 all three agree.
* The authors' code, when it runs 10 or more rounds, spends the last at each input's upper bound;
  rounds are deterministic, so for an input that succeeded this repeats an earlier round, and for one
  that never did it is c = 10¹⁰: not done here.
* Only the input's gradient is asked of autograd (torchattacks' ``cost.backward()`` leaves gradients
  on the model's weights).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vizkit.core.errors import ConfigError
from vizkit.core.validate import positive_integers
from vizkit.methods.base import AdversarialMethod

NO_CANDIDATE_L2 = 1e10  # torchattacks' starting "best" distance: any candidate is closer


@dataclass
class CWConfig:
    c: float = 1.0  # the first constant weighing f against the distance (torchattacks' 1; the paper's code 1e-3)
    kappa: float = 0.0  # κ, the margin (in logits) an adversarial must reach: higher is more confident, farther
    steps: int = 50  # Adam steps per round (torchattacks' default; the authors' code 10000, with its early stop)
    lr: float = 0.01  # Adam's learning rate on w (torchattacks' and the authors')
    binary_search_steps: int = 5  # rounds of the search over c (1: torchattacks.CW; the authors' code 9)

    def __post_init__(self) -> None:
        try:
            positive_integers(self, "steps", "binary_search_steps")
            self.c = _number("c", self.c, "positive", "torchattacks uses 1, the paper's code 1e-3")
            self.lr = _number("lr", self.lr, "positive", "e.g. 0.01")
            self.kappa = _number("kappa", self.kappa, "non-negative", "0 for the closest adversarial, e.g. 20 for confident ones")
        except ConfigError as error:
            raise ConfigError(f"cw: {error}") from None


def _number(name: str, value: object, sign: str, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and sign == "positive"):
        raise ConfigError(f"{name} must be a {sign} finite number ({hint}), got {value!r}")
    return float(value)


def tanh_space(w: torch.Tensor) -> torch.Tensor:
    return 1 / 2 * (torch.tanh(w) + 1)


def inverse_tanh_space(pixels: torch.Tensor) -> torch.Tensor:
    """atanh(2x − 1), written as torchattacks writes it (so the round trip rounds alike)."""
    y = torch.clamp(pixels * 2 - 1, min=-1, max=1)
    return 0.5 * torch.log((1 + y) / (1 - y))


def margin(logits: torch.Tensor, classes: torch.Tensor, targeted: bool, kappa: float) -> torch.Tensor:
    """f per input: Z_y − max_{i≠y} Z_i (targeted: max_{i≠t} Z_i − Z_t), clamped below at −κ."""
    own = logits.gather(1, classes[:, None]).squeeze(1)
    others = logits.scatter(1, classes[:, None], -math.inf).max(1).values
    return torch.clamp(others - own if targeted else own - others, min=-kappa)


def adversarial_now(logits: torch.Tensor, classes: torch.Tensor, targeted: bool, kappa: float) -> torch.Tensor:
    """Whether each input's decision holds with margin κ (the authors' ``compare``)."""
    handicap = torch.full_like(classes, -kappa if targeted else kappa, dtype=logits.dtype)
    predicted = logits.scatter_add(1, classes[:, None], handicap[:, None]).argmax(1)
    return predicted == classes if targeted else predicted != classes


def next_constant(constant: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                  succeeded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The authors' update of (c, lower bound, upper bound) per input after a round; no upper bound is ∞."""
    upper = torch.where(succeeded, torch.minimum(upper, constant), upper)
    lower = torch.where(succeeded, lower, torch.maximum(lower, constant))
    unbounded = torch.where(succeeded, constant, constant * 10)
    return torch.where(torch.isfinite(upper), (lower + upper) / 2, unbounded), lower, upper


class CW(AdversarialMethod):
    name = "cw"
    description = "Carlini & Wagner's L2 attack: Adam in tanh space on distance + c·margin, binary search over c (2017)"
    Config = CWConfig

    def perturb(self, model, pixels, labels, targets, space):
        clean = pixels.detach().float()  # w, Adam's state and the distances stay float32 whatever the model's dtype
        targeted = targets is not None
        classes = targets if targeted else labels
        logits_of = lambda candidate: model(space.from_pixels(candidate).to(pixels.dtype)).float()
        constant = torch.full((clean.shape[0],), self.config.c, device=clean.device)
        lower, upper = torch.zeros_like(constant), torch.full_like(constant, math.inf)
        best, best_l2 = clean.clone(), torch.full_like(constant, NO_CANDIDATE_L2)
        for _ in range(self.config.binary_search_steps):
            best, best_l2, succeeded = self.descend(logits_of, clean, classes, targeted, constant, best, best_l2)
            constant, lower, upper = next_constant(constant, lower, upper, succeeded)
        return best.to(pixels.dtype)

    def descend(self, logits_of, clean, classes, targeted, constant, best, best_l2):
        """One round at fixed constants (torchattacks.CW's loop): the best candidates so far, updated,
        and whether each input had a candidate in this round."""
        config = self.config
        w = inverse_tanh_space(clean).detach().requires_grad_(True)
        optimizer = torch.optim.Adam([w], lr=config.lr)
        succeeded = torch.zeros_like(classes, dtype=torch.bool)
        previous_cost, check_every = 1e10, max(config.steps // 10, 1)  # torchattacks' start and interval
        for step in range(config.steps):
            adversarial = tanh_space(w)
            l2 = F.mse_loss(adversarial.flatten(1), clean.flatten(1), reduction="none").sum(1)
            logits = logits_of(adversarial)
            cost = l2.sum() + (constant * margin(logits, classes, targeted, config.kappa)).sum()
            w.grad = torch.autograd.grad(cost, w)[0]
            optimizer.step()
            with torch.no_grad():
                candidate = adversarial_now(logits, classes, targeted, config.kappa)
                closer = candidate & (l2 < best_l2)
                best_l2 = torch.where(closer, l2, best_l2)
                best = torch.where(closer.view(-1, 1, 1, 1), adversarial, best)
                succeeded |= candidate
            if step % check_every == 0:
                if cost.item() > previous_cost:
                    break
                previous_cost = cost.item()
        return best, best_l2, succeeded
