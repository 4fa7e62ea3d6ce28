"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks"): projected gradient ascent whose step size needs no tuning, with
momentum, on the cross-entropy or the difference of logits ratio (DLR); and APGD-T, the targeted DLR
towards each of the most likely other classes in turn.

With P the projection onto the ε ball around the clean pixels x (L∞ or L2) and onto [0, 1], f an
input's loss (maximized) and η its own step size, starting at η⁰ = 2ε from a random point x⁰ of the
ball's surface (L∞: a uniform draw in [−1, 1]ⁿ scaled so its largest magnitude is ε; L2: a normal draw
scaled to length ε; then clipped to [0, 1]):

    z^{k+1} = P(x^k + η^k s(∇f(x^k)))          s: sign (L∞), g / ‖g‖₂ (L2)
    x^{k+1} = P(x^k + α (z^{k+1} − x^k) + (1 − α)(x^k − x^{k−1})),   α = 0.75 (1 at the first step)

At the checkpoints, ⌊0.22 N⌋ steps after the start, then at gaps that shrink by ⌊0.03 N⌋ down to
⌊0.06 N⌋ (each at least 1; N = ``steps``), an input's η is halved and its walk restarted from its
highest-loss point when (1) its loss rose in at most ρ times the steps since the last checkpoint, or
(2) η was not halved at the last checkpoint and its best loss has not risen since.

    CE     f = CE(z, y)                    targeted (``target=``): f = −CE(z, t)
    DLR    f = −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3)                 (z_π1 ≥ z_π2 ≥ … sorted logits)
    DLR-T  f = −(z_y − z_t) / (z_π1 − (z_π3 + z_π4) / 2)             (``dlr_loss(z, y, t)``)

DLR is invariant to shifting and scaling the logits, so a saturated softmax cannot hide the gradient;
it needs 3 classes, the targeted one 4. Only inputs the model still classifies as their label (with
``target=``: not yet as the target) are attacked; each run's result for an input is its last
iterate classified otherwise, and an input no run breaks is returned unchanged (AutoAttack reports
robust accuracy, not a best effort). ``restarts`` runs follow each other on the inputs still unbroken.
``target_classes`` = N > 0 is APGD-T: for the 2nd, 3rd, … (N+1)th class of each input's clean logits in
turn, ``restarts`` runs of the targeted DLR, counted as successes when the input leaves its label.

Every step, projection, checkpoint and start is that of ``torchattacks.APGD`` (``loss`` ce | dlr) and
``torchattacks.APGDT`` (AutoAttack's "APGD-T"), written with the same float32 operations in the same
order, so the adversarial pixels are equal to theirs; ε is in pixel units whatever the model's
normalization. Kept from the authors' code, unlike the paper: condition (1) is "at most", not "fewer
than"; the first checkpoint compares step 0's loss with the history's last row, still 0 then (the
start point's loss is not in the history). What differs:

* the random start comes from a ``torch.Generator`` seeded with ``seed`` once per call, drawing
  ``torch.rand``/``torch.randn`` of the attacked inputs' shape on the CPU exactly as torchattacks draws
  from the global RNG after ``torch.manual_seed(seed)``: the same numbers, but the global RNG is left
  alone. As theirs, an input's start depends on its position among the inputs still attacked;
* APGD-T ranks the target classes once, from the clean logits of the whole batch (torchattacks: a
  forward per run on the inputs still attacked; the ranks agree but for float ties);
* APGD-T's L2 step uses each input's own step size (torchattacks' APGDT uses the batch's first
  input's, ``step_size[0]``, so an input's result depends on its neighbours; equal for one input);
* ``target=`` (no peer): a targeted attack towards a given class, success when the input reaches it;
* torchattacks' ``eot_iter`` (gradient averaging for randomized models) is not offered.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vizkit.core.errors import ConfigError
from vizkit.core.validate import positive_integers
from vizkit.methods.adversarial.budget import check_norm, pixel_amount
from vizkit.methods.base import AdversarialMethod

LOSSES = ("ce", "dlr")
MOMENTUM = 0.75  # α: the authors' value, not a parameter in their code either
GUARD = 1e-12  # the authors' guard on every division by a norm and on DLR's denominator


@dataclass
class APGDConfig:
    norm: str = "linf"  # linf | l2: the ball the perturbation stays in
    eps: Any = "8/255"  # the ball's radius in pixel units: 0.03, 8/255 (text, as written); 0 returns the input
    steps: int = 100  # per run (the paper's; torchattacks' default is 10)
    restarts: int = 1  # runs per input (per target class for APGD-T), each on the inputs still unbroken
    loss: str = "ce"  # ce | dlr (difference of logits ratio: needs 3 classes, 4 when targeted)
    rho: float = 0.75  # ρ: halve the step where the loss rose in at most this share of the steps since the last checkpoint
    seed: int = 0  # of the random starts (their own generator; the global RNG is untouched)
    target_classes: int = 0  # N > 0: APGD-T, the targeted DLR towards each input's N most likely other classes in turn

    def __post_init__(self) -> None:
        try:
            check_norm(self.norm)
            self.eps = pixel_amount("eps", self.eps)
            positive_integers(self, "steps", "restarts")
            if self.loss not in LOSSES:
                raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
            if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not 0 < self.rho < 1:
                raise ConfigError(f"rho must be a number strictly between 0 and 1 (the paper's 0.75), got {self.rho!r}")
            for name in ("seed", "target_classes"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"{name} must be an integer, got {value!r}")
            if self.target_classes < 0:
                raise ConfigError(f"target_classes must be 0 (untargeted) or how many classes APGD-T targets, got {self.target_classes}")
            if self.target_classes and self.loss != "dlr":
                raise ConfigError(f"target_classes={self.target_classes} runs APGD-T, whose loss is the targeted DLR: "
                                  f"set loss=dlr (or target_classes=0 for APGD-{self.loss.upper()})")
        except ConfigError as error:  # one line that names the method, however it was built
            raise ConfigError(f"apgd: {error}") from None


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """The difference of logits ratio per input, [B], to be maximized: untargeted
    −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3) (3 classes or more), or with ``targets`` the targeted
    −(z_y − z_t) / (z_π1 − (z_π3 + z_π4) / 2) (4 or more); z_π are the sorted logits. The operations
    are torchattacks' (``APGD.dlr_loss``, ``APGDT.dlr_loss_targeted``), so the values and gradients are
    theirs bit for bit."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    ordered, order = logits.sort(dim=1)
    if targets is None:
        label_on_top = (order[:, -1] == labels).float()  # then the largest other logit is the second (two products, as theirs)
        return -(logits[rows, labels] - ordered[:, -2] * label_on_top - ordered[:, -1] * (1.0 - label_on_top)) / (
            ordered[:, -1] - ordered[:, -3] + GUARD)
    return -(logits[rows, labels] - logits[rows, targets]) / (ordered[:, -1] - 0.5 * ordered[:, -3] - 0.5 * ordered[:, -4] + GUARD)


def _l2(tensor: torch.Tensor) -> torch.Tensor:
    """Per-input L2 norm, [B,1,1,1], summed as the authors do (bitwise their value)."""
    return (tensor ** 2).sum(dim=(1, 2, 3), keepdim=True).sqrt()


def _onto_l2_ball(clean: torch.Tensor, point: torch.Tensor, eps: float, slack: float) -> torch.Tensor:
    """``point`` scaled towards ``clean`` to length at most ε; ``slack``: the authors' code adds the
    guard inside the min on the second projection of a step only (a no-op above lengths of ~1e-5)."""
    delta = point - clean
    length = _l2(delta)
    return clean + delta / (length + GUARD) * torch.min(eps * torch.ones_like(point), length + slack)


class APGD(AdversarialMethod):
    name = "apgd"
    description = "auto-PGD: momentum, checkpointed step size, CE or DLR loss, APGD-T over the top classes (Croce & Hein 2020)"
    Config = APGDConfig

    def perturb(self, model, pixels, labels, targets, space):
        config = self.config
        if targets is not None and config.target_classes:
            raise ConfigError(f"apgd: target_classes={config.target_classes} (APGD-T, each input's most likely other classes in turn) "
                              f"and a target (one class) were both given: choose one")
        clean = pixels.detach().float()
        adversarial = clean.clone()
        if config.eps == 0:
            return adversarial
        with torch.no_grad():
            logits = model(space.from_pixels(clean)).float()
        self.check_classes(logits.shape[1], targeted=targets is not None or config.target_classes > 0)
        predicted = logits.argmax(1)
        unbroken = predicted != targets if targets is not None else predicted == labels
        if config.target_classes:  # ascending order: where unbroken the label is last, its runner-up second to last
            ranked = logits.sort(dim=1).indices
            run_targets = [ranked[:, -rank] for rank in range(2, config.target_classes + 2)]
        else:
            run_targets = [targets]
        generator = torch.Generator().manual_seed(config.seed)  # torchattacks: torch.manual_seed(seed) once per call
        for loss_targets in run_targets:
            for _ in range(config.restarts):
                rows = unbroken.nonzero().squeeze(1)
                if rows.numel() == 0:
                    return adversarial
                found, broken = self.run(model, clean[rows], labels[rows], None if loss_targets is None else loss_targets[rows],
                                         targets is not None, space, generator)
                adversarial[rows[broken]] = found[broken]
                unbroken[rows[broken]] = False
        return adversarial

    def check_classes(self, classes: int, targeted: bool) -> None:
        """Refuse a model with too few classes for the DLR loss, or fewer than APGD-T's targets."""
        config = self.config
        if config.loss == "dlr" and classes < 3 + targeted:
            what = "the targeted DLR loss divides by z_π1 − (z_π3 + z_π4)/2" if targeted else "the DLR loss divides by z_π1 − z_π3"
            raise ConfigError(f"apgd: loss=dlr needs at least {3 + targeted} classes ({what}), the model has {classes}: use loss=ce")
        if config.target_classes > classes - 1:
            raise ConfigError(f"apgd: target_classes={config.target_classes}, but the model has {classes} classes: "
                              f"at most {classes - 1} other classes to target")

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        """Each input's loss, [B], to be maximized."""
        if self.config.loss == "dlr":
            return dlr_loss(logits, labels, targets)
        if targets is None:
            return F.cross_entropy(logits, labels, reduction="none")
        return -F.cross_entropy(logits, targets, reduction="none")

    def run(self, model, clean, labels, targets, reach_target, space, generator):
        """One APGD run from a random start on every input of ``clean``: (each input's last iterate
        that succeeded, whether one did). Success: the prediction is the target if ``reach_target``,
        else not the label."""
        config = self.config
        steps, batch, device = config.steps, clean.shape[0], clean.device
        gap, least_gap, gap_decrease = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)

        def evaluate(point):
            point = point.detach().requires_grad_(True)
            logits = model(space.from_pixels(point)).float()
            loss = self.loss(logits, labels, targets)
            (gradient,) = torch.autograd.grad(loss.sum(), point)
            predicted = logits.detach().argmax(1)
            return loss.detach(), gradient, predicted == targets if reach_target else predicted != labels

        point = (clean + self.random_offset(clean, generator)).clamp(0.0, 1.0)
        loss, gradient, success = evaluate(point)
        broken, last_success = success.clone(), point.clone()
        best_point, best_gradient, best_loss = point.clone(), gradient.clone(), loss.clone()
        step_size = torch.full((batch, 1, 1, 1), 2 * config.eps, device=device)
        history = torch.zeros(steps, batch, device=device)  # each step's loss, for condition (1)
        best_at_check, halved_at_check = best_loss.clone(), torch.ones(batch, dtype=torch.bool, device=device)
        previous, since_check = point, 0
        for step in range(steps):
            with torch.no_grad():
                momentum = point - previous
                previous = point
                point = self.update(clean, point, gradient, step_size, momentum, MOMENTUM if step > 0 else 1.0)
            loss, gradient, success = evaluate(point)
            broken |= success
            last_success = torch.where(success.view(-1, 1, 1, 1), point, last_success)
            history[step] = loss
            improved = (loss > best_loss).view(-1, 1, 1, 1)
            best_point, best_gradient = torch.where(improved, point, best_point), torch.where(improved, gradient, best_gradient)
            best_loss = torch.where(improved.view(-1), loss, best_loss)
            since_check += 1
            if since_check == gap:
                counted = torch.arange(step - gap + 1, step + 1, device=device)
                rises = (history[counted] > history[(counted - 1) % steps]).sum(0)  # row −1 at the first checkpoint: the authors' quirk
                halve = rises <= math.floor(gap * config.rho)  # a count against their float64 threshold, exactly
                halve |= ~halved_at_check & (best_at_check >= best_loss)
                halved_at_check, best_at_check = halve, best_loss.clone()
                halve = halve.view(-1, 1, 1, 1)
                step_size = torch.where(halve, step_size / 2, step_size)
                point, gradient = torch.where(halve, best_point, point), torch.where(halve, best_gradient, gradient)
                since_check, gap = 0, max(gap - gap_decrease, least_gap)
        return last_success, broken

    def update(self, clean, point, gradient, step_size, momentum, alpha):
        """x^{k+1} from x^k: the projected step z, then the momentum step, projected again."""
        eps = self.config.eps
        if self.config.norm == "linf":
            z = torch.clamp(torch.min(torch.max(point + step_size * torch.sign(gradient), clean - eps), clean + eps), 0.0, 1.0)
            moved = point + (z - point) * alpha + momentum * (1 - alpha)
            return torch.clamp(torch.min(torch.max(moved, clean - eps), clean + eps), 0.0, 1.0)
        z = point + step_size * gradient / (_l2(gradient) + GUARD)
        z = torch.clamp(_onto_l2_ball(clean, z, eps, 0.0), 0.0, 1.0)
        moved = point + (z - point) * alpha + momentum * (1 - alpha)
        return torch.clamp(_onto_l2_ball(clean, moved, eps, GUARD), 0.0, 1.0)

    def random_offset(self, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random point of the ε sphere per input, [B,C,H,W], drawn on the CPU as torchattacks draws it."""
        eps, device = self.config.eps, clean.device
        radius = eps * torch.ones(clean.shape[0], 1, 1, 1, device=device)
        if self.config.norm == "linf":
            uniform = 2 * torch.rand(clean.shape, generator=generator, dtype=torch.float32).to(device) - 1
            return radius * uniform / uniform.reshape(uniform.shape[0], -1).abs().max(dim=1, keepdim=True)[0].reshape(-1, 1, 1, 1)
        normal = torch.randn(clean.shape, generator=generator, dtype=torch.float32).to(device)
        return radius * normal / (_l2(normal) + GUARD)
