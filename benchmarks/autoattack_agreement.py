"""AutoAttack against torchattacks' AutoAttack at full settings, on 64 held-out shapes (issue 18's
differential check at the size it names; the test suite runs 8 inputs with Square cut to 100 queries).

vizkit's ``autoattack`` with torchattacks' settings (10 steps, every other class as a target, Square's
5000 queries, seed 0) and ``torchattacks.AutoAttack(version="standard", n_classes=6, seed=0)``
unchanged, both on the embedded model, at ε 1/255 (where inputs survive APGD-CE and the later attacks
have work) and 8/255. torchattacks' ensemble members ignore ``set_normalization_used``, so its model
normalizes inside. Writes the robust accuracies and the inputs the two disagree on to
``autoattack-agreement.json`` beside this file.

    python benchmarks/autoattack_agreement.py [--count 64] [--eps 1/255,8/255]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torchattacks

import vizkit
from vizkit.core.data import load_shapes
from vizkit.core.models import data_config
from vizkit.core.pixels import PixelSpace
from vizkit.methods.adversarial.autoattack import AutoAttack


class Normalized(torch.nn.Module):
    """The model on pixels in [0, 1]."""

    def __init__(self, model: torch.nn.Module, space: PixelSpace) -> None:
        super().__init__()
        self.model, self.space = model, space

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(self.space.from_pixels(pixels))


def correct(model: torch.nn.Module, space: PixelSpace, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(space.from_pixels(pixels)).argmax(1) == labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--eps", default="1/255,8/255")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = vizkit.load_model("embedded")
    space = PixelSpace.for_model(model)
    samples = load_shapes(args.count, "test", 0, data_config(model))
    pixels = torch.stack([sample.pixels for sample in samples])
    labels = torch.tensor([sample.label for sample in samples])
    rows = []
    for eps_text in args.eps.split(","):
        numerator, denominator = eps_text.split("/")
        eps = float(numerator) / float(denominator)
        started = time.perf_counter()
        ours = AutoAttack(eps=eps_text, steps=10, target_classes=5, queries=5000, seed=0).attack_with_details(
            model, space.from_pixels(pixels), labels)
        ours_seconds = time.perf_counter() - started
        peer = torchattacks.AutoAttack(Normalized(model, space).eval(), norm="Linf", eps=eps, version="standard", n_classes=6, seed=0)
        started = time.perf_counter()
        theirs = peer(pixels, labels)
        theirs_seconds = time.perf_counter() - started
        ours_robust = correct(model, space, space.to_pixels(ours.pixels), labels)
        theirs_robust = correct(model, space, theirs, labels)
        row = {"eps": eps_text, "inputs": args.count, "clean_accuracy": correct(model, space, pixels, labels).float().mean().item(),
               "robust_accuracy": ours_robust.float().mean().item(), "torchattacks_robust_accuracy": theirs_robust.float().mean().item(),
               "disagreements": torch.nonzero(ours_robust != theirs_robust).flatten().tolist(),
               "broken_by": {str(k): int((ours.details["broken_by"] == k).sum()) for k in range(-1, 4)},
               "seconds": round(ours_seconds, 1), "torchattacks_seconds": round(theirs_seconds, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = Path(__file__).with_name("autoattack-agreement.json")
    note = ("vizkit autoattack(steps=10, target_classes=5, queries=5000, seed=0) against torchattacks.AutoAttack(version='standard', "
            "n_classes=6, seed=0) on the embedded model, held-out shapes (split 'test', seed 0), one torch thread; robust accuracy "
            "= share still classified as their label; broken_by counts inputs per attack index (-1: not broken or misclassified clean)")
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "torchattacks": torchattacks.__version__,
                               "note": note, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
