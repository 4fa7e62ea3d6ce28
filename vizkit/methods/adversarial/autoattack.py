"""AutoAttack (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML): the ensemble RobustBench reports, run the way its reference
code's ``run_standard_evaluation`` runs it.

The standard ensemble, in order: APGD-CE (untargeted, cross-entropy), APGD-T (targeted DLR loss towards
each of the ``target_classes`` most likely other classes in turn), FAB-T (the targeted fast adaptive
boundary attack, the same targets) and Square (score-based, ``queries`` forwards). An input is
attacked first by APGD-CE; each later attack runs only on the inputs every earlier one left correctly
classified, from the clean image (not from the previous attack's point), and an input counts as
broken by the first attack whose result the model misclassifies. The robust accuracy is therefore the
point-wise worst case over the attacks. Inputs the model gets wrong to begin with are not attacked.

Per input the method records ``broken_by``: the index in ``attacks`` of the attack that broke it, or
-1 (never broken, or misclassified clean). A run reports, besides the usual figures, the robust
accuracy after each attack (``robust_accuracy_after_apgd_ce`` ...), as the reference prints it.

Settings follow the reference code (fra31/auto-attack, version "standard"), not torchattacks'
``AutoAttack``, where the two differ; torchattacks' issue tracker reports different robust accuracies
for the two (Harry24k/adversarial-attacks-pytorch#164, #188):

* APGD and FAB run ``steps`` = 100 iterations (torchattacks' ensemble keeps its attacks' default 10);
* APGD-T and FAB-T target the 9 most likely other classes (torchattacks: all ``n_classes`` − 1).
  A model with fewer than 10 classes gets all its other classes (the reference would fail there);
* every attack gets the same ``seed``, as both do.

With ``steps=10`` (and ``target_classes`` ≥ the model's classes − 1) the ensemble is torchattacks'
``AutoAttack(version="standard")`` attack for attack; the differential test checks the robust
accuracy. ``attacks`` runs another list in the same way (the reference's ``version="custom"``):
``apgd-ce``, ``apgd-dlr``, ``apgd-t``, ``fab``, ``fab-t``, ``square``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vizkit.core.errors import ConfigError, did_you_mean
from vizkit.methods.adversarial.budget import check_norm, pixel_amount
from vizkit.methods.base import AdversarialMethod, Perturbed, as_perturbed

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
NOT_BROKEN = -1


@dataclass
class AutoAttackConfig:
    norm: str = "linf"  # linf | l2: the ball every attack stays in
    eps: Any = "8/255"  # the ball's radius in pixel units (8/255 is RobustBench's L∞ budget on CIFAR-10)
    attacks: list[str] = field(default_factory=lambda: list(STANDARD))  # run in this order, each on what the earlier left
    steps: int = 100  # iterations of APGD and FAB (the reference's; torchattacks' ensemble: 10)
    target_classes: int = 9  # APGD-T's and FAB-T's targets: the most likely other classes (at most the model's classes - 1)
    queries: int = 5000  # Square's budget of forwards per input
    seed: int = 0  # every attack's

    def __post_init__(self) -> None:
        check_norm(self.norm)
        self.eps = pixel_amount("eps", self.eps)
        for name in ("steps", "target_classes", "queries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.attacks, str):
            self.attacks = [self.attacks]
        self.attacks = [str(name) for name in self.attacks]
        if not self.attacks:
            raise ConfigError(f"attacks must name at least one of {', '.join(ATTACKS)} (the standard ensemble: {','.join(STANDARD)})")
        for name in self.attacks:
            if name not in ATTACKS:
                raise ConfigError(f"attacks: unknown attack '{name}'; choose from {', '.join(ATTACKS)}{did_you_mean(name, ATTACKS)}")
        if len(set(self.attacks)) != len(self.attacks):
            raise ConfigError(f"attacks lists an attack twice: {self.attacks} (each runs once, on what the earlier ones left)")


class AutoAttack(AdversarialMethod):
    name = "autoattack"
    description = "the AutoAttack ensemble: APGD-CE, APGD-T, FAB-T, Square, each on the inputs still robust (Croce & Hein 2020)"
    Config = AutoAttackConfig
    targeted = False

    def perturb(self, model, pixels, labels, targets, space) -> Perturbed:
        config = self.config
        adversarial = pixels.clone()
        broken_by = torch.full((pixels.shape[0],), NOT_BROKEN, dtype=torch.long, device=pixels.device)
        if config.eps == 0:
            return Perturbed(adversarial, {"broken_by": broken_by})
        with torch.no_grad():
            logits = model(space.from_pixels(pixels))
        robust = torch.nonzero(logits.argmax(1) == labels).flatten()  # the inputs no attack has broken yet
        classes = logits.shape[1]
        for index, name in enumerate(config.attacks):
            if robust.numel() == 0:
                break
            attack = self.member(name, classes)
            found = as_perturbed(attack.perturb(model, pixels[robust], labels[robust], None, space)).pixels.detach()
            with torch.no_grad():
                still = model(space.from_pixels(found)).argmax(1) == labels[robust]
            broken = robust[~still]
            adversarial[broken] = found[~still]
            broken_by[broken] = index
            robust = robust[still]
        return Perturbed(adversarial, {"broken_by": broken_by})

    def member(self, name: str, classes: int) -> AdversarialMethod:
        """The ensemble's attack ``name``, configured with the ensemble's budget, steps and seed."""
        from vizkit.methods.adversarial.apgd import APGD
        from vizkit.methods.adversarial.fab import FAB
        from vizkit.methods.adversarial.square import Square

        config = self.config
        common = {"norm": config.norm, "eps": config.eps, "seed": config.seed}
        targets = min(config.target_classes, classes - 1)
        if name.startswith("apgd"):
            loss = "ce" if name == "apgd-ce" else "dlr"
            return APGD(**common, steps=config.steps, loss=loss, target_classes=targets if name == "apgd-t" else 0)
        if name.startswith("fab"):
            return FAB(**common, steps=config.steps, target_classes=targets if name == "fab-t" else 0)
        return Square(**common, queries=config.queries)

    def report(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """Robust accuracy after each attack: the share of inputs classified correctly to begin with
        and broken by none of the attacks up to and including it."""
        if not records:
            return {}
        figures = {}
        for index, name in enumerate(self.config.attacks):
            robust = [r["clean_correct"] and not (0 <= r["details"].get("broken_by", NOT_BROKEN) <= index) for r in records]
            figures[f"robust_accuracy_after_{name.replace('-', '_')}"] = sum(robust) / len(records)
        return figures
