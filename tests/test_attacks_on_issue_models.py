"""The attacks against torchattacks on the two models issue 18 names: the embedded model (held-out
shapes, 128 px, its normalization) and a random-weight resnet18 (48 px). CW-L2, APGD-CE, APGD-DLR,
Square and FAB with the same seeds and settings break the same inputs, with perturbation norms within
1 % where both broke one. (Each attack's own file tests many more settings on timm's small test_resnet,
bit for bit where the arithmetic allows.)

torchattacks gets the model with the normalization inside (pixels in, logits out); vizkit gets the
model and its normalized input. For CW both get the model's logits plus a constant: torchattacks
reads the masked class as a logit 0, which agrees with the paper's f only where every logit is
positive (cw.py's docstring)."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torchattacks
from tiny_models import pixel_batch, single_thread, timm_model

from vizkit.core.data import load_shapes
from vizkit.core.models import data_config
from vizkit.core.pixels import PixelSpace
from vizkit.methods.adversarial.apgd import APGD
from vizkit.methods.adversarial.cw import CW
from vizkit.methods.adversarial.fab import FAB
from vizkit.methods.adversarial.square import Square

LOGIT_SHIFT = 100.0


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


class OnPixels(torch.nn.Module):
    """The model on pixels in [0, 1], its logits shifted by ``shift``."""

    def __init__(self, model, space, shift=0.0):
        super().__init__()
        self.model, self.space, self.shift = model, space, shift

    def forward(self, pixels):
        return self.model(self.space.from_pixels(pixels)) + self.shift


class Shifted(torch.nn.Module):
    def __init__(self, model, shift):
        super().__init__()
        self.model, self.shift = model, shift

    def forward(self, x):
        return self.model(x) + self.shift


@pytest.fixture(scope="module")
def cases(embedded):
    """name -> (model, its pixel space, pixels, labels: the clean predictions)."""
    samples = load_shapes(4, "test", 0, data_config(embedded))
    resnet = timm_model("resnet18", num_classes=10)
    out = {}
    for name, model, pixels in (("embedded", embedded, torch.stack([s.pixels for s in samples])),
                                ("resnet18", resnet, pixel_batch(4, 48, seed=3))):
        space = PixelSpace.for_model(model)
        with torch.no_grad():
            labels = model(space.from_pixels(pixels)).argmax(1)
        out[name] = (model, space, pixels, labels)
    return out


# (model, attack) -> ε in pixels, chosen so that some inputs break and some do not. Measured (broken of 4, the
# same on both sides, 1 and 2 threads): embedded APGD-CE/-DLR and FAB 3, Square 2, CW 4; resnet18 APGD 3,
# FAB, Square and CW 4 (there the norms carry the comparison)
EPS = {
    ("embedded", "apgd"): "2/255", ("resnet18", "apgd"): "1/510",
    ("embedded", "square"): "16/255", ("resnet18", "square"): "16/255",
    ("embedded", "fab"): "4/255", ("resnet18", "fab"): "1/255",
}


def fraction(text: str) -> float:
    return float(Fraction(text))


ATTACKS = {  # name -> (vizkit's attack for ε, torchattacks' on the pixel model for ε, the norm, the logit shift)
    "cw": (lambda eps: CW(binary_search_steps=1, steps=10, c=1, lr=0.01),
           lambda m, eps: torchattacks.CW(m, c=1, kappa=0, steps=10, lr=0.01), "l2", LOGIT_SHIFT),
    "apgd_ce": (lambda eps: APGD(eps=eps, steps=10, loss="ce", seed=0),
                lambda m, eps: torchattacks.APGD(m, eps=fraction(eps), steps=10, loss="ce", seed=0), "linf", 0.0),
    "apgd_dlr": (lambda eps: APGD(eps=eps, steps=10, loss="dlr", seed=0),
                 lambda m, eps: torchattacks.APGD(m, eps=fraction(eps), steps=10, loss="dlr", seed=0), "linf", 0.0),
    "square": (lambda eps: Square(eps=eps, queries=100, seed=0),
               lambda m, eps: torchattacks.Square(m, eps=fraction(eps), n_queries=100, seed=0), "linf", 0.0),
    "fab": (lambda eps: FAB(eps=eps, steps=3, seed=0), lambda m, eps: torchattacks.FAB(m, eps=fraction(eps), steps=3, seed=0), "linf", 0.0),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("model_name", ["embedded", "resnet18"])
def test_the_same_inputs_broken_as_torchattacks(cases, model_name, attack):
    model, space, pixels, labels = cases[model_name]
    make_ours, make_theirs, norm, shift = ATTACKS[attack]
    eps = EPS.get((model_name, attack.partition("_")[0]), "0")
    ours_model = Shifted(model, shift).eval() if shift else model
    stats = data_config(model)  # the shifted wrapper hides the model's own
    ours = space.to_pixels(make_ours(eps).attack(ours_model, space.from_pixels(pixels), labels, mean=stats["mean"], std=stats["std"]))
    theirs = make_theirs(OnPixels(model, space, shift).eval(), eps)(pixels, labels)
    with torch.no_grad():
        ours_broken = model(space.from_pixels(ours)).argmax(1) != labels
        theirs_broken = model(space.from_pixels(theirs)).argmax(1) != labels
    assert torch.equal(ours_broken, theirs_broken), (ours_broken, theirs_broken)
    order = float("inf") if norm == "linf" else 2
    ours_norm = (ours - pixels).flatten(1).norm(p=order, dim=1)
    theirs_norm = (theirs - pixels).flatten(1).norm(p=order, dim=1)
    both = ours_broken & theirs_broken
    assert ((ours_norm - theirs_norm).abs() <= 0.01 * theirs_norm + 1e-6)[both].all(), (ours_norm, theirs_norm)
